"""A tiny megatron-core ``GPTModel`` (local spec, GQA, SwiGLU, RoPE) with MoRA on ``linear_qkv``, ``linear_proj``,
``linear_fc1`` and ``linear_fc2``, trained, saved, reloaded and merged at TP = 1, 2 and 4 over gloo.

Three launches: TP = 2 trains (types 6 and 2), writes adapter files and a megatron ``dist_checkpointing``
checkpoint, and merges; TP = 1 trains the same and reads both checkpoints; TP = 4 reads both checkpoints.
Spec: §4.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.parallel_setup import close_megatron, init_megatron, portable, restore
from tests.helpers.workers import run_workers

VOCAB, SEQ, BATCH, STEPS = 64, 8, 2, 5
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
TYPES = (6, 2)  # 6: every M replicated (rope); 2: every M sharded like the base partitions
LAYER0 = "decoder.layers.0."
WEIGHTS = {
    "self_attention.linear_qkv": ("rows", 1),
    "mlp.linear_fc1": ("rows", 2),
    "self_attention.linear_proj": ("cols", 1),
    "mlp.linear_fc2": ("cols", 1),
}


def _gpt(tp: int):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_kwargs

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=48,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        tensor_model_parallel_size=tp,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.2,
        **cpu_model_parallel_kwargs(),
    )
    torch.manual_seed(0)  # megatron's CPU init draws every global weight in order: the same at every TP size
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )


def _adapted(tp: int, mora_type: int, grad_sync: str = "backward", dropout: float = 0.0):
    from mora_dist import MoRAConfig, apply_mora

    config = MoRAConfig(r_hat=8, mora_type=mora_type, target_modules=TARGETS, tensor_parallel_grad_sync=grad_sync,
                        dropout=dropout)
    return apply_mora(_gpt(tp), config)


def _m_grads(model, attr: str = "grad") -> dict[str, torch.Tensor]:
    """Every layer's global ``M`` gradient (``grad`` or Megatron's ``main_grad``), sharded ones gathered."""
    from mora_dist.parallel.mappings import gather_matrix_shards

    out = {}
    for name, layer in _mora_layers(model):
        grad = getattr(layer.mora_M, attr).detach()
        if layer.plan.m_dim is not None:
            grad = gather_matrix_shards(grad, layer._m_ids_per_rank(), layer.plan.m_dim, layer.tp_group)
        out[name] = grad.clone()
    return out


def _batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]  # True = masked
    return tokens[:, :-1], position_ids, mask, tokens[:, 1:]


def _logits(model) -> torch.Tensor:
    """Full-vocabulary logits ``(b, s, v)`` (megatron returns this rank's vocabulary shard)."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    ids, pos, mask, _ = _batch()
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(ids, pos, mask)).detach()


def _train(model) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Losses of ``STEPS`` AdamW steps and the M gradients of the first and last step."""
    ids, pos, mask, labels = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01)
    losses, grads = [], []
    for step in range(STEPS):
        opt.zero_grad()
        loss = model(ids, pos, mask, labels=labels).mean()
        loss.backward()
        if step in (0, STEPS - 1):
            grads.append(_m_grads(model))
        opt.step()
        losses.append(loss.item())
    return losses, grads


def _train_megatron_ddp(model, steps: int = 3, micro_batches: int = 2, finalize=None):
    """Megatron's own loop pieces: DDP gradient buffers (``main_grad``), accumulation under ``no_sync``,
    ``finalize_model_grads`` (or ``finalize``); AdamW steps on ``main_grad`` as megatron's FP32 optimizer does.
    Returns the losses and every step's finalized ``main_grad`` of the matrices."""
    import contextlib

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    finalize = finalize or finalize_model_grads

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    params = [p for p in ddp.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01)
    ids, pos, mask, labels = _batch()
    losses, grads = [], []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        total = 0.0
        for i in range(micro_batches):
            half = slice(i, i + 1)  # one sequence per micro-batch
            with ddp.no_sync() if i < micro_batches - 1 else contextlib.nullcontext():
                loss = ddp(ids[half], pos[half], mask, labels=labels[half]).mean() / micro_batches
                loss.backward()
            total += loss.item()
        finalize([ddp])
        grads.append(_m_grads(model, "main_grad"))
        for p in params:
            p.grad = p.main_grad
        opt.step()
        losses.append(total)
    return losses, grads


