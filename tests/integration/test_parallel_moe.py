"""MoRA on a megatron-core mixture-of-experts ``GPTModel`` (``SequentialMLP`` experts, shared experts, top-2 of 4)
under expert parallelism: every layout against EP = 1, TP = 1 from the same global weights, over gloo.

Layouts (world size, TP, EP, expert TP, dispatcher): 2 ranks EP = 2 (alltoall); 4 ranks EP = 2 with data
parallel 4, so each expert's ``M`` gradient is reduced over an expert data-parallel group of 2 (alltoall);
4 ranks TP = 2 x EP = 2 with expert TP 1 (alltoall) and expert TP 2 (allgather). Each run checks

- one step under megatron's DDP: per-token losses, the gradient entering layer 0's MoE block, every layer's
  (dense, shared-expert and per-expert) ``M`` gradient after DDP's reduction, and ``M`` after an Adam step;
- five steps of ReMoRA (merges at 2 and 4, types 6 -> 1) under DDP + the distributed optimizer: losses,
  gradient norms, ``||dW||`` of each merge, ``M`` and every merged expert weight at the end;
- (TP 2 x EP 2, expert TP 1 only) its ``dist_checkpointing`` checkpoint of step 3, resumed at EP = 1, TP = 1:
  steps 4 and 5 as the uninterrupted EP = 1 run.

Spec: §4, §5.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.parallel_setup import close_megatron, init_megatron, portable, restore
from tests.helpers.workers import run_workers

BATCH, SEQ, R_HAT = 4, 8, 8
# Adam's first step moves M by lr g / (|g| + eps): near |g| ~ eps it magnifies a gradient's float32 rounding (the
# layouts sum in different orders) about 1 / (4 eps) = 250 times, so M after a step is compared more loosely than
# the gradients it came from (1e-5), which already catch a dropped or doubled reduction.
POST_STEP = {"rtol": 1e-4, "atol": 1e-5}
RESUMED_LAYOUT = "tp2_ep2_etp1"  # the one layout whose step-3 checkpoint is resumed at EP 1 x TP 1
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LAYOUTS = {  # name: (world, tp, ep, etp, dispatcher)
    "ep2": (2, 1, 2, 1, "alltoall"),
    "ep2_dp4": (4, 1, 2, 1, "alltoall"),
    "tp2_ep2_etp1": (4, 2, 2, 1, "alltoall"),
    "tp2_ep2_etp2_allgather": (4, 2, 2, 2, "allgather"),
}


def _mora_layers(model):
    from mora_dist import mora_layers

    return list(mora_layers(model))


def _set_global_matrices(model, seed: int) -> None:
    """Every ``M`` set to a global random matrix drawn from its global name, so the adapters act from step 0."""
    import zlib

    for name, layer in _mora_layers(model):
        generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        layer.set_global_M(0.05 * torch.randn(R_HAT, R_HAT, generator=generator, dtype=torch.float64))


def _batch(step: int):
    ids = torch.randint(0, 64, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    return ids[:, :-1], position_ids, mask, ids[:, 1:]


def _dp_part():
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return rank, slice(rank * BATCH // dp, (rank + 1) * BATCH // dp)


def _build(layout, *, mora_type, distributed, sharding="auto"):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mora_dist import MoRAConfig, apply_mora
    from tests.helpers.moe import moe_gpt

    _, tp, ep, etp, dispatcher = layout
    model = moe_gpt(tp, ep, etp, dispatcher)
    apply_mora(model, MoRAConfig(r_hat=R_HAT, mora_type=mora_type, target_modules=TARGETS,
                                 tensor_parallel_sharding=sharding))
    _set_global_matrices(model, seed=1)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=distributed), model)
    # adam_eps near the update size: Adam's scale invariance would hide a wrong gradient scale (a doubled
    # reduction, a clip coefficient from a wrong gradient norm), and its 1/sqrt(v) would amplify float noise
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-2, adam_eps=1e-3, weight_decay=0.0, bf16=False,
                                                       use_distributed_optimizer=distributed), [ddp])
    return model, ddp, optimizer


def _global_grads(model) -> dict[str, torch.Tensor]:
    return {name: layer.get_global_M(layer.mora_M.main_grad) for name, layer in _mora_layers(model)}


def _global_matrices(model) -> dict[str, torch.Tensor]:
    return {name: layer.get_global_M() for name, layer in _mora_layers(model)}


def _expert_weights(model) -> dict[str, torch.Tensor]:
    """Every local expert's weights, TP = 1 values under their global names."""
    from megatron.core import parallel_state as ps

    from mora_dist.parallel.chunks import global_param, named_parameters

    group = ps.get_expert_tensor_parallel_group()
    return {name: global_param(p, group) for name, p in named_parameters(model).items()
            if ".local_experts." in name and name.endswith(".weight")}


