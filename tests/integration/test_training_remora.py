"""ReMoRA and ReLoRA callbacks on real DeepSpeed engines (2 processes over gloo), ZeRO 0-3, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from mora_dist.errors import MoRAConfigError
from mora_dist.merge import full_residual
from mora_dist.training.remora import (
    ReLoRACallback,
    ReMoRACallback,
    parse_optimizer_reset,
    prune_moment,
)
from tests.helpers.workers import patch_deepspeed_for_cpu, run_workers

LR = 1e-2
VOCAB = 96


def _init():
    import torch.distributed as dist

    patch_deepspeed_for_cpu()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank()


def _build_engine(*, stage, bf16, adapter="mora", scheduler=None, persistence=None, seed=0, model="llama"):
    import deepspeed

    from mora_dist import MoRAConfig, apply_mora
    from mora_dist.lora import apply_lora
    from tests.helpers.models import tiny_llama, tiny_moe

    torch.manual_seed(seed)
    model = tiny_llama() if model == "llama" else tiny_moe(model).train()
    if adapter == "mora":
        apply_mora(model, MoRAConfig(r=4, target_modules="all-linear", mora_type=1))
    else:
        apply_lora(model, ["q_proj", "v_proj", "up_proj", "down_proj"], r=4, lora_alpha=8)
    zero = {"stage": stage}
    if stage == 3 and persistence is not None:
        zero["stage3_param_persistence_threshold"] = persistence
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config, lr_scheduler=scheduler)
    if bf16:  # as the launcher: each rank keeps the merge residual of its 1/N slice of every weight
        from mora_dist import shard_residuals

        shard_residuals(engine.module, engine.seq_data_parallel_group)
    return engine


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


EVAL_IDS = torch.arange(24).reshape(2, 12) % VOCAB


def _train_step(engine, step, rank):
    ids = _batch(step, rank)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return float(loss.detach().float())


@torch.no_grad()
def _logits(engine):
    return engine(input_ids=EVAL_IDS).logits.float().clone()


def _module_value(p):
    from mora_dist.training.optimizer_state import deepspeed as zero_state

    with zero_state.gathered([p]):
        return p.detach().float().clone()


def _first_layer(engine):
    return next(layer for name, layer in _checked_layers(engine))


def _checked_layers(engine):
    """The MoRA layers in model order, an MoE's expert projections first (the layer the merge test follows)."""
    from mora_dist.model import mora_layers

    layers = list(mora_layers(engine.module))
    return [x for x in layers if ".experts." in x[0]] + [x for x in layers if ".experts." not in x[0]]


