"""ReMoRA on a megatron-core GPTModel under DeepSpeed ZeRO-1: tensor parallel size 2 against size 1 (gloo, CPU)."""

import pytest
import torch

from tests.helpers.parallel_setup import close_megatron, init_megatron
from tests.helpers.workers import patch_deepspeed_for_cpu, run_workers

STEPS, MERGE_EVERY, SEQ, BATCH = 12, 4, 12, 4


def _gpt_worker(tp, merge_every=MERGE_EVERY, lr=1e-2):
    """Train a tiny GPTModel (GQA, SwiGLU, RoPE) with merges every 4 steps; DP = 1 at both TP sizes, so both runs
    see the same global batch. (At lr 3e-2 Adam amplifies float noise between the TP layouts to 5e-5 by step 11
    even without merges; 1e-2 keeps both runs within 1e-6.)"""
    import deepspeed
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist import MoRAConfig, apply_mora
    from mora_dist.errors import MoRAConfigError
    from mora_dist.parallel.cpu_shim import cpu_model_parallel_kwargs
    from mora_dist.parallel.mpu import MegatronMPU
    from mora_dist.training.callbacks import CallbackList, TrainerEngineView
    from mora_dist.training.remora import ReMoRACallback

    init_megatron(tp)
    patch_deepspeed_for_cpu()
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        tensor_model_parallel_size=tp, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, **cpu_model_parallel_kwargs(),
    )
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=96,
                     max_sequence_length=16, position_embedding_type="rope")
    # Types 1 and 2 split M differently over TP, so a cycle mixing them keeps M replicated.
    apply_mora(model, MoRAConfig(r=4, target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
                                 mora_type=1, tensor_parallel_sharding="replicate"))
    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config, mpu=MegatronMPU())
    callbacks = CallbackList([ReMoRACallback(merge_every=merge_every, type_cycle=(1, 2), restart_warmup=0)])
    callbacks.on_train_begin(engine)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    losses, merges = [], []
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 96, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
        loss = engine(ids[:, :-1], position_ids, mask, labels=ids[:, 1:]).mean()
        engine.backward(loss)
        engine.step()
        metrics = callbacks.on_step_end(engine)
        losses.append(float(loss))
        if metrics:
            merges.append((step, metrics["remora/type"], metrics["remora/delta_norm"],
                           metrics["remora/zeroed_fraction"]))
    refused = None
    if tp == 2:  # r_hat=16 divides d: type 2 shards M's rows over TP, type 1 keeps M replicated
        other = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=96,
                         max_sequence_length=16, position_embedding_type="rope")
        apply_mora(other, MoRAConfig(r_hat=16, target_modules=["linear_qkv"], mora_type=1))
        try:
            ReMoRACallback(merge_every=4, type_cycle=(1, 2), restart_warmup=0).on_train_begin(
                TrainerEngineView(other, None, None, 0))
        except MoRAConfigError as exc:
            refused = str(exc)
    close_megatron()
    return {"losses": losses, "merges": merges, "refused": refused}


def test_tp2_zero1_run_with_merges_matches_tp1():
    """Losses of 12 steps with merges at 4, 8, 12 agree between TP = 2 and TP = 1, and so does the Frobenius norm
    of each merged dW. Catches a rank merging a dW shard built from rank-local ids, a replicated M whose reset or
    gradient differs between TP ranks, and DeepSpeed's TP-aware optimizer (mpu) diverging after a merge. A cycle
    whose types split M differently over TP is refused at on_train_begin, not at the first merge."""
    (tp1,) = run_workers(_gpt_worker, 1, 1)
    tp2 = run_workers(_gpt_worker, 2, 2)
    assert [m[0] for m in tp1["merges"]] == [4, 8, 12] and [m[1] for m in tp1["merges"]] == [1.0, 2.0, 1.0]
    assert tp1["losses"][4] != pytest.approx(tp1["losses"][3], abs=1e-3)  # training moves the loss
    for r in tp2:
        assert "cannot use type 2" in r["refused"] and "linear_qkv" in r["refused"], r["refused"]
        assert r["losses"] == pytest.approx(tp1["losses"], abs=1e-5)
        for (step1, type1, norm1, frac1), (step2, type2, norm2, frac2) in zip(tp1["merges"], r["merges"], strict=True):
            assert (step1, type1, frac1) == (step2, type2, frac2) == (step1, type1, 1.0)
            assert norm2 == pytest.approx(norm1, rel=1e-5)