def _step(ddp, optimizer, step: int, keep_input_grad: bool = False):
    from megatron.core import parallel_state as ps

    from mora_dist.parallel.mappings import finalize_model_grads
    from tests.helpers.moe import gather_sequence

    ids, pos, mask, labels = _batch(step)
    _, part = _dp_part()
    captured = {}
    hook = None
    if keep_input_grad:
        def keep(module, args):
            args[0].retain_grad()
            captured["x"] = args[0]
        hook = ddp.module.decoder.layers[0].mlp.register_forward_pre_hook(keep)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    per_token = ddp(ids[part], pos[part], mask, labels=labels[part])
    per_token.float().mean().backward()
    finalize_model_grads([ddp])
    if hook is not None:
        hook.remove()
    # the local mean's gradient: 1/dp of it is the global mean's, which DDP's averaging gives the parameters
    grad = gather_sequence(captured["x"].grad) / ps.get_data_parallel_world_size() if keep_input_grad else None
    return per_token.detach(), grad


def _remora(layout, engine_steps=0):
    from megatron.core import parallel_state as ps

    from mora_dist.parallel.mpu import MegatronMPU
    from mora_dist.training.callbacks import CallbackList, TrainerEngineView
    from mora_dist.training.remora import ReMoRACallback

    model, ddp, optimizer = _build(layout, mora_type=6, distributed=True, sharding="replicate")
    engine = TrainerEngineView(ddp, optimizer, None, engine_steps)
    engine.mpu = MegatronMPU(ps)
    callbacks = CallbackList([ReMoRACallback(merge_every=2, type_cycle=(6, 1), restart_warmup=0)])
    callbacks.on_train_begin(engine)
    return model, ddp, optimizer, engine, callbacks


def _resume_worker(folder: str):
    """Load the checkpoint a layout wrote after step 3 at EP = 1, TP = 1 and train steps 4 and 5."""
    from mora_dist.training.dist_checkpoint import load_checkpoint

    init_megatron(1)
    model, ddp, optimizer, engine, callbacks = _remora((1, 1, 1, 1, "alltoall"))
    load_checkpoint(folder, engine, callbacks)
    out = {"loaded_step": engine.global_steps, "losses": []}
    for step in range(engine.global_steps + 1, 6):
        per_token, _ = _step(ddp, optimizer, step)
        ok, _, _ = optimizer.step()
        assert ok
        engine.global_steps = step
        out["losses"].append(per_token)
        callbacks.on_step_end(engine)
    out["remora_m"], out["remora_experts"] = _global_matrices(model), _expert_weights(model)
    close_megatron()
    return portable(out)