class _PinnedRouting:
    """Replays each experts block's routing (``top_k_index``, ``top_k_weights``) of the first forward in later
    ones. The bf16 rounding of a merge moves the hidden states by a few ulps, and where two experts are nearly tied
    that flips a top-k choice (seen on gpt-oss under ZeRO-3), changing the output by O(1) with no error in the
    merge; with the routing pinned the output difference is the merge's own."""

    def __init__(self, module):
        from mora_dist.experts import MoRAExpertsMixin

        self.saved = {}
        self.handles = [block.register_forward_pre_hook(self._hook) for block in module.modules()
                        if isinstance(block, MoRAExpertsMixin)]

    def _hook(self, block, args):
        hidden, *routing = args
        return (hidden, *self.saved.setdefault(id(block), routing))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _merge_case(stage, bf16, persistence, rank, model="llama"):
    """Train 4 steps, merge at 4, step once more; returns what the parent asserts."""
    from mora_dist.training.callbacks import CallbackList
    from mora_dist.training.optimizer_state import deepspeed as zero_state

    engine = _build_engine(stage=stage, bf16=bf16, persistence=persistence, model=model)
    cb = ReMoRACallback(merge_every=4, type_cycle=(1, 2), restart_warmup=0)
    callbacks = CallbackList([cb])
    callbacks.on_train_begin(engine)
    layer = _first_layer(engine)
    M, W = layer.mora_M, layer._base_weight_shard()
    out = {}
    for step in range(1, 4):
        _train_step(engine, step, rank)
        assert not callbacks.on_step_end(engine)
    _train_step(engine, 4, rank)
    routing = _PinnedRouting(engine.module)
    before = _logits(engine)
    master = zero_state.get_full(engine.optimizer, M)
    module_M = _module_value(M)
    out["M_old_max"] = float(master.abs().max())
    out.update(_export_from_master(engine, layer, rank))
    out["M_module_vs_master"] = float((module_M - master).abs().max())  # > 0 in bf16: the copies differ
    out["M_module_dtype"] = str(M.dtype)  # DeepSpeed casts every parameter: bf16 despite mora_dtype=float32
    W_before = _module_value(W).double()
    expected_W = (W_before.float() + layer.delta_weight(master).float()).to(W.dtype).float()
    exact = {"master": W_before + layer.delta_weight(master).double(),
             "module": W_before + layer.delta_weight(module_M).double()}
    metrics = callbacks.on_step_end(engine)
    residual = full_residual(layer)
    out["residual_dtype"] = None if residual is None else str(residual.dtype)
    effective = _module_value(W).double() + (0.0 if residual is None else residual.double())
    for source, value in exact.items():  # W + residual is the fp32 sum of the update from the master
        out[f"effective_err_{source}"] = float((effective - value).abs().max())
    after = _logits(engine)
    routing.remove()
    out["metrics"] = metrics
    out["out_diff"] = float((after - before).abs().max())
    out["out_scale"] = float(before.abs().max())
    out["M_module_max"] = float(_module_value(M).abs().max())
    out["M_master_max"] = float(zero_state.get_full(engine.optimizer, M).abs().max())
    keys = zero_state.state_keys(engine.optimizer, M)
    out["moment_keys"] = keys
    out["moments_max"] = max(float(zero_state.get_full(engine.optimizer, M, k).abs().max()) for k in keys)
    out["type_after"] = layer.mora_type
    out["W_merge_err"] = float((_module_value(W) - expected_W).abs().max())
    _train_step(engine, 5, rank)
    out["M_step_max"] = float(zero_state.get_full(engine.optimizer, M).abs().max())
    out["M_step_module_max"] = float(_module_value(M).abs().max())
    merged_W = _module_value(W)
    for step in (6, 7):
        _train_step(engine, step, rank)
        callbacks.on_step_end(engine)
    out["W_persist_err"] = float((_module_value(W) - merged_W).abs().max())
    out["cycle_err"] = float((cb.cycles[0]["matrices"][_first_name(engine)] - out.pop("master")).abs().max())
    return out


def _first_name(engine):
    return _checked_layers(engine)[0][0]


def _export_from_master(engine, layer, rank):
    """``save_mora(format="peft-lora", optimizer=...)`` writes ``B = D M`` from the fp32 master (spec §2.5)."""
    import shutil
    import tempfile

    from safetensors.torch import load_file

    from mora_dist import save_mora
    from mora_dist.operators import lora_factors
    from mora_dist.training.optimizer_state import deepspeed as zero_state

    master = zero_state.get_full(engine.optimizer, layer.mora_M)
    folder = tempfile.mkdtemp()
    save_mora(engine.module, f"{folder}/lora", format="peft-lora", optimizer=engine.optimizer)
    out = {"master": master, "master_vs_module": float((master - _module_value(layer.mora_M)).abs().max())}
    if rank == 0:
        name = _first_name(engine)
        if ".experts." in name:  # gate_up_proj: the inner of PEFT's two nested wrappers; B: (d, R E), expert 0
            key = f"base_model.model.{name.replace('.mora.gate_up_proj', '.base_layer')}.lora_B.weight"
            B = load_file(f"{folder}/lora/adapter_model.safetensors")[key]
            B = B.reshape(B.shape[0], -1, layer.num_experts)[:, : layer.r_hat, 0]
            expected = lora_factors(master[0], layer.in_features, layer.out_features, layer.mora_type)[1]
        else:
            key = f"base_model.model.{name}.lora_B.weight"
            B = load_file(f"{folder}/lora/adapter_model.safetensors")[key][:, : layer.r_hat]
            expected = lora_factors(master, layer.in_features, layer.out_features, layer.mora_type)[1]
        out["export_err"] = float((B - expected).abs().max())
    shutil.rmtree(folder)
    return out