def _dropout_step(tp: int, mora_type: int) -> dict:
    """Adapter dropout 0.3, non-zero M: training-mode logits and M gradients from the same generator state."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    model = _adapted(tp, mora_type, dropout=0.3)
    g = torch.Generator().manual_seed(3)
    for _, layer in _mora_layers(model):
        layer.set_global_M(torch.randn(layer.r_hat, layer.r_hat, generator=g) * 0.2)
    ids, pos, mask, labels = _batch()
    torch.manual_seed(11)
    logits = gather_from_tensor_model_parallel_region(model(ids, pos, mask)).detach()
    torch.manual_seed(11)
    model(ids, pos, mask, labels=labels).mean().backward()
    return {"logits": logits, "grads": _m_grads(model)}


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(LAYER0 + name).base_layer.weight.detach().clone() for name in WEIGHTS}


def _dist_save(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        import os

        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)


def _dist_load(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))


def _gpt_worker(tp: int, root: str) -> dict:
    from mora_dist import load_mora, merge_mora, save_mora

    init_megatron(tp)
    out = {"shard_error": _shard_error() if tp == 2 else None}
    if tp != 4:
        from megatron.core.distributed import finalize_model_grads as megatron_finalize

        from mora_dist.parallel import finalize_model_grads

        out["ddp_losses"], out["ddp_grads"] = _train_megatron_ddp(_adapted(tp, 6))
        out["ddp_losses_step"], out["ddp_grads_step"] = _train_megatron_ddp(
            _adapted(tp, 6, "step"), finalize=finalize_model_grads
        )
        out["ddp_losses_step_megatron_only"], _ = _train_megatron_ddp(
            _adapted(tp, 6, "step"), finalize=megatron_finalize
        )
        for t in TYPES:
            out[f"t{t}/dropout"] = _dropout_step(tp, t)
    for t in TYPES:
        if tp == 4:  # resharding only: load what TP = 2 saved
            model = load_mora(_gpt(tp), f"{root}/adapter_t{t}")
            out[f"t{t}/loaded"] = _logits(model)
            model = _adapted(tp, t)
            _dist_load(model, f"{root}/dist_t{t}")
            out[f"t{t}/dist_loaded"] = _logits(model)
            continue
        model = _adapted(tp, t)
        out[f"t{t}/base"] = _logits(model)
        out[f"t{t}/losses"], out[f"t{t}/grads"] = _train(model)
        out[f"t{t}/trained"] = _logits(model)
        out[f"t{t}/replicated"] = [layer.plan.m_dim is None for _, layer in _mora_layers(model)]
        if t != 6:  # the PEFT LoRA export gathers sharded matrices (type 2: every M sharded at TP = 2)
            save_mora(model, f"{root}/peft_tp{tp}_t{t}", format="peft-lora")
        if tp == 2:
            save_mora(model, f"{root}/adapter_t{t}")
            _dist_save(model, f"{root}/dist_t{t}")
        else:
            fresh = load_mora(_gpt(tp), f"{root}/adapter_t{t}")
            out[f"t{t}/loaded"] = _logits(fresh)
            fresh = _adapted(tp, t)
            _dist_load(fresh, f"{root}/dist_t{t}")
            out[f"t{t}/dist_loaded"] = _logits(fresh)
        merge_mora(model)
        out[f"t{t}/merged_weights"] = _weights(model)
        out[f"t{t}/merged"] = _logits(model)
    close_megatron()
    return portable(out)


def _shard_error() -> tuple[str, str, bool]:
    """apply_mora with tensor_parallel_sharding='shard' on layers whose M cannot be split: error, model untouched."""
    from mora_dist import MoRAConfig, apply_mora, mora_layers

    model = _gpt(2)
    try:
        apply_mora(model, MoRAConfig(r_hat=8, mora_type=1, target_modules=TARGETS, tensor_parallel_sharding="shard"))
    except Exception as exc:  # the parent checks type and message
        return type(exc).__name__, str(exc), any(True for _ in mora_layers(model))
    return "", "", True


def _mora_layers(model):
    from mora_dist import mora_layers

    return mora_layers(model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    root = str(tmp_path_factory.mktemp("tp_gpt"))
    return {tp: restore(run_workers(_gpt_worker, tp, tp, root, timeout_s=200)) for tp in (2, 1, 4)}


def _close(actual, expected, tol, what):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=tol, atol=tol, msg=what)


def _close_grads(actual: dict, expected: dict, what: str) -> None:
    """Every layer's M gradient equal to TP = 1's, to 1e-4 of its scale (a factor 2 or a partial sum fails)."""
    assert set(actual) == set(expected)
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        scale = grad.abs().max().item()
        torch.testing.assert_close(actual[name], grad, rtol=0, atol=1e-4 * scale, msg=f"{what}: {name}")


@pytest.mark.parametrize("mora_type", TYPES)
def test_training_at_tp2_matches_tp1(runs, mora_type):
    """Five AdamW steps at TP = 2 give the TP = 1 losses, logits and M gradients (first and last step, 1e-5).

    The gradients matter: AdamW is scale-invariant, so a doubled reduction can still give the TP = 1 losses
    (checked: doubling the gradient in ``mappings._ReduceReplicatedGrad.backward`` fails this test, the DDP test
    and the type-6 dropout test; doubling the sum in ``sum_replicated_grads`` fails the step-mode test).

    With type 6 every matrix is replicated, so this fails if the SUM reduction of a replicated matrix's
    gradient over TP is left out (each rank would step with its partial gradient; seen failing on the losses
    with the reduction disabled). With type 2 every matrix is sharded like its base layer, so this fails if a shard
    reads the wrong rows of the fused qkv / gated fc1 layouts.
    """
    t = f"t{mora_type}"
    ref = runs[1][0]
    assert ref[f"{t}/losses"][-1] < ref[f"{t}/losses"][0] - 0.05  # the adapters do learn
    assert all(ref[f"{t}/replicated"])
    expected_replicated = mora_type == 6
    for rank in runs[2]:
        assert all(r == expected_replicated for r in rank[f"{t}/replicated"])
        _close(rank[f"{t}/base"], ref[f"{t}/base"], 1e-5, "base logits")
        _close(rank[f"{t}/losses"], ref[f"{t}/losses"], 1e-5, "losses")
        _close(rank[f"{t}/trained"], ref[f"{t}/trained"], 1e-5, "trained logits")
        for i, step in enumerate((0, STEPS - 1)):
            _close_grads(rank[f"{t}/grads"][i], ref[f"{t}/grads"][i], f"M gradient, step {step}")


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("tp", [1, 4])
def test_save_at_tp2_loads_at_any_tp(runs, mora_type, tp):
    """Adapter files (``save_mora``) and megatron ``dist_checkpointing`` written at TP = 2 load at TP = 1 and 4
    with the same logits: catches TP-local tensors in files and wrong shard offsets in ``sharded_state_dict``."""
    t = f"t{mora_type}"
    saved = runs[2][0][f"{t}/trained"]
    for rank in runs[tp]:
        _close(rank[f"{t}/loaded"], saved, 1e-5, "save_mora/load_mora")
        _close(rank[f"{t}/dist_loaded"], saved, 1e-5, "dist_checkpointing")


def test_peft_lora_export_at_tp2_equals_tp1(runs, tmp_path_factory):
    """``save_mora(format="peft-lora")`` of a TP = 2 model whose matrices are sharded writes the TP = 1 file:
    catches a rank-local M (or a missing gather) in the LoRA export. Spec: §2.5, §4."""
    from safetensors.torch import load_file

    root = next(p for p in tmp_path_factory.getbasetemp().iterdir() if p.name.startswith("tp_gpt"))
    tp2, tp1 = (load_file(root / f"peft_tp{tp}_t2" / "adapter_model.safetensors") for tp in (2, 1))
    assert sorted(tp2) == sorted(tp1) and any(key.endswith("linear_qkv.lora_B.weight") for key in tp2)
    for key in tp1:
        _close(tp2[key], tp1[key], 1e-5, key)


def _rows(d: int, tp: int, rank: int, stride: int) -> torch.Tensor:
    return torch.cat(torch.split(torch.arange(d), d // (stride * tp))[rank::tp])


@pytest.mark.parametrize("mora_type", TYPES)
def test_merge_at_tp2_equals_merge_at_tp1(runs, mora_type):
    """Each rank merges its own dW shard; the gathered weights equal the TP = 1 merged weights and the merged
    model keeps the trained logits: catches a shard merged with another shard's rows or columns."""
    t = f"t{mora_type}"
    ref, ranks = runs[1][0], runs[2]
    for name, (split, stride) in WEIGHTS.items():
        expected = ref[f"{t}/merged_weights"][name]
        parts = [r[f"{t}/merged_weights"][name] for r in ranks]
        if split == "cols":
            full = torch.cat(parts, 1)
        else:
            full = torch.empty_like(expected)
            for rank, part in enumerate(parts):
                full[_rows(expected.shape[0], len(parts), rank, stride)] = part
        _close(full, expected, 1e-5, name)
    for rank in ranks:
        _close(rank[f"{t}/merged"], rank[f"{t}/trained"], 1e-5, "logits after merge")