def _worker(name: str, folder: str | None = None):
    from megatron.core import parallel_state as ps

    from mora_dist.adapters.mora import mora_state_dict
    from mora_dist.model import count_parameters
    from mora_dist.training.dist_checkpoint import save_checkpoint

    layout = LAYOUTS.get(name, (1, 1, 1, 1, "alltoall"))
    _, tp, ep, etp, _ = layout
    init_megatron(tp, ep=ep, etp=etp)
    out = {"dp_rank": _dp_part()[0], "tp_rank": ps.get_tensor_model_parallel_rank()}

    model, ddp, optimizer = _build(layout, mora_type=6, distributed=False)
    out["losses"], out["input_grad"] = _step(ddp, optimizer, 0, keep_input_grad=True)
    out["m_grads"] = _global_grads(model)
    ok, grad_norm, _ = optimizer.step()
    assert ok
    out["grad_norm"] = grad_norm
    out["m_after_step"] = _global_matrices(model)
    out["counts"] = count_parameters(model)
    out["adapter"] = mora_state_dict(model)  # what write_mora saves: every expert under its global name
    out["expert_dp"] = ps.get_expert_data_parallel_world_size()

    model, ddp, optimizer, engine, callbacks = _remora(layout)
    out["remora_losses"], out["merges"] = [], []
    out["remora_grad_norms"] = []
    for step in range(1, 6):
        per_token, _ = _step(ddp, optimizer, step)
        ok, grad_norm, _ = optimizer.step()
        assert ok
        engine.global_steps = step
        out["remora_losses"].append(per_token)
        out["remora_grad_norms"].append(grad_norm)
        metrics = callbacks.on_step_end(engine)
        if step == 3 and folder is not None:  # after the first merge, mid-cycle: moments and type must survive
            save_checkpoint(folder, engine, callbacks)
        if metrics:
            out["merges"].append((step, metrics["remora/type"], metrics["remora/delta_norm"],
                                  metrics["remora/zeroed_fraction"]))
    out["remora_m"] = _global_matrices(model)
    out["remora_experts"] = _expert_weights(model)
    # the kept cycles (for the PEFT LoRA export of a whole run): every expert on every rank
    out["cycle_layers"] = [sorted(c["matrices"]) for c in callbacks.callbacks[0].cycles]
    close_megatron()
    return portable(out)


def _assemble(results: list[dict], key: str) -> torch.Tensor:
    """A per-DP-rank batch part (``[b / dp, s]`` losses, ``[s, b / dp, h]`` gradients) made whole, from TP rank 0."""
    parts = sorted((r["dp_rank"], r[key]) for r in results if r["tp_rank"] == 0)
    dim = 1 if parts[0][1].dim() == 3 else 0
    return torch.cat([p for _, p in parts], dim)