def _merge_matrix_worker(cases, model="llama"):
    rank = _init()
    return {f"zero{stage}-{'bf16' if bf16 else 'fp32'}-persist{persistence}":
            _merge_case(stage, bf16, persistence, rank, model) for stage, bf16, persistence in cases}


def _check_merge_results(results):
    for rank_result in results:
        for name, r in rank_result.items():
            bf16 = "bf16" in name
            m = r["metrics"]
            assert m["remora/merges"] == 1.0 and m["remora/type"] == 1.0 and m["remora/next_type"] == 2.0, (name, m)
            assert m["remora/zeroed_fraction"] == 1.0, (name, m)
            assert m["remora/delta_norm"] > 0 and m["remora/merge_seconds"] >= 0, (name, m)
            tol = 2e-2 * max(1.0, r["out_scale"]) if bf16 else 1e-5
            assert r["out_diff"] <= tol, (name, r["out_diff"], tol)
            assert r["M_module_max"] == 0.0 and r["M_master_max"] == 0.0, (name, r)
            assert set(r["moment_keys"]) >= {"exp_avg", "exp_avg_sq"} and r["moments_max"] == 0.0, (name, r)
            assert r["type_after"] == 2, name
            assert r["W_merge_err"] == 0.0, (name, r["W_merge_err"])
            if bf16:  # the merge read the fp32 master, not the bf16 module copy, and kept the residual
                assert r["M_module_vs_master"] > 0, (name, r)
                assert r["M_module_dtype"] == "torch.bfloat16", (name, r)  # what the README says holds
                assert r["residual_dtype"] == "torch.bfloat16", (name, r)
                assert r["effective_err_master"] <= 0.01 * r["effective_err_module"], (name, r)
                assert 0 < m["remora/merge_residual"] < 1, (name, m)
            else:
                assert r["residual_dtype"] is None and m["remora/merge_residual"] == 0.0, (name, r, m)
            # One AdamW step from zero moments moves each entry by at most lr; the old M was several steps big.
            assert r["M_old_max"] > 1.5 * LR, (name, r["M_old_max"])
            assert 0 < r["M_step_max"] <= LR * 1.001, (name, r["M_step_max"])
            assert r["M_step_module_max"] <= LR * 1.01, (name, r)
            assert r["W_persist_err"] == 0.0, (name, r["W_persist_err"])
            # The kept cycle and the PEFT export read the fp32 master, which differs from a bf16 module copy.
            assert r["cycle_err"] == 0.0 and r.get("export_err", 0.0) == 0.0, (name, r)
            assert (r["master_vs_module"] > 0) == bf16, (name, r["master_vs_module"])


def test_merge_resets_every_copy_fp32_all_zero_stages():
    """After a merge the model computes the same function, M is zero in the module and the fp32 master, its
    moments are zero, and one step later M is a single update from zero. Catches the bug of the authors' ZeRO-2
    run (only the module copy is reset, the master copies the old M back and the update is counted twice) and
    a ZeRO-3 merge into a partition that is lost or overwritten at the next step (W checked two steps later), with
    the base weight really partitioned (persistence threshold 0) and kept whole on every rank (default)."""
    cases = [(0, False, None), (1, False, None), (2, False, None), (3, False, 0), (3, False, None)]
    _check_merge_results(run_workers(_merge_matrix_worker, 2, cases))


def test_merge_resets_every_copy_bf16_all_zero_stages():
    """The same in bf16, where the module copy is bf16 and the fp32 master lives in DeepSpeed's flat buffers
    (FP16 unfused optimizer at stage 0, ZeRO 1-3); the output after the merge matches within bf16 rounding of W.
    Also catches a merge that reads the bf16 module copy of M instead of the fp32 master (W + residual would
    then hold the module copy's dW) and one that drops what bf16 cannot hold (``remora/merge_residual``)."""
    cases = [(0, True, None), (1, True, None), (2, True, None), (3, True, 0)]
    _check_merge_results(run_workers(_merge_matrix_worker, 2, cases))