def test_unshardable_config_raises_before_changing_the_model(runs):
    """A type whose M cannot follow the base partitions, with ``tensor_parallel_sharding='shard'``: a
    ``ShardingError`` naming the layer and the fix, raised during planning (no layer wrapped)."""
    kind, msg, wrapped = runs[2][0]["shard_error"]
    assert kind == "ShardingError" and not wrapped
    assert msg.startswith("decoder.layers.0.self_attention.linear_proj: ")  # the first layer in model order
    assert "row-parallel" in msg and "mora_type=1" in msg and "TP=2" in msg and "block-sum compression" in msg
    assert "tensor_parallel_sharding='auto'" in msg


def test_megatron_ddp_gradient_accumulation_at_tp2_matches_tp1(runs):
    """Megatron DDP (``main_grad`` buffers), two micro-batches under ``no_sync`` and ``finalize_model_grads``,
    replicated matrices (type 6): TP = 2 losses equal TP = 1. Catches a replicated-M reduction that is skipped,
    doubled by ``finalize_model_grads`` (e.g. if M were tagged ``sequence_parallel``) or lost under accumulation."""
    ref = runs[1][0]["ddp_losses"]
    assert ref[-1] < ref[0]
    for rank in runs[2]:
        _close(rank["ddp_losses"], ref, 1e-5, "ddp losses")
        for step, grads in enumerate(rank["ddp_grads"]):
            _close_grads(grads, runs[1][0]["ddp_grads"][step], f"main_grad, step {step}")