def _union(results: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Every rank's ``{global name: tensor}`` merged; ranks that hold the same name must agree exactly."""
    merged: dict[str, torch.Tensor] = {}
    for r in results:
        for name, value in r[key].items():
            if name in merged:
                torch.testing.assert_close(value, merged[name], rtol=0, atol=0, msg=f"{key} {name}")
            merged[name] = value
    return merged


@pytest.fixture(scope="module")
def reference():
    (result,) = run_workers(_worker, 1, "reference")
    return restore(result)


def _close(actual, expected, what: str, rtol: float = 1e-5, atol: float = 1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_matches_ep1_tp1(reference, name, tmp_path):
    """Outputs, the input gradient of the MoE block, every ``M`` gradient (dense, shared expert, each expert),
    the gradient norm and ``M`` after a step match EP = 1, TP = 1, and so do the parameter counts and the adapter
    file's tensors; so do five ReMoRA steps under the distributed optimizer with two merges into the experts'
    weights (losses, ``||dW||``, ``M`` and merged expert weights). A dropped or doubled expert-data-parallel
    reduction changes the expert ``M`` gradients (``ep2_dp4``: expert DP = 2); a merge that reset expert ``M`` or
    its Adam moments on one rank only changes the step after the merge. The checkpoint written after step 3
    resumes at EP = 1, TP = 1 onto the same steps 4 and 5 (a lost expert shard of ``M``, of its moments or of the
    merge residual, or experts renumbered by rank, would change them): checked for the layout that reshards the
    most (dense TP 2 -> 1 beside EP 2 -> 1 at expert TP 1), once, to keep the suite's time."""
    folder = str(tmp_path / "step3") if name == RESUMED_LAYOUT else None
    results = [restore(r) for r in run_workers(_worker, LAYOUTS[name][0], name, folder)]
    ref = reference
    if name == "ep2_dp4":
        assert all(r["expert_dp"] == 2 for r in results)
    _close(_assemble(results, "losses"), ref["losses"], "per-token losses")
    _close(_assemble(results, "input_grad"), ref["input_grad"], "gradient into layer 0's MoE block")
    grads = _union(results, "m_grads")
    assert set(grads) == set(ref["m_grads"])
    experts = [n for n in grads if ".local_experts.3." in n]
    assert experts and any(".shared_experts." in n for n in grads)
    for key in ref["m_grads"]:
        assert ref["m_grads"][key].abs().max() > 0, key
        _close(grads[key], ref["m_grads"][key], f"M gradient of {key}")
    for r in results:  # every rank has the whole model's counts and adapter file, as at EP = 1
        assert r["counts"] == ref["counts"]
        assert set(r["adapter"]) == set(ref["adapter"])
        for key, value in r["adapter"].items():
            _close(value, ref["adapter"][key], f"adapter tensor {key}", **POST_STEP)
    for r in results:  # megatron's clip coefficient: every expert M counted once, whatever the dense TP rank
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert r["remora_grad_norms"] == pytest.approx(ref["remora_grad_norms"], rel=1e-5)
    for key, value in _union(results, "m_after_step").items():
        _close(value, ref["m_after_step"][key], f"M after one step of {key}", **POST_STEP)

    for r in results:
        assert r["cycle_layers"] == ref["cycle_layers"] and len(ref["cycle_layers"]) == 2
        assert [m[:2] for m in r["merges"]] == [(2, 6.0), (4, 1.0)] and all(m[3] == 1.0 for m in r["merges"])
        for mine, theirs in zip(r["merges"], ref["merges"], strict=True):
            assert mine[2] == pytest.approx(theirs[2], rel=1e-5)
    for step, (mine, theirs) in enumerate(zip(_assemble_steps(results), ref["remora_losses"], strict=True), 1):
        _close(mine, theirs, f"ReMoRA loss at step {step}")
    for key, value in _union(results, "remora_m").items():
        _close(value, ref["remora_m"][key], f"M after ReMoRA of {key}")
    merged = _union(results, "remora_experts")
    assert set(merged) == set(ref["remora_experts"])
    for key, value in merged.items():
        _close(value, ref["remora_experts"][key], f"merged expert weight {key}")

    if folder is None:
        return
    (resumed,) = run_workers(_resume_worker, 1, folder)
    resumed = restore(resumed)
    assert resumed["loaded_step"] == 3
    for step, (mine, theirs) in enumerate(zip(resumed["losses"], ref["remora_losses"][3:], strict=True), 4):
        _close(mine, theirs, f"loss at step {step} resumed at EP 1 x TP 1")
    for key in ("remora_m", "remora_experts"):
        assert set(resumed[key]) == set(ref[key])
        for k, value in resumed[key].items():
            _close(value, ref[key][k], f"{k} resumed at EP 1 x TP 1")


def _assemble_steps(results: list[dict]) -> list[torch.Tensor]:
    steps = len(results[0]["remora_losses"])
    return [_assemble([{**r, "x": r["remora_losses"][i]} for r in results], "x") for i in range(steps)]


def _refusals_worker(etp: int):
    """The MoRAConfigError messages of the combinations not covered yet (each on a fresh model)."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    from mora_dist import MoRAConfig, apply_mora
    from mora_dist.errors import MoRAConfigError
    from tests.helpers.moe import moe_gpt

    init_megatron(1, etp=etp)
    config = MoRAConfig(r_hat=R_HAT, target_modules=TARGETS)
    errors = {}

    def attempt(key, model, cfg=config):
        try:
            apply_mora(model, cfg)
        except MoRAConfigError as exc:
            errors[key] = str(exc)
        else:
            errors[key] = None

    if etp > 1:
        attempt("expert_tp", moe_gpt(1, 1, etp))
        close_megatron()
        return errors
    for field, value in (("moe_token_dispatcher_type", "flex"), ("moe_shared_expert_overlap", True)):
        model = moe_gpt(1, 1, 1)
        setattr(model.config, field, value)
        attempt(field, model)
    # GroupedMLP needs the grouped_gemm kernels to build; the refusal reads only its class and place
    model = moe_gpt(1, 1, 1)
    grouped = GroupedMLP.__new__(GroupedMLP)
    torch.nn.Module.__init__(grouped)
    model.decoder.layers[1].mlp.experts = grouped
    attempt("grouped", model)
    errors["after_refusal"] = type(model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc1).__name__
    attempt("grouped_excluded", model, MoRAConfig(r_hat=R_HAT, target_modules=TARGETS,
                                                  exclude_modules=["*layers.1.mlp.experts*"]))
    errors["adapted"] = type(model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc1).__name__
    attempt("expert_to_save", moe_gpt(1, 1, 1), MoRAConfig(r_hat=R_HAT, target_modules=TARGETS,
                                                           modules_to_save=["*local_experts.1.linear_fc2"]))
    close_megatron()
    return errors


@pytest.mark.slow
def test_unsupported_moe_layouts_are_refused_by_name():
    """Grouped-GEMM experts (unless excluded), a token dispatcher other than alltoall/allgather, overlapped shared
    experts, an expert module in ``modules_to_save``, and an expert TP size that is neither 1 nor the dense TP
    size raise a ``MoRAConfigError`` naming the option, before any layer is wrapped."""
    (errors,) = run_workers(_refusals_worker, 1, 1)
    assert "moe_token_dispatcher_type='flex'" in errors["moe_token_dispatcher_type"]
    assert "moe_shared_expert_overlap=True" in errors["moe_shared_expert_overlap"]
    assert "decoder.layers.1.mlp.experts: GroupedMLP" in errors["grouped"]
    assert "moe_grouped_gemm=False" in errors["grouped"]
    assert errors["grouped_excluded"] is None
    assert errors["after_refusal"] == "ColumnParallelLinear"  # refused before any layer was wrapped
    assert errors["adapted"] == "MoRAColumnParallelLinear"  # the run that excludes them adapts layer 0's experts
    assert "modules_to_save: 'decoder.layers.0.mlp.experts.local_experts.1.linear_fc2' holds megatron-core expert" \
        in errors["expert_to_save"]
    (errors, _) = run_workers(_refusals_worker, 2, 2)
    assert "expert_tensor_parallel_size=2 with tensor_model_parallel_size=1" in errors["expert_tp"]


def _layout_worker(layouts):
    from megatron.core import parallel_state as ps

    out = []
    for i, (tp, ep, etp) in enumerate(layouts):
        if i == 0:  # the process group too
            init_megatron(tp, ep=ep, etp=etp)
        else:
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                         expert_tensor_parallel_size=etp)
        out.append({"rank": torch.distributed.get_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
                    "dp_rank": ps.get_data_parallel_rank(), "etp_rank": ps.get_expert_tensor_parallel_rank(),
                    "ep_rank": ps.get_expert_model_parallel_rank(), "edp_rank": ps.get_expert_data_parallel_rank()})
        close_megatron()
    return out


@pytest.mark.slow
def test_check_expert_layout_is_megatrons():
    """``--check``'s expert layout (:func:`mora_dist.run.plan.expert_ranks`) is the one megatron-core's
    parallel state builds on 4 ranks (TP 2 x EP 2, expert TP 1 and 2): dense TP / DP ranks, expert TP, EP and
    expert DP ranks."""
    from mora_dist.run.plan import expert_ranks

    layouts = [(2, 2, 1), (2, 2, 2)]
    got = run_workers(_layout_worker, 4, layouts)
    for i, (tp, ep, etp) in enumerate(layouts):
        planned = [{k: v for k, v in r.items() if k not in ("first_expert", "experts")}
                   for r in expert_ranks(4, tp, ep, etp, num_experts=4)]
        assert [rank[i] for rank in got] == planned, (tp, ep, etp)