def test_expert_matrices_merge_and_reset_in_every_copy_all_zero_stages():
    """The same for MoRA on a Mixtral's fused experts (M: (E, r_hat, r_hat)), with ZeRO-3 partitioning the 3-D
    expert weight (persistence threshold 0): every expert's dW is folded from the fp32 master into the gathered
    weight, kept two steps later, and M, its master and its moments are zero after the merge."""
    cases = [(0, False, None), (2, False, None), (3, False, 0), (2, True, None), (3, True, 0)]
    _check_merge_results(run_workers(_merge_matrix_worker, 2, cases, "mixtral"))


@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_expert_matrices_merge_and_reset_on_every_moe_architecture(kind):
    """The merge/reset contract on the other fused-expert layouts under ZeRO-2 fp32 and ZeRO-3 bf16 with the
    experts partitioned: gpt-oss's transposed weights with biases, Qwen2-MoE's gated shared expert, DeepSeek-V3's
    grouped router with shared experts, OLMoE's and Qwen3-MoE's normalised top-k."""
    _check_merge_results(run_workers(_merge_matrix_worker, 2, [(2, False, None), (3, True, 0)], kind))


def _resume_worker(ckpt_dir):
    from mora_dist.training.callbacks import CallbackList
    from mora_dist.training.schedulers import JaggedCosineLR

    rank = _init()

    def scheduler(opt):
        return JaggedCosineLR(opt, total_steps=12, first_warmup=2, restart_warmup=2, cycle_length=4)

    def run(engine, callbacks, steps, save_at=None):
        record = {}
        for step in steps:
            loss = _train_step(engine, step, rank)
            callbacks.on_step_end(engine)
            record[step] = (loss, engine.get_lr()[0])
            if step == save_at:
                callbacks.save_checkpoint(engine, ckpt_dir, tag=f"step{step}")
        return record

    engine = _build_engine(stage=2, bf16=False, scheduler=scheduler)
    first = ReMoRACallback(merge_every=4, type_cycle=(1, 2), restart_warmup=2)
    callbacks = CallbackList([first])
    callbacks.on_train_begin(engine)
    full = run(engine, callbacks, range(1, 13), save_at=6)
    W_full = _module_value(_first_layer(engine)._base_weight_shard())

    # Roll the same, already stepped engine back to step 6 (in-process recovery): DeepSpeed re-links the ZeRO-2
    # fragments on load without their optimizer state; the merge at 8 must still reset the loaded moments.
    rollback = CallbackList([ReMoRACallback(merge_every=4, type_cycle=(1, 2), restart_warmup=2)])
    rollback.load_checkpoint(engine, ckpt_dir, tag="step6")
    rolled = run(engine, rollback, range(7, 13))

    # A fresh engine built from another seed: base weights, M, moments, schedule and callback state must all
    # come from the checkpoint. Resuming at 6 replays the merges at 8 and 12, which the first run also did.
    engine = _build_engine(stage=2, bf16=False, scheduler=scheduler, seed=1)
    second = ReMoRACallback(merge_every=4, type_cycle=(1, 2), restart_warmup=2)
    callbacks = CallbackList([second])
    callbacks.load_checkpoint(engine, ckpt_dir, tag="step6")
    callbacks.on_train_begin(engine)
    resumed_state = {"global_steps": engine.global_steps, "type": _first_layer(engine).mora_type,
                     "merged_steps": list(second.merged_steps)}
    resumed = run(engine, callbacks, range(7, 13))
    repeat = callbacks.on_step_end(engine)
    W_resumed = _module_value(_first_layer(engine)._base_weight_shard())
    return {"full": full, "resumed": resumed, "rolled": rolled, "resumed_state": resumed_state, "repeat": repeat,
            "merged_full": first.merged_steps, "merged_resumed": second.merged_steps,
            "W_diff": float((W_full - W_resumed).abs().max()), "type_end": _first_layer(engine).mora_type}


