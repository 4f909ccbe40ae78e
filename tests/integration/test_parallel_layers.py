"""MoRA column/row-parallel layers on real megatron-core layers over gloo: TP = 2 and 4 against TP = 1.

One launch per TP size runs every case (type x layout x sequence parallel x communication path); the parent
assembles each rank's shard with its own index formulas (not the library's) and compares with TP = 1.
Spec: §4.
"""

from __future__ import annotations

import pytest
import torch

from mora_dist.merge import RESIDUAL
from tests.helpers import reference
from tests.helpers.parallel_setup import close_megatron, init_megatron, init_normal, portable, restore
from tests.helpers.workers import run_workers

S, B = 8, 2
MERGE_SCALES = (1e-3, 2e-3)  # M scales of two merges into a bf16 base: updates of about one bf16 step
TYPES = (1, 2, 3, 4, 6)


def _cases() -> list[dict]:
    cases = []
    for t in TYPES:
        r_even = 8
        cases += [
            dict(kind="column", name="linear_qkv", k=24, d=64, r_hat=r_even, type=t, stride=1),
            dict(kind="column", name="linear_fc1", k=24, d=96, r_hat=r_even, type=t, stride=2),
            dict(kind="column", name="uneven", k=20, d=56, r_hat=6 if t == 6 else 7, type=t, stride=1),
            dict(kind="row", name="linear_fc2", k=64, d=24, r_hat=r_even, type=t, stride=1),
            dict(kind="row", name="uneven", k=56, d=20, r_hat=6 if t == 6 else 7, type=t, stride=1),
        ]
    for t in TYPES:
        cases += [
            dict(kind="column", name="linear_fc1", k=24, d=96, r_hat=8, type=t, stride=2, sp=True),
            dict(kind="row", name="linear_proj", k=64, d=24, r_hat=8, type=t, stride=1, sp=True),
        ]
    for t in (2, 4, 6):  # the Transformer Engine path (adapter beside the base's own collectives)
        for sp in (False, True):
            cases += [
                dict(kind="column", name="linear_qkv", k=24, d=64, r_hat=8, type=t, stride=1, sp=sp, fuse=False),
                dict(kind="row", name="linear_proj", k=64, d=24, r_hat=8, type=t, stride=1, sp=sp, fuse=False),
            ]
    for t in (2, 6):  # the base gathers its output / scatters its input itself
        cases += [
            dict(kind="column", name="gathered", k=24, d=64, r_hat=8, type=t, stride=1, edge=True),
            dict(kind="row", name="scattered", k=64, d=24, r_hat=8, type=t, stride=1, edge=True),
        ]
    # adapter dropout 0.3: the mask must be TP = 1's (whole input, sequence chunk, feature columns)
    cases += [
        dict(kind="column", name="linear_fc1", k=24, d=96, r_hat=8, type=2, stride=2, sp=True, dropout=0.3),
        dict(kind="column", name="linear_qkv", k=24, d=64, r_hat=8, type=6, stride=1, sp=True, fuse=False,
             dropout=0.3),
        dict(kind="row", name="linear_proj", k=64, d=24, r_hat=8, type=2, stride=1, dropout=0.3),
        dict(kind="row", name="linear_proj", k=64, d=24, r_hat=8, type=6, stride=1, sp=True, fuse=False,
             dropout=0.3),
    ]
    for i, case in enumerate(cases):
        case.setdefault("edge", False)
        case.setdefault("dropout", 0.0)
        case.setdefault("sp", False)
        case.setdefault("fuse", True)
        case["seed"] = 100 + i
        suffix = ("-sp" if case["sp"] else "") + ("" if case["fuse"] else "-te") + ("-drop" if case["dropout"] else "")
        case["id"] = f"{case['kind']}-{case['name']}-t{case['type']}{suffix}"
    return cases


CASES = _cases()


