"""Atomic DeepSpeed checkpoints, the last N kept, and resume from the latest.

DeepSpeed writes a tag folder and then overwrites ``latest`` in place. Here every rank writes into a hidden
``.tmp-<tag>`` folder (``save_latest=False``); after a barrier rank 0 renames it to ``<tag>`` and replaces
``latest`` through a temp file and ``os.replace``. A run killed at any moment leaves either the previous
checkpoint as ``latest`` or the new one, complete; stale temp folders are removed at the next start.
The client state carries what DeepSpeed does not know: the step, the samples consumed, and the callbacks' state
(ReMoRA's merge count and type cycle position).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from mora_dist.run.config import validate_run_config
from mora_dist.training.callbacks import CLIENT_STATE_KEY
from mora_dist.training.residual_shards import load_residual_shards, read_residual_shards, save_residual_shards

logger = logging.getLogger(__name__)

LATEST = "latest"
TMP_PREFIX = ".tmp-"
RANK_STATE = "rank_state"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete checkpoints in ``save_dir``, oldest first."""
    p = Path(save_dir)
    if not p.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in p.iterdir() if d.is_dir() and (m := _TAG.match(d.name))]
    return sorted(found)


def latest_tag(save_dir: str | os.PathLike) -> str | None:
    """The tag named by ``latest`` if its folder exists, else ``None``."""
    path = Path(save_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (Path(save_dir) / tag).is_dir() else None


def resume_tag(save_dir: str | os.PathLike) -> str:
    """The checkpoint ``--resume`` continues from: the one ``latest`` names, else the newest complete one.

    A ``latest`` that is missing, unreadable or names no folder falls back to the newest ``step_*`` folder (each
    is complete: it only gets its name once every rank has written it) with a warning.

    Raises:
        FileNotFoundError: ``save_dir`` holds no complete checkpoint (names the folder).
    """
    save_dir = Path(save_dir)
    try:
        tag = latest_tag(save_dir)
        why = f"'{LATEST}' is missing" if not (save_dir / LATEST).exists() else f"'{LATEST}' names no folder"
    except (OSError, UnicodeDecodeError) as exc:
        tag, why = None, f"'{LATEST}' is unreadable ({exc})"
    if tag is not None:
        return tag
    found = list_checkpoints(save_dir)
    if not found:
        raise FileNotFoundError(f"--resume: {save_dir} holds no complete checkpoint (no step_* folder); start a new "
                                "run without --resume, or point training.output_dir at the run to continue")
    step, folder = found[-1]
    logger.warning("%s in %s: resuming from the newest complete checkpoint %s (step %d)", why, save_dir,
                   folder.name, step)
    return folder.name


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def clean_stale(save_dir: str | os.PathLike) -> None:
    """Remove temp folders left by a run killed while saving (rank 0, before training starts)."""
    p = Path(save_dir)
    if p.is_dir():
        for d in p.iterdir():
            if d.name.startswith(TMP_PREFIX):
                logger.info("removing incomplete checkpoint %s", d)
                shutil.rmtree(d, ignore_errors=True)


def _rank_state_file(folder: Path, rank: int) -> Path:
    return folder / RANK_STATE / f"rank_{rank:05d}.json"


def save_step_checkpoint(engine, save_dir: str | os.PathLike, step: int, client_state: dict[str, Any], *,
                         keep_last: int, rank_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank calls it); keep the newest ``keep_last``.

    ``rank_state``: what only this rank knows (its streaming readers' positions), written to
    ``<tag>/rank_state/rank_<global rank>.json`` (DeepSpeed keeps the client state of rank 0 only); read back by
    :func:`load_latest` as ``client_state["rank_state"]``.

    Pruning only looks at checkpoints at or below ``step``: the newest ``keep_last`` of those stay (so the one a
    run resumed from is only removed once ``keep_last`` newer ones of this run exist), and a folder above
    ``step`` is never removed here (it is not this run's history). Returns the final folder.
    """
    save_dir = Path(save_dir)
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    engine.save_checkpoint(str(save_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    save_residual_shards(engine.module, save_dir / tmp_tag)
    if rank_state is not None:
        path = _rank_state_file(save_dir / tmp_tag, dist.get_rank())
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(rank_state))
    dist.barrier()
    final = save_dir / tag
    if dist.get_rank() == 0:
        if final.exists():  # a previous run died after this rename but before ``latest``: replace it
            shutil.rmtree(final)
        os.replace(save_dir / tmp_tag, final)
        _write_atomic(save_dir / LATEST, tag)
        older = [d for s, d in list_checkpoints(save_dir) if s <= step]
        for old in older[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def load_latest(engine, save_dir: str | os.PathLike) -> dict[str, Any]:
    """Load the checkpoint :func:`resume_tag` picks into ``engine``; returns its client state, with this rank's
    ``rank_state`` (``None`` if the checkpoint has none for it).

    Raises:
        FileNotFoundError: no complete checkpoint in ``save_dir``.
        RuntimeError: DeepSpeed could not load it.
    """
    tag = resume_tag(save_dir)
    path, client_state = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {save_dir}")
    load_residual_shards(engine.module, Path(save_dir) / tag)
    rank_file = _rank_state_file(Path(save_dir) / tag, dist.get_rank())
    client_state["rank_state"] = json.loads(rank_file.read_text()) if rank_file.is_file() else None
    logger.info("resumed from %s (step %s)", path, client_state.get("step"))
    return client_state


def read_run_config(run_dir: str | os.PathLike):
    """The resolved ``config.json`` a run wrote (file paths not re-checked: the corpus may live elsewhere)."""
    return validate_run_config(json.loads((Path(run_dir) / "config.json").read_text()), check_paths=False)


def read_model_states(run_dir: str | os.PathLike, tag: str | None = None, *, mp_rank: int = 0) -> dict[str, Any]:
    """DeepSpeed's ``mp_rank_XX_model_states.pt`` of checkpoint ``tag`` (default: ``latest``) of a run.

    Holds ``module`` (the full module state dict, frozen base weights included, and the bf16 merge residuals
    reassembled from their shards) and our client state.
    """
    ckpt = Path(run_dir) / "checkpoints"
    tag = tag or latest_tag(ckpt)
    if tag is None:
        raise FileNotFoundError(f"{ckpt} holds no complete checkpoint (no 'latest'); train first or pass --tag")
    path = ckpt / tag / f"mp_rank_{mp_rank:02d}_model_states.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; tags there: {[d.name for _, d in list_checkpoints(ckpt)]}")
    states = torch.load(path, map_location="cpu", weights_only=False)
    states["module"].update(read_residual_shards(ckpt / tag))
    return states


def read_client_state(run_dir: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
    """The loop's client state in checkpoint ``tag`` (default: ``latest``): DeepSpeed's model-states file, or the
    common state of a megatron-native checkpoint (``deepspeed: null``)."""
    if read_run_config(run_dir).deepspeed is not None:
        return read_model_states(run_dir, tag)
    from mora_dist.training import dist_checkpoint  # loads megatron-core: megatron-native runs only

    ckpt = Path(run_dir) / "checkpoints"
    tag = tag or latest_tag(ckpt)
    if tag is None or not (ckpt / tag).is_dir():
        raise FileNotFoundError(f"{ckpt} holds no checkpoint {tag!r}; tags there: "
                                f"{[d.name for _, d in list_checkpoints(ckpt)]}")
    return dist_checkpoint.read_client_state(ckpt / tag)


def read_fp32_masters(run_dir: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
    """The optimizer's fp32 masters of the trainable parameters of a bf16/fp16 ZeRO 1-3 checkpoint, keyed like
    the module state dict (``{}`` for an fp32 run, whose module copy is its master).

    Under DeepSpeed bf16 the module copy of ``M`` (in ``mp_rank_00_model_states.pt``) is bf16-rounded; merges
    read the fp32 master, and so must export. ZeRO-0 keeps its master inside the optimizer's own state, which is
    not read here: ``{}`` with a warning (the bf16 module copy is used).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # heavy: exports only

    cfg = read_run_config(run_dir)
    if cfg.model.dtype == "float32":
        return {}
    stage = int(cfg.deepspeed_dict().get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        logger.warning("run %s: model.dtype=%s at ZeRO stage 0: the fp32 masters are not read, the adapter comes "
                       "from the %s module copy in the checkpoint (train at ZeRO 1-3 to export exact values)",
                       run_dir, cfg.model.dtype, cfg.model.dtype)
        return {}
    ckpt = Path(run_dir) / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag or latest_tag(ckpt),
                                                    exclude_frozen_parameters=True)


def saved_mora_type(client_state: dict[str, Any]) -> int | None:
    """The MoRA type ReMoRA had switched to when the checkpoint was written (``None`` without ReMoRA): its place
    in the type cycle, as the callback itself reads it."""
    for key, state in client_state.get(CLIENT_STATE_KEY, {}).items():
        if key.endswith(":ReMoRACallback"):
            cycle = state["type_cycle"]
            return int(cycle[int(state["type_index"]) % len(cycle)])
    return None


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A full module state dict from a file (``.safetensors``, or a ``torch.save`` file such as
    ``pytorch_model.bin``) or a folder of them (shards), e.g. what DeepSpeed's ``zero_to_fp32.py`` writes."""
    p = Path(path)
    files = [p] if p.is_file() else (sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
                                     or sorted(p.glob("*.pt")))
    if not files:
        raise FileNotFoundError(f"--state-dict {str(path)!r}: no .safetensors/.bin/.pt file there; give the output "
                                "of DeepSpeed's zero_to_fp32.py (a file or its folder)")
    state: dict[str, Any] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    bad = sorted(k for k, v in state.items()
                 if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all()))
    if bad:
        raise ValueError(f"--state-dict {str(path)!r}: {len(bad)} tensor(s) hold NaN or inf values, e.g. {bad[:3]}; "
                         "the file is not a usable model (regenerate it with DeepSpeed's zero_to_fp32.py)")
    return state