def test_resume_mid_cycle_reproduces_uninterrupted_run(tmp_path):
    """12 steps, merges every 4, checkpoint at 6: a run resumed from 6 (fresh engine, other seed) reproduces steps
    7-12 and merges 8 and 12 exactly once; so does the first engine rolled back to step 6 in-process. The
    checkpoint at 6 stands for a crash after the merge at 8 and before the next checkpoint: the merge at 8 is
    replayed once from the pre-merge W and M. Catches callback state or type not restored, a schedule that does
    not resume, a merge replayed twice or skipped, and DeepSpeed 0.19 dropping ZeRO-2's optimizer-state links when
    a stepped engine loads a checkpoint (the reset at step 8 would fail)."""
    results = run_workers(_resume_worker, 2, str(tmp_path))
    for r in results:
        assert r["resumed_state"] == {"global_steps": 6, "type": 2, "merged_steps": [4]}
        assert r["merged_full"] == [4, 8, 12] and r["merged_resumed"] == [4, 8, 12]
        assert r["repeat"] in (None, {})
        for step in range(7, 13):
            loss_full, lr_full = r["full"][step]
            for kind in ("resumed", "rolled"):
                loss_resumed, lr_resumed = r[kind][step]
                assert abs(loss_full - loss_resumed) <= 1e-6, (kind, step, loss_full, loss_resumed)
                assert lr_full == pytest.approx(lr_resumed, abs=1e-12), (kind, step)
        assert r["W_diff"] <= 1e-6
        # get_lr() after step n is the rate of step n + 1: the step after each merge starts the restart warmup.
        assert r["full"][4][1] == 0.0 and r["full"][8][1] == 0.0 and r["full"][5][1] > 0.0
        assert r["type_end"] == 2  # 1 -> 2 at step 4, -> 1 at 8, -> 2 at 12


def _relora_worker(cases):
    from mora_dist.lora import lora_layers
    from mora_dist.training.callbacks import CallbackList
    from mora_dist.training.optimizer_state import deepspeed as zero_state

    rank = _init()
    out = {}
    for stage, bf16, reset in cases:
        engine = _build_engine(stage=stage, bf16=bf16, adapter="lora", persistence=0 if stage == 3 else None)
        cb = ReLoRACallback(merge_every=3, optimizer_reset=reset, restart_warmup=0, seed=7)
        callbacks = CallbackList([cb])
        callbacks.on_train_begin(engine)
        layer = next(iter(lora_layers(engine.module)))[1]
        A, B = layer.lora_A, layer.lora_B
        for step in range(1, 4):
            _train_step(engine, step, rank)
            if step < 3:
                callbacks.on_step_end(engine)
        before = _logits(engine)
        A_old = _module_value(A)
        metrics = callbacks.on_step_end(engine)
        after = _logits(engine)
        r = {
            "metrics": metrics,
            "out_diff": float((after - before).abs().max()),
            "B_module": float(_module_value(B).abs().max()),
            "B_master": float(zero_state.get_full(engine.optimizer, B).abs().max()),
            "A_master_vs_module": float((zero_state.get_full(engine.optimizer, A) - _module_value(A)).abs().max()),
            "A_changed": float((_module_value(A) - A_old).abs().max()),
            "A_sum": float(zero_state.get_full(engine.optimizer, A).double().sum()),
        }
        _train_step(engine, 4, rank)
        r["B_step_max"] = float(zero_state.get_full(engine.optimizer, B).abs().max())
        out[f"zero{stage}-{'bf16' if bf16 else 'fp32'}-{reset if isinstance(reset, str) else reset['method']}"] = r
    return out


