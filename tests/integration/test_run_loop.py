"""The launcher's evaluation on a real DeepSpeed ZeRO-3 engine over 2 gloo ranks: no deadlock when the held-out
blocks do not divide over the ranks, and the loss is exact over the real blocks. Spec: §5."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.helpers.workers import patch_deepspeed_for_cpu, run_workers

VOCAB, SEQ = 64, 12


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config).float()


def _eval_sets() -> dict[str, list[list[int]]]:
    g = torch.Generator().manual_seed(3)
    return {name: torch.randint(0, VOCAB, (n, SEQ), generator=g).tolist() for name, n in (("a", 17), ("b", 3))}


def _zero3_eval_worker() -> dict[str, float]:
    import deepspeed

    from mora_dist.run.hf import HFBackend
    from mora_dist.run.loop import evaluate_sets

    patch_deepspeed_for_cpu()
    deepspeed.init_distributed(dist_backend="gloo")
    model = _model()
    # persistence threshold 0: every weight partitioned, so every forward gathers (tiny weights would stay whole)
    config = {"train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return evaluate_sets(engine, HFBackend(), _eval_sets(), micro_batch_size=2)


def test_zero3_eval_with_uneven_blocks_finishes_and_equals_the_single_process_loss():
    """17 blocks at 2 ranks and micro-batch 2: rank 0 has 5 batches, rank 1 has 4. Catches the ZeRO-3 deadlock
    (rank 0's fifth forward gathers parameters alone) and padding blocks counted in the loss."""
    results = run_workers(_zero3_eval_worker, 2, timeout_s=120)
    model = _model().eval()
    expected = {}
    with torch.no_grad():
        for name, blocks in _eval_sets().items():
            ids = torch.tensor(blocks)
            expected[f"eval/{name}/loss"] = model(input_ids=ids, labels=ids).loss.item()
    assert results[0] == results[1]
    for key, value in expected.items():
        assert results[0][key] == pytest.approx(value, rel=1e-5), key
    assert results[0]["eval/loss"] == pytest.approx((17 * expected["eval/a/loss"] + 3 * expected["eval/b/loss"]) / 20,
                                                    rel=1e-5)


@pytest.mark.parametrize("pretrained,interval,flag,expected", [
    (True, 0, None, True), (False, 0, None, False), (False, 5, None, True), (True, 5, False, False),
    (False, 0, True, True)])
def test_eval_at_start_defaults_on_for_continual_pretraining(tmp_path, pretrained, interval, flag, expected):
    """``training.eval_at_start``: unset, a run from ``model.pretrained`` still logs its starting loss even
    without ``eval_interval``; an explicit value wins."""
    from mora_dist.run.config import RunConfig
    from mora_dist.run.loop import eval_at_start

    training = {"output_dir": str(tmp_path), "max_steps": 1, "micro_batch_size": 1, "global_batch_size": 1,
                "eval_interval": interval}
    if flag is not None:
        training["eval_at_start"] = flag
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    cfg = RunConfig.model_validate({"model": {"pretrained": str(tmp_path)} if pretrained else {},
                                    "optimizer": {"lr": 1e-3}, "training": training,
                                    "data": {"sources": [{"name": "x", "path": "data/shakespeare/poems.txt.gz"}],
                                             "tokenizer": "data/shakespeare/tokenizer.json", "seq_len": 16}})
    assert eval_at_start(cfg) is expected
