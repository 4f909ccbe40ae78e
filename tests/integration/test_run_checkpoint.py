"""Atomic checkpoints on a real DeepSpeed engine: the last N kept, ``latest`` written last, stale temp folders
removed, client state (step, samples, callback state) restored."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mora_dist.run.checkpoint import TMP_PREFIX, clean_stale, latest_tag, list_checkpoints, resume_tag, tag_for
from tests.helpers.workers import patch_deepspeed_for_cpu, run_workers


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
    from mora_dist.run.checkpoint import load_latest, save_step_checkpoint

    engine = _engine()
    seen = {}
    for step in (1, 2, 3):
        _step(engine)
        save_step_checkpoint(engine, root, step, {"step": step, "samples_consumed": 2 * step, "cb": {"merges": step}},
                        keep_last=2)
        seen[step] = engine.module.weight.detach().clone()
    _step(engine)  # moves the weights away from checkpoint 3
    state = load_latest(engine, root)
    out = {"state": {k: state[k] for k in ("step", "samples_consumed", "cb")},
           "restored": torch.equal(engine.module.weight.detach(), seen[3]),
           "moved": not torch.equal(seen[2], seen[3])}
    # A folder above the step being saved is not this run's history: pruning leaves it alone.
    stale = Path(root) / tag_for(9)
    shutil.copytree(Path(root) / tag_for(3), stale)
    for step in (4, 5):
        save_step_checkpoint(engine, root, step, {"step": step}, keep_last=2)
        out[f"after_{step}"] = [s for s, _ in list_checkpoints(root)]
    shutil.rmtree(stale)
    return out


def test_save_keeps_last_n_and_resume_restores_weights_and_client_state(tmp_path):
    """Catches: pruning the newest instead of the oldest, pruning by step order across timelines (a stale
    higher-step folder would make a save delete the checkpoints just written), ``latest`` pointing at a pruned or
    temp folder, client state not round-tripping, and a load that does not restore the saved weights."""
    root = tmp_path / "ckpt"
    (out,) = run_workers(_worker, 1, str(root), timeout_s=180)
    assert [step for step, _ in list_checkpoints(root)] == [4, 5]
    assert out["after_4"] == [3, 4, 9] and out["after_5"] == [4, 5, 9]
    assert latest_tag(root) == tag_for(5) and (root / tag_for(5) / "mp_rank_00_model_states.pt").is_file()
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


def test_resume_falls_back_to_the_newest_complete_checkpoint_or_names_the_folder(tmp_path, caplog):
    """``--resume`` never starts over silently. Catches a missing, garbled or dangling ``latest`` being treated
    as "no checkpoint" (the run restarted at step 0), and a fallback to the oldest instead of the newest."""
    root = tmp_path / "ckpt"
    with pytest.raises(FileNotFoundError, match=str(root)):
        resume_tag(root)
    for step in (10, 30, 20):
        (root / tag_for(step)).mkdir(parents=True)
    (root / (TMP_PREFIX + tag_for(40))).mkdir()  # incomplete: never a candidate
    (root / "latest").write_text(tag_for(20))
    assert resume_tag(root) == tag_for(20)  # a valid latest wins
    for latest in (None, tag_for(50), b"\xff\xfe"):
        if latest is None:
            (root / "latest").unlink()
        elif isinstance(latest, bytes):
            (root / "latest").write_bytes(latest)
        else:
            (root / "latest").write_text(latest)
        caplog.clear()
        assert resume_tag(root) == tag_for(30)
        assert "resuming from the newest complete checkpoint step_0000030" in caplog.text