def test_relora_restart_reinitialises_A_zeroes_B_and_prunes_moments():
    """ReLoRA baseline: after a restart the function is unchanged, B is zero and A is the new kaiming draw in the
    module and in the fp32 master (identical on both ranks), and the moments are pruned by the asked ratio.
    Catches an A re-drawn only in the module (the master would copy the old A back) and rank-dependent draws."""
    cases = [(1, False, {"method": "random", "ratio": 0.999}), (3, True, {"method": "magnitude", "ratio": 0.9})]
    results = run_workers(_relora_worker, 2, cases)
    for rank_result in results:
        for name, r in rank_result.items():
            bf16 = "bf16" in name
            assert r["out_diff"] <= (2e-2 if bf16 else 1e-5), (name, r["out_diff"])
            assert r["B_module"] == 0.0 and r["B_master"] == 0.0, (name, r)
            assert r["A_master_vs_module"] <= (4e-3 if bf16 else 0.0), (name, r)
            assert r["A_changed"] > 1e-2, name
            assert 0 < r["B_step_max"], name
            fraction = r["metrics"]["relora/zeroed_fraction"]
            if "random" in name:
                assert fraction >= 0.99, (name, fraction)
            else:
                assert 0.89 <= fraction <= 0.95, (name, fraction)
            assert r["metrics"]["relora/merges"] == 1.0
    for name in results[0]:
        assert results[0][name]["A_sum"] == results[1][name]["A_sum"], name


# In-process checks (no DeepSpeed engine): configuration errors, pruning, the merge guard, a plain torch optimizer.


def _plain_setup(*, merge_every=2, restart_warmup=0, scheduler=None, mora_type=1):
    from mora_dist import MoRAConfig, apply_mora
    from mora_dist.training.callbacks import TrainerEngineView
    from tests.helpers.models import tiny_llama

    model = apply_mora(tiny_llama(), MoRAConfig(r=4, target_modules="all-linear", mora_type=mora_type))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    engine = TrainerEngineView(model, optimizer, scheduler(optimizer) if scheduler else None, 0)
    return model, engine


def _plain_step(model, engine, step):
    ids = _batch(step, 0)
    model(input_ids=ids, labels=ids).loss.backward()
    engine.optimizer.step()
    engine.optimizer.zero_grad()
    engine.global_steps = step


@pytest.mark.parametrize(
    ("value", "expected"),
    [("full", ("full", 1.0)), ({"method": "random", "ratio": 0.999}, ("random", 0.999)),
     ({"method": "magnitude"}, ("magnitude", 0.9))],
)
def test_parse_optimizer_reset_accepts_full_random_magnitude(value, expected):
    assert parse_optimizer_reset(value) == expected


@pytest.mark.parametrize(
    ("value", "needle"),
    [("zero", "'zero'"), ({"method": "random", "ratio": 1.5}, "1.5"), ({"method": "full", "ratio": 0.5}, "0.5"),
     ({"method": "random", "fraction": 0.5}, "fraction")],
)
def test_parse_optimizer_reset_rejects_bad_values_naming_them(value, needle):
    with pytest.raises(MoRAConfigError, match=needle):
        parse_optimizer_reset(value)


def test_prune_moment_zeroes_the_asked_fraction():
    value = torch.randn(200, 50)
    g = torch.Generator().manual_seed(0)
    assert prune_moment(value, "full", 1.0, g).abs().max() == 0
    random = prune_moment(value, "random", 0.9, g)
    assert 0.87 <= float((random == 0).float().mean()) <= 0.93
    assert torch.equal(random[random != 0], value[random != 0])  # survivors keep their value
    magnitude = prune_moment(value, "magnitude", 0.9, g)
    kept = magnitude != 0
    assert abs(float(kept.float().mean()) - 0.1) < 1e-3
    assert value[kept].abs().min() >= value[~kept].abs().max()  # the largest entries survive


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"merge_every": 0}, "merge_every=0"), ({"merge_every": 10, "restart_warmup": 10}, "restart_warmup=10"),
     ({"type_cycle": ()}, "type_cycle"), ({"type_cycle": (1, 5)}, "type_cycle=5"),
     ({"type_cycle": 1}, "type_cycle=1")],
)
def test_remora_callback_rejects_bad_settings_naming_them(kwargs, needle):
    with pytest.raises(MoRAConfigError, match=needle):
        ReMoRACallback(**kwargs)


