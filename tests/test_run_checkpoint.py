"""Atomic checkpoints on a real DeepSpeed engine: the last N kept, ``latest`` written last, stale temp folders
removed, client state (step, samples, callback state) restored."""

from __future__ import annotations

import torch
from distributed import patch_deepspeed_for_cpu, run_workers

from mora_dist.run.checkpoint import TMP_PREFIX, clean_stale, latest_tag, list_checkpoints, tag_for


def _engine():
    import deepspeed

    patch_deepspeed_for_cpu()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _step(engine) -> None:
    loss = engine(torch.ones(2, 4)).pow(2).sum()
    engine.backward(loss)
    engine.step()


def _worker(root: str) -> dict:
    from mora_dist.run.checkpoint import load_latest, save_checkpoint

    engine = _engine()
    seen = {}
    for step in (1, 2, 3):
        _step(engine)
        save_checkpoint(engine, root, step, {"step": step, "samples_consumed": 2 * step, "cb": {"merges": step}},
                        keep_last=2)
        seen[step] = engine.module.weight.detach().clone()
    _step(engine)  # moves the weights away from checkpoint 3
    state = load_latest(engine, root)
    return {"state": {k: state[k] for k in ("step", "samples_consumed", "cb")},
            "restored": torch.equal(engine.module.weight.detach(), seen[3]),
            "moved": not torch.equal(seen[2], seen[3])}


def test_save_keeps_last_n_and_resume_restores_weights_and_client_state(tmp_path):
    """Catches: pruning the newest instead of the oldest, ``latest`` pointing at a pruned or temp folder,
    client state not round-tripping, and a load that does not restore the saved weights."""
    root = tmp_path / "ckpt"
    (out,) = run_workers(_worker, 1, str(root), timeout_s=180)
    assert [step for step, _ in list_checkpoints(root)] == [2, 3]
    assert latest_tag(root) == tag_for(3) and (root / tag_for(3) / "mp_rank_00_model_states.pt").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert out["state"] == {"step": 3, "samples_consumed": 6, "cb": {"merges": 3}}
    assert out["restored"] and out["moved"]


def test_an_interrupted_save_leaves_the_previous_checkpoint_latest(tmp_path):
    """A run killed while writing leaves a temp folder (and maybe a renamed folder without ``latest`` yet):
    ``latest`` still names the previous complete checkpoint, and the next start removes the leftovers."""
    root = tmp_path / "ckpt"
    (root / tag_for(10)).mkdir(parents=True)
    (root / "latest").write_text(tag_for(10))
    (root / (TMP_PREFIX + tag_for(20))).mkdir()
    assert latest_tag(root) == tag_for(10)
    clean_stale(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", tag_for(10)]
    (root / "latest").write_text(tag_for(30))  # names a folder that was never completed
    assert latest_tag(root) is None