def test_once_per_step_grad_sync_at_tp2_matches_tp1(runs):
    """``tensor_parallel_grad_sync="step"``: no all-reduce in backward; the replicated matrices' accumulated
    ``main_grad`` is summed over TP once per optimizer step by ``mora_dist.parallel.finalize_model_grads``.
    TP = 2 losses equal TP = 1; with Megatron's plain ``finalize_model_grads`` (the sum left out) they do not,
    so the test catches a step-mode matrix that is never reduced."""
    ref = runs[1][0]["ddp_losses"]
    torch.testing.assert_close(torch.tensor(runs[1][0]["ddp_losses_step"]), torch.tensor(ref), rtol=0, atol=1e-6)
    for rank in runs[2]:
        _close(rank["ddp_losses_step"], ref, 1e-5, "step-sync ddp losses")
        for step, grads in enumerate(rank["ddp_grads_step"]):  # a doubled or missing step sum fails here
            _close_grads(grads, runs[1][0]["ddp_grads"][step], f"step-sync main_grad, step {step}")
        unreduced = torch.tensor(rank["ddp_losses_step_megatron_only"])
        assert (unreduced - torch.tensor(ref)).abs().max() > 1e-4


@pytest.mark.parametrize("mora_type", TYPES)
def test_adapter_dropout_at_tp2_matches_tp1(runs, mora_type):
    """Adapter dropout 0.3 with a non-zero M, same seed: TP = 2 logits and M gradients equal TP = 1. Catches a
    mask drawn per shard (row-parallel layers see k / tp input columns; each rank would draw the same pattern
    for its own columns) instead of TP = 1's mask of the global input."""
    ref = runs[1][0][f"t{mora_type}/dropout"]
    for rank in runs[2]:
        got = rank[f"t{mora_type}/dropout"]
        _close(got["logits"], ref["logits"], 1e-5, "logits with dropout")
        _close_grads(got["grads"], ref["grads"], "M gradient with dropout")