def test_remora_callback_checks_model_type_and_scheduler_before_training():
    """A model built with a type other than the cycle's first, or a schedule that does not restart where the
    callback merges, is refused at on_train_begin (the merges and LR restarts would silently drift apart)."""
    from mora_dist.training.schedulers import JaggedCosineLR

    _, engine = _plain_setup(mora_type=2)
    with pytest.raises(MoRAConfigError, match="mora_type=2"):
        ReMoRACallback(merge_every=2, restart_warmup=0).on_train_begin(engine)
    _, engine = _plain_setup()
    with pytest.raises(MoRAConfigError, match="needs a restarting scheduler"):
        ReMoRACallback(merge_every=4, restart_warmup=1).on_train_begin(engine)
    _, engine = _plain_setup(scheduler=lambda opt: JaggedCosineLR(
        opt, total_steps=12, first_warmup=2, restart_warmup=1, cycle_length=6))
    with pytest.raises(MoRAConfigError, match="cycle_length=6"):
        ReMoRACallback(merge_every=4, restart_warmup=1).on_train_begin(engine)
    _, engine = _plain_setup(mora_type=1)  # k_proj (48 -> 24) gets r_hat=17, odd: RoPE type 6 needs it even
    with pytest.raises(MoRAConfigError, match="k_proj' cannot use type 6"):
        ReMoRACallback(merge_every=2, type_cycle=(1, 6), restart_warmup=0).on_train_begin(engine)


def test_merge_with_plain_torch_optimizer_runs_once_per_step_and_refuses_early_save():
    """Without DeepSpeed (plain AdamW, as in a Trainer run): the merge keeps the function, zeroes M and its moments
    and switches type; calling on_step_end again at the same step (gradient accumulation, a double call) does not
    merge twice; saving at a merge step before on_step_end ran is refused."""
    from mora_dist.model import mora_layers
    from mora_dist.training.callbacks import CallbackList

    model, engine = _plain_setup()
    cb = ReMoRACallback(merge_every=2, type_cycle=("sharing", "sharing_block"), restart_warmup=0)
    callbacks = CallbackList([cb])
    callbacks.on_train_begin(engine)
    _plain_step(model, engine, 1)
    assert callbacks.on_step_end(engine) == {}
    _plain_step(model, engine, 2)
    with pytest.raises(MoRAConfigError, match="before the merge due"):
        callbacks.on_save(engine, {})
    with torch.no_grad():
        before = model(input_ids=EVAL_IDS).logits
    metrics = callbacks.on_step_end(engine)
    with torch.no_grad():
        after = model(input_ids=EVAL_IDS).logits
    assert metrics["remora/merges"] == 1 and metrics["remora/zeroed_fraction"] == 1.0
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for _, layer in mora_layers(model):
        assert layer.mora_M.abs().max() == 0 and layer.mora_type == 2
        state = engine.optimizer.state[layer.mora_M]
        assert state["exp_avg"].abs().max() == 0 and state["exp_avg_sq"].abs().max() == 0
    assert callbacks.on_step_end(engine) == {}
    assert cb.merged_steps == [2]
    callbacks.on_save(engine, {})
    state = cb.state_dict()
    cycles = state.pop("cycles")
    assert state == {"merge_every": 2, "merged_steps": [2], "last_merged_step": 2, "step_in_cycle": 0,
                     "type_cycle": [1, 2], "type_index": 1}
    assert cb.current_type == 2  # read from the cycle position: the state stores no second copy of the type
    assert [(c["step"], c["mora_type"]) for c in cycles] == [(2, 1)]
    assert set(cycles[0]["matrices"]) == {name for name, _ in mora_layers(model)}


def test_load_state_dict_refuses_a_different_cadence_or_cycle():
    state = ReMoRACallback(merge_every=4, type_cycle=(1, 2), restart_warmup=0).state_dict()
    with pytest.raises(MoRAConfigError, match="merge_every=8"):
        ReMoRACallback(merge_every=8, type_cycle=(1, 2), restart_warmup=0).load_state_dict(state)
    with pytest.raises(MoRAConfigError, match=r"type_cycle=\(1, 2, 3, 4\)"):
        ReMoRACallback(merge_every=4, type_cycle=(1, 2, 3, 4), restart_warmup=0).load_state_dict(state)
