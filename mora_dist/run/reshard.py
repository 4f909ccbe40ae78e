"""Resume at another data-parallel size: which runs can, and the DeepSpeed universal checkpoint that lets them.

The data order does not depend on the data-parallel size for map-style and Megatron sources (the resume point is
a global sample index, :mod:`mora_dist.data.sharding`), the step count, scheduler and ReMoRA state live in the
client state, so what must change is ZeRO's optimizer partitioning. DeepSpeed 0.19 refuses a ZeRO-1/2 checkpoint
written at another DP size; its universal checkpoint (``ds_to_universal``: one fp32 master copy and Adam
moments per parameter, unpartitioned) loads at any size with ``checkpoint.load_universal``. The checkpoint being
resumed gets a ``zero/`` folder with that form next to its ZeRO files, so it stays loadable both ways. A universal
load restores only the optimizer's parameters, so the frozen ones (the base weights ReMoRA merges into) are read
from the checkpoint's module state first (:func:`load_module_state`).

Supported: backend ``hf``, ZeRO stages 1 and 2 (converted) and 0 (DeepSpeed keeps the whole optimizer in the
model-states file), map-style and Megatron sources. Refused before any process group: backend ``megatron``,
ZeRO stage 3, and streaming sources (each rank's position in its part of a stream depends on the DP size).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from argparse import Namespace
from pathlib import Path

import torch

from mora_dist.run.checkpoint import TMP_PREFIX, list_checkpoints, resume_tag
from mora_dist.run.config import RunConfig, RunConfigError

logger = logging.getLogger(__name__)

_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
UNIVERSAL_DIR = "zero"  # what ds_to_universal writes, and where the universal loader looks


def saved_dp_size(tag_dir: str | os.PathLike) -> int | None:
    """Data-parallel size a ZeRO checkpoint was written at (its optimizer shard count); ``None`` without ZeRO
    shards (stage 0 keeps the whole optimizer in the model-states file)."""
    ranks = {int(m.group(1)) for f in Path(tag_dir).iterdir() if (m := _ZERO_FILE.match(f.name))}
    return len(ranks) or None


# The oldest DeepSpeed whose universal checkpoint resumes our runs on the same curve (the test suite's version;
# 0.16.0 continued with a different loss).
UNIVERSAL_MIN_DEEPSPEED = (0, 19)


def _deepspeed_version() -> tuple[int, int]:
    from deepspeed import __version__  # DeepSpeed is heavy: loaded only when a resume changes the DP size

    major, minor = __version__.split(".")[:2]
    return int(major), int(minor)


def check_resume_dp(cfg: RunConfig, ckpt_dir: str | os.PathLike, dp_size: int) -> bool:
    """Whether resuming the latest checkpoint in ``ckpt_dir`` at ``dp_size`` needs the universal checkpoint.

    Raises:
        RunConfigError: the data-parallel size changed and the run cannot follow (names the reason and the fix).
    """
    if not list_checkpoints(ckpt_dir):
        return False
    tag = resume_tag(ckpt_dir)
    saved = saved_dp_size(Path(ckpt_dir) / tag)
    if saved is None or saved == dp_size:
        return False
    stage = int(cfg.deepspeed_dict().get("zero_optimization", {}).get("stage", 0))
    fix = f"relaunch with {saved} data-parallel ranks"
    where = f"checkpoint {tag} was written at data-parallel size {saved}, this launch has {dp_size}"
    problems = []
    if cfg.model.backend != "hf":
        problems.append(f"model.backend={cfg.model.backend!r}: resuming at another data-parallel size is supported "
                        "on backend 'hf' only")
    if stage == 3:
        problems.append("deepspeed.zero_optimization.stage=3: resuming at another data-parallel size is supported "
                        "for ZeRO stages 0, 1 and 2")
    streamed = [s.name for s in cfg.data.sources if cfg.data.streaming and s.format != "megatron"]
    version = _deepspeed_version()
    if version < UNIVERSAL_MIN_DEEPSPEED:
        problems.append(f"deepspeed {'.'.join(map(str, version))}: resuming at another data-parallel size is "
                        f"tested with deepspeed >= {'.'.join(map(str, UNIVERSAL_MIN_DEEPSPEED))} (older universal "
                        "checkpoints did not continue the same curve); upgrade deepspeed")
    if streamed:
        problems.append(f"data.streaming=true (sources {streamed}): each rank's position in its part of a stream "
                        "depends on the data-parallel size; resume a streaming run at the size that wrote it")
    if problems:
        raise RunConfigError(f"cannot resume: {where}:\n  - " + "\n  - ".join(problems) + f"\n  ({fix})")
    logger.info("%s: resuming through a DeepSpeed universal checkpoint", where)
    return True


def add_universal(tag_dir: str | os.PathLike) -> Path:
    """Write the universal form of the ZeRO-1/2 checkpoint ``tag_dir`` into ``tag_dir/zero`` (once; atomic: built
    in a temp folder beside it, then renamed). One process only (rank 0); the others wait at a barrier."""
    tag_dir = Path(tag_dir)
    final = tag_dir / UNIVERSAL_DIR
    if final.is_dir():
        return final
    from deepspeed.checkpoint import ds_to_universal  # DeepSpeed is heavy: loaded only where it is used

    tmp = tag_dir.parent / f"{TMP_PREFIX}universal-{tag_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    # inject_missing_state: our client state lacks the Megatron-DeepSpeed "universal_checkpoint_info" the
    # converter asks for; its defaults (no TP/PP reshaping rules) are right for a data-parallel-only model.
    ds_to_universal.main(Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=True))
    os.replace(tmp / UNIVERSAL_DIR, final)
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote the universal form of %s", tag_dir)
    return final


def load_module_state(engine, tag_dir: str | os.PathLike) -> None:
    """Load the whole module state (frozen base weights included) of checkpoint ``tag_dir`` into ``engine``'s
    model, before a universal load restores the trainable parameters and their optimizer state."""
    path = Path(tag_dir) / "mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)["module"]
    engine.module.load_state_dict(state, strict=True)
