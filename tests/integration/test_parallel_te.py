"""MoRA on Transformer Engine linear layers (megatron's TE wrappers): TP = 2 (and sequence parallel) against
TP = 1, and TP = 1 against a dense float64 reference, for every type on every TE layer kind.

Two backends, one launch per (TP size, backend): the stand-ins of ``tests/helpers/te_standins.py`` on CPU (gloo), and
megatron's real TE wrappers (test id ``real_te``) on one CUDA GPU per rank over NCCL, where ``transformer_engine``
imports and enough GPUs are visible; otherwise those cases are skipped with what is missing. The real-TE cases
alone: ``pytest tests/integration/test_parallel_te.py -k real_te -rs`` (``benchmarks/gpu_h200.sh`` runs them).
Spec: §4.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers import reference
from tests.helpers.parallel_setup import close_megatron, init_megatron, portable, restore
from tests.helpers.workers import run_workers

S, B = 8, 2
TYPES = (1, 2, 3, 4, 6)
# Transformer Engine runs every pure-fp32 GEMM in TF32 (transformer_engine/common/gemm/cublaslt_gemm.cu picks
# CUBLAS_COMPUTE_32F_FAST_TF32 whatever torch's allow_tf32 says), so on real TE the outputs and input gradients,
# which pass through TE's GEMMs, are held to a TF32 tolerance: 2e-2 of 1 + |value|, about 3x the worst error of
# TF32-truncated GEMM operands on these cases (6.4e-3). M's gradient, dW and M come from the adapter alone (plain
# torch, TF32 off): 1e-5 on both backends.
GEMM_TOL = {"standin": 1e-5, "te": 2e-2}


def _real_te_unavailable() -> dict[int, str | None]:
    """Per TP size, why megatron's real TE wrappers cannot run here (None where they can): they need
    ``transformer_engine`` (built against CUDA; megatron-core falls back to a mock without it) and one CUDA GPU
    per rank."""
    if importlib.util.find_spec("transformer_engine") is None:
        why = "transformer_engine is not installed (it builds only against CUDA); the stand-in cases are the same"
        return {1: why, 2: why}
    try:
        import transformer_engine.pytorch.fp8  # noqa: F401  (what megatron.core.extensions.transformer_engine needs)
    except Exception as exc:  # any import failure is a reason to skip, reported as is
        why = f"transformer_engine is installed but does not import ({type(exc).__name__}: {exc})"
        return {1: why, 2: why}
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        why = "megatron-core is not installed (its TE wrappers are what these cases test)"
        return {1: why, 2: why}
    gpus = torch.cuda.device_count()
    return {tp: None if gpus >= tp else f"real TE at TP={tp} needs {tp} CUDA GPU(s), one per rank; {gpus} visible"
            for tp in (1, 2)}


REAL_TE_UNAVAILABLE = _real_te_unavailable()


def _backends(tp: int) -> list:
    """The stand-ins, and the real TE wrappers (id ``real_te``) where TP = ``tp`` can run on them."""
    why = REAL_TE_UNAVAILABLE[tp]
    return ["standin", pytest.param("te", id="real_te", marks=pytest.mark.skipif(why is not None, reason=str(why)))]


KINDS = {  # kind: (k, d, layer name); row layers take split inputs
    "column": (24, 64, "linear_qkv"),
    "row": (64, 24, "linear_proj"),
    "duplicated": (24, 40, "linear_q_down_proj"),
    "ln_column": (24, 64, "linear_qkv"),
    "ln_column_fc1": (24, 96, "linear_fc1"),  # gated: local rows [gate_t; up_t]
    "ln_column_layernorm": (24, 64, "linear_qkv"),  # LayerNorm with bias, bias returned separately
}


def _cases() -> list[dict]:
    cases = []
    for kind, (k, d, name) in KINDS.items():
        for t in TYPES:
            for sp in (False, True):
                cases.append(dict(kind=kind, k=k, d=d, name=name, type=t, sp=sp, r_hat=8,
                                  id=f"{kind}-t{t}" + ("-sp" if sp else "")))
    cases.append(dict(kind="column", k=20, d=56, name="uneven", type=1, sp=False, r_hat=7, id="column-uneven-t1"))
    cases.append(dict(kind="row", k=56, d=20, name="uneven", type=3, sp=True, r_hat=7, id="row-uneven-t3-sp"))
    for i, case in enumerate(cases):
        case["seed"] = 300 + i
    return cases


CASES = _cases()


def _classes(backend: str):
    if backend == "te":
        from megatron.core.extensions import transformer_engine as te
    else:
        from tests.helpers import te_standins as te
    return te


def _config(case: dict, tp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_kwargs

    return TransformerConfig(
        num_layers=1, hidden_size=case["k"], num_attention_heads=2, tensor_model_parallel_size=tp,
        sequence_parallel=case["sp"] and tp > 1,
        normalization="LayerNorm" if "layernorm" in case["kind"] else "RMSNorm",
        gated_linear_unit=case["kind"] == "ln_column_fc1", params_dtype=torch.float32, layernorm_epsilon=1e-5,
        # On CUDA too: use_cpu_initialization (megatron's --use-cpu-initialization) draws each global weight once
        # on the CPU and keeps this rank's shard, so every TP size has the same weights (real TE then creates its
        # parameters with device="cpu"); the fusions these kwargs turn off are optional on a GPU.
        **cpu_model_parallel_kwargs(),
    )


def _init(case: dict):
    seed = case["seed"]
    return lambda w: torch.nn.init.normal_(w, std=0.3, generator=torch.Generator().manual_seed(seed))


def _build(case: dict, tp: int, backend: str):
    te, config, kind = _classes(backend), _config(case, tp), case["kind"]
    k, d = case["k"], case["d"]
    if kind == "column":
        return te.TEColumnParallelLinear(k, d, config=config, init_method=_init(case), gather_output=False,
                                         bias=True, skip_bias_add=False, is_expert=False)
    if kind == "row":
        return te.TERowParallelLinear(k, d, config=config, init_method=_init(case), bias=True, input_is_parallel=True,
                                      skip_bias_add=False, is_expert=False)
    if kind == "duplicated":
        layer = te.TELinear(k, d, parallel_mode="duplicated", config=config, init_method=_init(case), bias=True,
                            skip_bias_add=False, skip_weight_param_allocation=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(d, k, generator=torch.Generator().manual_seed(case["seed"])) * 0.3)
        return layer
    layer = te.TELayerNormColumnParallelLinear(
        k, d, config=config, init_method=_init(case), gather_output=False, bias=True,
        skip_bias_add=kind == "ln_column_layernorm", is_expert=False, stride=2 if kind == "ln_column_fc1" else 1,
    )
    g = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():  # a non-trivial norm: the same global gamma (and beta) at every TP size
        layer.layer_norm_weight.copy_(1 + 0.5 * torch.randn(k, generator=g))
        if layer.layer_norm_bias is not None:
            layer.layer_norm_bias.copy_(0.5 * torch.randn(k, generator=g))
    return layer


def _rows(d: int, tp: int, rank: int, stride: int) -> torch.Tensor:
    """Output rows of rank ``rank`` as megatron's ``_initialize_affine_weight_cpu`` assigns them."""
    return torch.cat(torch.split(torch.arange(d), d // (stride * tp))[rank::tp])


def _data(case: dict):
    g = torch.Generator().manual_seed(case["seed"] + 2)
    M = torch.randn(case["r_hat"], case["r_hat"], generator=g) * 0.2
    X = torch.randn(S, B, case["k"], generator=g)
    G = torch.randn(S, B, case["d"], generator=g)
    return M, X, G


def _local(case: dict, tp: int, rank: int, X: torch.Tensor, G: torch.Tensor):
    """This rank's input and output gradient: sequence-split under sequence parallelism, features as TE splits."""
    sp, kind = case["sp"] and tp > 1, case["kind"]
    stride = 2 if kind == "ln_column_fc1" else 1
    if kind == "row":
        return X.chunk(tp, -1)[rank], (G.chunk(tp, 0)[rank] if sp else G)
    x = X.chunk(tp, 0)[rank] if sp else X
    if kind == "duplicated":
        return x, (G.chunk(tp, 0)[rank] if sp else G)
    return x, G[..., _rows(case["d"], tp, rank, stride)]


def _te_gpt(tp: int):
    """The tiny GPTModel of ``test_parallel_gpt`` built with the TE layer spec (fused norms), not the local one."""
    from megatron.core.models.gpt import GPTModel

    from tests.helpers import te_standins
    from tests.integration import test_parallel_gpt as gpt

    local = gpt._gpt(tp)  # same config; rebuilt with the TE spec from the same seed
    torch.manual_seed(0)
    return GPTModel(config=local.config, transformer_layer_spec=te_standins.te_gpt_layer_spec(),
                    vocab_size=gpt.VOCAB, max_sequence_length=gpt.SEQ, position_embedding_type="rope")


def _gpt_run(tp: int, root: str) -> dict:
    """Train the TE-spec GPT with MoRA on the four projections, save (adapter files and dist_checkpointing) at
    TP = 2, load at TP = 1, merge."""
    from mora_dist import MoRAConfig, apply_mora, load_mora, merge_mora, mora_layers, save_mora
    from tests.integration import test_parallel_gpt as gpt

    out = {}
    config = MoRAConfig(r_hat=8, mora_type=6, target_modules=gpt.TARGETS)
    model = apply_mora(_te_gpt(tp), config)
    out["classes"] = sorted({type(m).__name__ for _, m in mora_layers(model)})
    out["base"] = gpt._logits(model)
    out["losses"], out["m_grads"] = gpt._train(model)  # M gradients of the first and last step
    out["trained"] = gpt._logits(model)
    if tp == 2:
        save_mora(model, f"{root}/adapter")
        gpt._dist_save(model, f"{root}/dist")
    else:
        out["loaded"] = gpt._logits(load_mora(_te_gpt(tp), f"{root}/adapter"))
        fresh = apply_mora(_te_gpt(tp), config)
        gpt._dist_load(fresh, f"{root}/dist")
        out["dist_loaded"] = gpt._logits(fresh)
    merge_mora(model)
    out["merged"] = gpt._logits(model)
    return out


def _te_origin(layer: torch.nn.Module) -> str | None:
    """The ``transformer_engine`` module among the layer's base classes (None for the stand-ins)."""
    return next((c.__module__ for c in type(layer).__mro__ if c.__module__.startswith("transformer_engine.")), None)


def _worker(tp: int, backend: str, cases: list[dict], root: str) -> dict:
    from megatron.core import parallel_state

    from mora_dist import MoRAConfig, apply_mora

    device = init_megatron(tp, device="cuda" if backend == "te" else "cpu")
    rank, out = parallel_state.get_tensor_model_parallel_rank(), {}
    for case in cases:
        # Built on the CPU (use_cpu_initialization: the global weight drawn once, this rank's shard kept), then
        # moved to this rank's device as megatron's get_model does; MoRA then allocates M beside the weight.
        base = _build(case, tp, backend).to(device)
        model = torch.nn.ModuleDict({case["name"]: base})
        config = MoRAConfig(r_hat=case["r_hat"], mora_type=case["type"], target_modules=[case["name"]])
        layer = apply_mora(model, config)[case["name"]]
        M, X, G = (t.to(device) for t in _data(case))
        layer.set_global_M(M)
        x, g = _local(case, tp, rank, X, G)
        x = x.clone().requires_grad_(True)
        y, bias = layer(x)
        y_full = y if bias is None else y + bias
        (y_full * g).sum().backward()
        res = dict(cls=type(layer).__name__, y=y_full.detach(), dx=x.grad, gM=layer.mora_M.grad,
                   m_dim=layer.plan.m_dim, m_ids=layer.plan.m_ids, M_back=layer.get_global_M(),
                   dW=layer.delta_weight(), te_origin=_te_origin(base), m_device=str(layer.mora_M.device),
                   w_device=str(base.weight.device), first_mb=[base.is_first_microbatch])
        if tp == 1:
            res.update(W=base.weight.detach().clone(), b=base.bias.detach().clone())
            if hasattr(base, "layer_norm_weight"):
                res.update(gamma=base.layer_norm_weight.detach().clone(), beta=None if base.layer_norm_bias is None
                           else base.layer_norm_bias.detach().clone(), norm=base.normalization, eps=base.eps)
        layer.merge()  # must make TE recast its (FP8-cached) weight at the next forward
        res["first_mb"].append(base.is_first_microbatch)
        out[case["id"]] = res
    out["errors"] = _errors(tp, backend)
    if backend == "standin":
        out["gpt"] = _gpt_run(tp, root)
    close_megatron()
    return portable(out)


def _errors(tp: int, backend: str) -> dict:
    """Refusals: grouped experts, SequentialMLP experts, FP8 weights; and unload restores the fused layer's
    output."""
    from mora_dist import MoRAConfig, apply_mora, unload

    case = dict(kind="ln_column", k=24, d=64, name="linear_qkv", type=6, sp=False, r_hat=8, seed=1)
    errors = {}

    class GroupedStandIn(torch.nn.Module):  # TE's GroupedLinear interface: weight0.., num_gemms, no .weight
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features, self.parallel_mode, self.tp_size = 8, 8, "column", 1
            self.num_gemms = 2
            self.weight0 = torch.nn.Parameter(torch.zeros(8, 8))

    model = torch.nn.ModuleDict({"experts": torch.nn.ModuleDict({"linear_fc1": GroupedStandIn()}),
                                 "linear_qkv": _build(case, tp, backend)})
    try:
        apply_mora(model, MoRAConfig(r_hat=8, target_modules=["linear_fc1", "linear_qkv"]))
    except Exception as exc:  # the parent checks type and message
        errors["grouped"] = (type(exc).__name__, str(exc), type(model["linear_qkv"]).__name__)
    seq = torch.nn.ModuleDict({"mlp": torch.nn.ModuleDict({"experts": torch.nn.ModuleDict({"local_experts": (
        torch.nn.ModuleDict({"0": torch.nn.ModuleDict({"linear_qkv": _build(case, tp, backend)})}))})})})
    try:
        apply_mora(seq, MoRAConfig(r_hat=8, target_modules=["linear_qkv"]))
    except Exception as exc:  # the parent checks type and message
        errors["sequential"] = (type(exc).__name__, str(exc), "")
    fp8 = _build(case, tp, backend)
    fp8.primary_weights_in_fp8 = True  # what TE sets on a module built under quantized_model_init
    try:
        apply_mora(torch.nn.ModuleDict({"linear_qkv": fp8}), MoRAConfig(r_hat=8, target_modules=["linear_qkv"]))
    except Exception as exc:  # the parent checks type and message
        errors["fp8_weights"] = (type(exc).__name__, str(exc), "")
    fused = torch.nn.ModuleDict({"linear_qkv": _build(case, tp, backend)})
    apply_mora(fused, MoRAConfig(r_hat=8, target_modules=["linear_qkv"]))
    flag_on = fused["linear_qkv"].base_layer.return_layernorm_output
    unload(fused)
    errors["unload_flag"] = (flag_on, fused["linear_qkv"].return_layernorm_output)
    return errors


_RESULTS: dict = {}


def _results(tp: int, backend: str) -> list[dict]:
    """One launch per (TP, backend), on first use; the stand-ins' TP = 2 runs before their TP = 1 (its GPT run
    writes the checkpoints TP = 1 reads)."""
    if tp == 1 and backend == "standin" and (2, backend) not in _RESULTS:
        _results(2, backend)
    if (tp, backend) not in _RESULTS:
        _RESULTS[tp, backend] = restore(run_workers(_worker, tp, tp, backend, CASES, _RESULTS["root"], timeout_s=200))
    return _RESULTS[tp, backend]


@pytest.fixture(autouse=True, scope="module")
def _root(tmp_path_factory):
    _RESULTS.setdefault("root", str(tmp_path_factory.mktemp("te_gpt")))


def _close(actual, expected, what, tol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, msg=what)


def _dense(case: dict, ref: dict, X: torch.Tensor, G: torch.Tensor, M: torch.Tensor):
    """float64 ``y = N(X) (W + dW)^T + b`` and its gradients wrt ``X`` and ``M`` (``N``: the fused norm or 1)."""
    X = X.double().requires_grad_(True)
    M = M.double().requires_grad_(True)
    h = X
    if "gamma" in ref:
        if ref["norm"] == "RMSNorm":
            h = X * torch.rsqrt(X.pow(2).mean(-1, keepdim=True) + ref["eps"]) * ref["gamma"].double()
        else:
            beta = ref["beta"].double()
            h = torch.nn.functional.layer_norm(X, (X.shape[-1],), ref["gamma"].double(), beta, ref["eps"])
    W = ref["W"].double() + reference.dense_delta(M, case["k"], case["d"], case["type"])
    y = h @ W.T + ref["b"].double()
    (y * G.double()).sum().backward()
    return y.detach(), X.grad, M.grad


@pytest.mark.parametrize("backend", _backends(1))
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_te_layer_tp1_matches_dense_reference(case, backend):
    """TP = 1 output, input gradient and ``M`` gradient equal ``N(x) (W + dW)^T + b`` in float64: for the fused
    norm layers this fails if the adapter reads the raw input instead of the normalised one (checked once by
    feeding ``input_``: every ln_column case fails)."""
    ref = _results(1, backend)[0][case["id"]]
    M, X, G = _data(case)
    y, dx, gM = _dense(case, ref, X, G, M)
    _close(ref["y"], y, "output", GEMM_TOL[backend])
    _close(ref["dx"], dx, "input grad", GEMM_TOL[backend])
    _close(ref["gM"], gM, "M grad")
    assert ref["m_device"] == ref["w_device"]
    assert list(ref["first_mb"]) == [False, True]  # after the forward; after a merge


@pytest.mark.parametrize("backend", _backends(2))
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_te_layer_tp2_matches_tp1(case, backend):
    """TP = 2 (sequence parallel where the id says so): each rank's output and input gradient are the TP = 1
    ones restricted to its rows / columns / tokens, ``M``'s gradient (gathered if sharded) equals TP = 1's,
    and each rank's ``dW`` shard is the matching block of TP = 1's. Catches an adapter gradient left unreduced
    after TE's own reduction, a gathered normalised input whose gradient TE drops, or local instead of global
    feature ids."""
    ref = _results(1, backend)[0][case["id"]]
    ranks = [r[case["id"]] for r in _results(2, backend)]
    M, X, G = _data(case)
    kind, sp, tp = case["kind"], case["sp"], 2
    stride = 2 if kind == "ln_column_fc1" else 1
    assert ranks[0]["cls"].startswith("MoRATE")
    grads = []
    for rank, res in enumerate(ranks):
        if kind == "row":
            y_ref = ref["y"].chunk(tp, 0)[rank] if sp else ref["y"]
            dx_ref = ref["dx"].chunk(tp, -1)[rank]
            dW_ref = ref["dW"].chunk(tp, 1)[rank]
        elif kind == "duplicated":
            y_ref = ref["y"].chunk(tp, 0)[rank] if sp else ref["y"]
            dx_ref = ref["dx"].chunk(tp, 0)[rank] if sp else ref["dx"]
            dW_ref = ref["dW"]
        else:
            rows = _rows(case["d"], tp, rank, stride)
            y_ref = ref["y"][..., rows]
            dx_ref = ref["dx"].chunk(tp, 0)[rank] if sp else ref["dx"]
            dW_ref = ref["dW"][rows]
        _close(res["y"], y_ref, f"rank {rank} output", GEMM_TOL[backend])
        _close(res["dx"], dx_ref, f"rank {rank} input grad", GEMM_TOL[backend])
        _close(res["dW"], dW_ref, f"rank {rank} dW shard")
        _close(res["M_back"], M, "global M round trip")
        grads.append(res["gM"])
    if ranks[0]["m_dim"] is None:
        for g in grads:
            _close(g, ref["gM"], "replicated M grad")
    else:
        full = torch.zeros_like(ref["gM"])
        for res, g in zip(ranks, grads):
            full.index_copy_(res["m_dim"], res["m_ids"], g)
        _close(full, ref["gM"], "sharded M grad")


@pytest.mark.parametrize("backend", _backends(2))
def test_grouped_and_sequential_experts_and_fp8_weights_are_refused(backend):
    """Grouped experts (TE ``GroupedLinear`` interface) and ``SequentialMLP`` local experts raise a
    ``MoRAConfigError`` naming the layer and the ``exclude_modules`` option, before any layer is wrapped; so does
    a layer whose weights TE keeps in FP8 (``primary_weights_in_fp8``), naming ``quantized_model_init``."""
    errors = _results(2, backend)[0]["errors"]
    kind, msg, untouched = errors["grouped"]
    assert kind == "MoRAConfigError" and "experts.linear_fc1" in msg and "exclude_modules=['*experts*']" in msg
    assert untouched == "TELayerNormColumnParallelLinear"  # planned, refused, nothing wrapped
    kind, msg, _ = errors["sequential"]
    assert kind == "MoRAConfigError" and "local_experts.0.linear_qkv" in msg and "exclude_modules" in msg
    kind, msg, _ = errors["fp8_weights"]
    assert kind == "MoRAConfigError" and "linear_qkv" in msg and "quantized_model_init" in msg


@pytest.mark.parametrize("backend", _backends(1))
def test_unload_restores_the_fused_layer(backend):
    """The wrapper asks TE for the normalised input; ``unload`` gives the layer back as it was built."""
    assert tuple(_results(1, backend)[0]["errors"]["unload_flag"]) == (True, False)


@pytest.mark.parametrize("tp", [1, 2], ids=["real_te-tp1", "real_te-tp2"])
def test_real_transformer_engine_runs_where_it_imports(tp):
    """Says whether megatron's real TE wrappers ran at TP = ``tp``: skipped with what is missing
    (``transformer_engine``, or a GPU per rank); where they can run, every case ran on each rank with a
    ``transformer_engine.pytorch`` class under the megatron wrapper, the layer and ``M`` on that rank's GPU."""
    why = REAL_TE_UNAVAILABLE[tp]
    if why is not None:
        pytest.skip(why)
    for rank, results in enumerate(_results(tp, "te")):
        assert {c["id"] for c in CASES} <= results.keys()
        for case in CASES:
            res = results[case["id"]]
            assert (res["te_origin"] or "").startswith("transformer_engine.pytorch"), (case["id"], res["te_origin"])
            assert res["w_device"] == res["m_device"] == f"cuda:{rank}", (case["id"], res["w_device"])


def test_te_spec_gpt_trains_saves_loads_and_merges_at_tp2_like_tp1():
    """A GPTModel built with the TE spec (``linear_qkv``/``linear_fc1`` with fused norms) takes ``apply_mora`` on
    the four projections; five AdamW steps at TP = 2 give the TP = 1 losses, M gradients and logits; adapter files and
    ``dist_checkpointing`` written at TP = 2 load at TP = 1; merging keeps the trained logits."""
    ref, ranks = _results(1, "standin")[0]["gpt"], [r["gpt"] for r in _results(2, "standin")]
    assert ref["classes"] == ["MoRATELayerNormColumnParallelLinear", "MoRATERowParallelLinear"]
    assert ref["losses"][-1] < ref["losses"][0] - 0.05
    for res in ranks:
        _close(torch.as_tensor(res["losses"]), torch.as_tensor(ref["losses"]), "losses")
        for step, grads in enumerate(res["m_grads"]):
            assert grads.keys() == ref["m_grads"][step].keys()
            for name, grad in grads.items():
                _close(grad, ref["m_grads"][step][name], f"M grad of {name} at recorded step {step}")
        _close(res["base"], ref["base"], "base logits")
        _close(res["trained"], ref["trained"], "trained logits")
        _close(res["merged"], res["trained"], "merged logits")
    _close(ref["loaded"], ranks[0]["trained"], "save_mora at TP=2 -> load_mora at TP=1")
    _close(ref["dist_loaded"], ranks[0]["trained"], "dist_checkpointing TP=2 -> TP=1")
    _close(ref["merged"], ref["trained"], "merged logits")