def _rows(d: int, tp: int, rank: int, stride: int) -> torch.Tensor:
    """Rows of rank ``rank`` as megatron's ``_initialize_affine_weight_cpu`` assigns them."""
    return torch.cat(torch.split(torch.arange(d), d // (stride * tp))[rank::tp])


def _data(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"])
    M = torch.randn(case["r_hat"], case["r_hat"], generator=g) * 0.2
    X = torch.randn(S, B, case["k"], generator=g)
    G = torch.randn(S, B, case["d"], generator=g)
    return M, X, G


def _build(case: dict, tp: int):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from mora_dist.parallel.layers import MoRAColumnParallelLinear, MoRARowParallelLinear

    config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=case["sp"] and tp > 1,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
    )
    torch.manual_seed(case["seed"])
    if case["kind"] == "column":
        base = ColumnParallelLinear(
            case["k"],
            case["d"],
            config=config,
            init_method=init_normal(0.2),
            bias=True,
            gather_output=case["edge"],
            stride=case["stride"],
        )
        cls = MoRAColumnParallelLinear
    else:
        base = RowParallelLinear(
            case["k"],
            case["d"],
            config=config,
            init_method=init_normal(0.2),
            bias=True,
            input_is_parallel=not case["edge"],
            skip_bias_add=False,
        )
        cls = MoRARowParallelLinear
    with torch.no_grad():  # a non-zero bias, the same global vector at every TP size
        bias = torch.randn(case["d"], generator=torch.Generator().manual_seed(case["seed"] + 7))
        base.bias.copy_(bias if case["kind"] == "row" else bias[_rows(case["d"], tp, base_rank(), case["stride"])])
    return cls(base, case["r_hat"], case["type"], name=case["name"], fuse_with_base_comm=case["fuse"],
               dropout=case.get("dropout", 0.0))


def base_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def _layer_worker(tp: int, cases: list[dict]) -> dict:
    init_megatron(tp)
    rank, out = base_rank(), {}
    for case in cases:
        layer = _build(case, tp)
        M, X, G = _data(case)
        layer.set_global_M(M)
        sp = case["sp"] and tp > 1
        if case["kind"] == "column":
            x = X.chunk(tp, 0)[rank] if sp else X
            g = G if case["edge"] else G[..., _rows(case["d"], tp, rank, case["stride"])]
        else:
            x = X if case["edge"] else X.chunk(tp, -1)[rank]
            g = G.chunk(tp, 0)[rank] if sp else G
        x = x.clone().requires_grad_(True)
        torch.manual_seed(case["seed"])  # the same default generator state at every TP size (dropout cases)
        y, bias = layer(x)
        assert bias is None
        (y * g).sum().backward()
        out[case["id"]] = dict(
            y=y.detach(),
            dx=x.grad,
            gM=layer.mora_M.grad,
            m_dim=layer.plan.m_dim,
            m_ids=layer.plan.m_ids,
            dW=layer.delta_weight().detach(),
            M_back=layer.get_global_M(),
            W=layer.base_layer.weight.detach().clone(),
        )
        with torch.no_grad():  # two compensated merges into the base cast to bf16 (as DeepSpeed casts it)
            layer.base_layer.weight.data = layer.base_layer.weight.data.bfloat16()
            for scale in MERGE_SCALES:
                layer.set_global_M(M * scale)
                layer.merge()
        out[case["id"]]["W_eff"] = layer.base_layer.weight.double() + getattr(layer, RESIDUAL).double()
    errors = {}
    for name, kwargs in _ERROR_CASES.items():
        try:
            _build_error(tp, **kwargs)
        except Exception as exc:  # the parent checks type and message
            errors[name] = (type(exc).__name__, str(exc))
    errors["type_switch"] = _switch_types(tp)
    out["errors"] = errors
    if tp == 2:
        out["collectives"] = {c["id"]: _count_collectives(c, tp) for c in COUNT_CASES}
    close_megatron()
    return portable(out)


COUNT_CASES = [
    dict(kind="column", name="linear_qkv", k=24, d=64, r_hat=8, type=2, stride=1, sp=False, id="column-sharded"),
    dict(kind="column", name="linear_fc1", k=24, d=96, r_hat=8, type=2, stride=2, sp=True, id="column-sharded-sp"),
    dict(kind="row", name="linear_fc2", k=64, d=24, r_hat=8, type=2, stride=1, sp=False, id="row-sharded"),
    dict(kind="row", name="linear_proj", k=64, d=24, r_hat=8, type=2, stride=1, sp=True, id="row-sharded-sp"),
    dict(kind="column", name="linear_qkv", k=24, d=64, r_hat=8, type=6, stride=1, sp=False, id="column-replicated"),
    dict(kind="row", name="linear_fc2", k=64, d=24, r_hat=8, type=6, stride=1, sp=False, id="row-replicated"),
    dict(kind="row", name="linear_fc2", k=64, d=24, r_hat=8, type=6, stride=1, sp=False, id="row-replicated-step",
         grad_sync="step"),
]
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
                "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "all_to_all_single")


def _count_collectives(case: dict, tp: int) -> tuple[dict, dict]:
    """Collective calls during one forward + backward of the base layer alone, then of the MoRA layer around it.

    Counts every ``torch.distributed`` collective, also through the aliases megatron binds at import
    (``dist_all_gather_func`` / ``dist_reduce_scatter_func``), by wrapping them for the duration.
    """
    from megatron.core.tensor_parallel import layers as mlayers
    from megatron.core.tensor_parallel import mappings as mmappings

    case = {**case, "edge": False, "fuse": True, "seed": 5}
    layer = _build(case, tp)
    if case.get("grad_sync") == "step":
        from mora_dist.parallel.layers import MoRAColumnParallelLinear, MoRARowParallelLinear

        cls = MoRARowParallelLinear if case["kind"] == "row" else MoRAColumnParallelLinear
        layer = cls(layer.base_layer, case["r_hat"], case["type"], name=case["name"], grad_sync="step")
    M, X, _ = _data(case)
    layer.set_global_M(M)
    rank = base_rank()
    if case["kind"] == "column":
        x = X.chunk(tp, 0)[rank] if case["sp"] else X
    else:
        x = X.chunk(tp, -1)[rank]
    counts: dict[str, int] = {}
    targets = [(torch.distributed, name) for name in _COLLECTIVES]
    targets += [(m, n) for m in (mlayers, mmappings) for n in ("dist_all_gather_func", "dist_reduce_scatter_func")]
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets if hasattr(owner, name)]

    def counted(fn):
        def call(*args, **kwargs):
            counts[fn.__name__] = counts.get(fn.__name__, 0) + 1
            return fn(*args, **kwargs)

        return call

    results = []
    try:
        for owner, name, fn in originals:
            setattr(owner, name, counted(fn))
        for module in (layer.base_layer, layer):
            counts.clear()
            inp = x.clone().requires_grad_(True)
            y, _ = module(inp)
            y.sum().backward()
            results.append(dict(counts))
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    return results[0], results[1]


def _switch_types(tp: int) -> tuple[str, str]:
    """ReMoRA on a sharded M: 2 -> 4 keeps the row split (allowed); 4 -> 1 (tile) would replicate it (error)."""
    case = dict(kind="column", name="linear_qkv", k=24, d=64, r_hat=8, type=2, stride=1, seed=1)
    case.update(sp=False, fuse=True, edge=False)
    layer = _build(case, tp)
    layer.set_mora_type(4)
    try:
        layer.set_mora_type(1)
    except Exception as exc:  # the parent checks type and message
        return type(exc).__name__, str(exc)
    return "", ""


_ERROR_CASES = {
    "tile_column": dict(kind="column", k=24, d=64, r_hat=8, mora_type=1),
    "uneven_row": dict(kind="row", k=56, d=20, r_hat=7, mora_type=2),
}


def _build_error(tp: int, *, kind: str, k: int, d: int, r_hat: int, mora_type: int):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from mora_dist.parallel.layers import MoRAColumnParallelLinear, MoRARowParallelLinear

    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
    if kind == "column":
        base = ColumnParallelLinear(k, d, config=config, init_method=init_normal(), bias=False)
        return MoRAColumnParallelLinear(base, r_hat, mora_type, name="blocks.0.linear_qkv", sharding="shard")
    base = RowParallelLinear(
        k, d, config=config, init_method=init_normal(), bias=False, input_is_parallel=True, skip_bias_add=False
    )
    return MoRARowParallelLinear(base, r_hat, mora_type, name="blocks.0.linear_fc2", sharding="shard")


_RESULTS: dict[int, list[dict]] = {}


def _results(tp: int) -> list[dict]:
    if tp not in _RESULTS:
        _RESULTS[tp] = restore(run_workers(_layer_worker, tp, tp, CASES, timeout_s=100))
    return _RESULTS[tp]


def _assemble(case: dict, ranks: list[dict], key: str) -> torch.Tensor:
    """The TP = 1 view of a per-rank quantity, from each rank's shard (and a check that replicas agree)."""
    tp, sp, column = len(ranks), case["sp"] and len(ranks) > 1, case["kind"] == "column"
    parts = [r[case["id"]][key] for r in ranks]
    if case["edge"] and key in ("y", "dx"):  # gathered output (column) / scattered input (row): replicated
        return _replicated(parts)
    if key == "y":
        if column:
            full = torch.empty(*parts[0].shape[:-1], case["d"])
            for t, part in enumerate(parts):
                full[..., _rows(case["d"], tp, t, case["stride"])] = part
            return full
        return torch.cat(parts, 0) if sp else _replicated(parts)
    if key == "dx":
        if column:
            return torch.cat(parts, 0) if sp else _replicated(parts)
        return torch.cat(parts, -1)
    if key == "gM":
        m_dim = ranks[0][case["id"]]["m_dim"]
        if m_dim is None:
            return _replicated(parts)
        full = torch.zeros(case["r_hat"], case["r_hat"])
        for r, part in zip(ranks, parts):
            full.index_copy_(m_dim, r[case["id"]]["m_ids"], part)
        return full
    if key in ("dW", "W", "W_eff"):
        if column:
            full = torch.empty(case["d"], case["k"], dtype=parts[0].dtype)
            for t, part in enumerate(parts):
                full[_rows(case["d"], tp, t, case["stride"])] = part
            return full
        return torch.cat(parts, 1)
    raise KeyError(key)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal to 1e-6 of the tensor's scale (fp32 sums in another order differ by a few ulp)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6 * scale, msg=what)


def _close_effective(actual: torch.Tensor, expected: torch.Tensor, W0: torch.Tensor) -> None:
    """bf16 base + residual within 2 % of a bf16 step of ``expected`` or ``W0`` (whichever is larger: where the
    update cancels ``W0`` the stored values passed through ``W0``'s scale; the residual itself is bf16). Without
    the residual the error is up to half a step per merge."""
    scale = torch.maximum(expected.abs(), W0.double().abs()).clamp_min(1e-30)
    _, exponent = torch.frexp(scale)
    step = torch.ldexp(torch.ones_like(expected), exponent - 8)
    worst = float(((actual - expected).abs() / step).max())
    assert worst <= 0.02, f"effective weight off by {worst:.3f} bf16 steps"


def _replicated(parts: list[torch.Tensor]) -> torch.Tensor:
    for part in parts[1:]:
        _close(part, parts[0], "replicas")
    return parts[0]


NO_DROPOUT = [c for c in CASES if not c["dropout"]]


@pytest.mark.parametrize("case", NO_DROPOUT, ids=[c["id"] for c in NO_DROPOUT])
def test_tp1_layer_matches_dense_oracle(case):
    """TP = 1 wrapper vs the float64 oracle: catches a wrapper that feeds the operator the wrong ids or bias."""
    (res,) = _results(1)
    M, X, G = _data(case)
    r = res[case["id"]]
    dW = reference.dense_delta(M, case["k"], case["d"], case["type"]).float()
    torch.testing.assert_close(r["dW"], dW, rtol=1e-5, atol=1e-5)
    bias = torch.randn(case["d"], generator=torch.Generator().manual_seed(case["seed"] + 7))
    torch.testing.assert_close(r["y"], X @ (r["W"] + dW).T + bias, rtol=1e-5, atol=1e-5)
    # bf16 base + residual after the merges: the float64 sum of the updates, far inside a bf16 step
    dense = reference.dense_delta(M, case["k"], case["d"], case["type"]).double()
    W_eff = r["W"].bfloat16().double() + sum(MERGE_SCALES) * dense
    _close_effective(r["W_eff"], W_eff, r["W"])


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_tp_n_equals_tp1(case, tp):
    """Outputs, input gradients, the gathered M gradient, dW shards and the global M at TP = n equal TP = 1.

    Catches: local instead of global ids (fused qkv/gated fc1 layouts), a replicated M whose gradient is not
    SUM-reduced over TP (each rank would hold a partial gradient), an adapter added after the row-parallel
    all-reduce (counted tp times), a missing input-gradient reduction of the adapter branch, and wrong
    sequence-parallel gathers; with adapter dropout (``-drop``), a mask drawn per shard (every rank the same
    pattern on its own columns or sequence chunk) instead of TP = 1's mask of the global input.
    """
    ref, ranks = _results(1)[0][case["id"]], _results(tp)
    for key in ("y", "dx", "gM", "dW", "W"):
        _close(_assemble(case, ranks, key), ref[key], key)
    _close_effective(_assemble(case, ranks, "W_eff"), ref["W_eff"], ref["W"])
    for r in ranks:
        torch.testing.assert_close(r[case["id"]]["M_back"], _data(case)[0], rtol=0, atol=0)


def test_sharding_follows_the_type():
    """M is split (no replication) exactly where the spec says it can be: interleave decompression on
    column-parallel and block-sum compression on row-parallel layers with aligned groups; rope never."""
    ranks = _results(2)
    for case in CASES:
        m_dim = ranks[0][case["id"]]["m_dim"]
        aligned = case["name"] != "uneven"
        if case["kind"] == "column":
            expected = 0 if aligned and case["type"] in (2, 4) else None
        else:
            expected = 1 if aligned and case["type"] in (2, 3) else None
        assert m_dim == expected, case["id"]


def test_type_switch_that_changes_the_split_of_m_raises():
    """``set_mora_type`` may not silently change M's shape under an optimizer: a clear ShardingError."""
    kind, msg = _results(2)[0]["errors"]["type_switch"]
    assert kind == "ShardingError"
    assert "mora_type 4 -> 1" in msg and "TP=2" in msg and "tensor_parallel_sharding='replicate'" in msg


def test_unshardable_shape_raises_clear_error():
    """``tensor_parallel_sharding='shard'`` on a shape M cannot follow names the layer, the shape, TP and a fix."""
    errors = _results(2)[0]["errors"]
    kind, msg = errors["tile_column"]
    assert kind == "ShardingError"
    assert "blocks.0.linear_qkv" in msg and "TP=2" in msg and "mora_type=1" in msg and "'auto'" in msg
    kind, msg = errors["uneven_row"]
    assert kind == "ShardingError"
    assert "in_features=56" in msg and "r_hat=" in msg and "would shard" in msg


@pytest.mark.parametrize("case", COUNT_CASES, ids=[c["id"] for c in COUNT_CASES])
def test_sharded_m_adds_no_collective_and_replicated_m_one_all_reduce(case):
    """Counted ``torch.distributed`` calls in one forward + backward at TP = 2, MoRA layer vs its base alone.
    Sharded ``M`` (interleave / block-sum with aligned groups): exactly the base layer's collectives (the
    adapter rides on its all-reduce, all-gather or reduce-scatter). Replicated ``M``: one more all-reduce (its
    gradient, in backward), none with ``tensor_parallel_grad_sync="step"`` (summed once per optimizer step)."""
    base, mora = _results(2)[0]["collectives"][case["id"]]
    assert sum(base.values()) >= 1, base  # the counter sees the base layer's own collectives
    extra = {k: mora.get(k, 0) - base.get(k, 0) for k in set(base) | set(mora)}
    expected = 1 if case["type"] == 6 and case.get("grad_sync", "backward") == "backward" else 0
    assert {k: v for k, v in extra.items() if v} == ({"all_reduce": 1} if expected else {}), (base, mora)
