"""The bf16 merge compensation buffers sharded over data parallelism, and their checkpoint files.

A compensation buffer (``mora_base_residual``, :mod:`mora_dist.merge`) has its weight's full shape. ZeRO-3
partitions the weight ``1/N`` but a buffer stays whole on every rank, as it does under ZeRO 0-2 and DDP: for a 7B
bf16 base adapted on every linear layer that is about 12 GiB per rank, whatever ``N``. :func:`shard_residuals`
keeps on each rank only the residual of its contiguous ``1/N`` slice of each flattened weight; a merge folds that
slice and all-gathers the layer's new weight (ZeRO-3 gathers it first), one layer at a time.

A sharded buffer is left out of the module's ``state_dict`` (DeepSpeed writes the module from data-parallel rank 0
only under ZeRO 0-2, and would hand rank 0's slice to every rank). Each rank writes its slices into
``<checkpoint>/mora_residual/rank_XXXXX.safetensors`` instead (:func:`save_residual_shards`, inside the checkpoint's
temporary folder, so they are as atomic as the rest), and a load at any data-parallel size reads the byte ranges
it needs from the files that hold them (:func:`load_residual_shards`). :func:`read_residual_shards` reassembles the
full buffers for export.

Spec: §2.4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mora_dist.errors import MoRAConfigError
from mora_dist.merge import RESIDUAL, SHARD, ResidualShard, pad_to_chunk, shard_residual

FOLDER = "mora_residual"


def _file(folder: Path, rank: int) -> Path:
    return folder / FOLDER / f"rank_{rank:05d}.safetensors"


def compensated_layers(module: nn.Module | list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer that keeps a merge compensation buffer (MoRA, expert and LoRA layers)."""
    chunks = module if isinstance(module, (list, tuple)) else [module]
    return [(name, layer) for chunk in chunks for name, layer in chunk.named_modules()
            if getattr(layer, "merge_compensation", False) and hasattr(layer, "_base_weight_shard")]


def sharded_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, layer) for name, layer in compensated_layers(module) if getattr(layer, SHARD, None) is not None]


def shard_residuals(module: nn.Module, group: Any = None) -> int:
    """Shard every compensation buffer of ``module`` over the data-parallel ``group`` (default: the world), see
    :func:`mora_dist.merge.shard_residual`; returns how many layers. Call on every rank of ``group`` after
    ``deepspeed.initialize`` (the weights' dtype decides a buffer's), and save and load with
    :func:`save_residual_shards` / :func:`load_residual_shards` (``CallbackList.save_checkpoint`` and the
    launcher's checkpoints do). Layers that write distributed checkpoints themselves (megatron-core) are refused.
    """
    layers = compensated_layers(module)
    for name, layer in layers:
        if hasattr(layer, "sharded_state_dict"):
            raise MoRAConfigError(f"shard_residuals: layer {name!r} ({type(layer).__name__}) keeps its residual in "
                                  "megatron-core's distributed checkpoint, sharded like its weight; shard only "
                                  "Hugging Face models trained with DeepSpeed")
        shard_residual(layer, group)
    return len(layers)


def save_residual_shards(module: nn.Module, folder: str | os.PathLike) -> Path | None:
    """Write this rank's slices of the sharded buffers to ``folder/mora_residual/rank_<r>.safetensors`` (every rank
    of the shard group calls it; nothing is written without sharded layers). Returns the file written."""
    layers = sharded_layers(module)
    if not layers:
        return None
    shard: ResidualShard = getattr(layers[0][1], SHARD)
    tensors, shapes = {}, {}
    for name, layer in layers:
        residual, s = getattr(layer, RESIDUAL), getattr(layer, SHARD)
        if residual is not None:
            shapes[name] = list(s.shape)
            if s.hi > s.lo:
                tensors[name] = residual[: s.hi - s.lo].detach().cpu().contiguous()
    path = _file(Path(folder), shard.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"world": str(shard.world), "shapes": json.dumps(shapes)})
    os.replace(tmp, path)
    return path


def _saved_layout(folder: Path) -> tuple[int, dict[str, tuple[int, ...]]]:
    with safe_open(str(_file(folder, 0)), framework="pt") as f:
        meta = f.metadata()
    return int(meta["world"]), {name: tuple(shape) for name, shape in json.loads(meta["shapes"]).items()}


def _read_range(folder: Path, name: str, shape: tuple[int, ...], world: int, lo: int, hi: int) -> torch.Tensor:
    """Entries ``[lo, hi)`` of the flattened buffer ``name`` from the files of a ``world``-rank save."""
    numel = int(torch.Size(shape).numel())
    chunk = -(-numel // world)
    pieces = []
    for rank in range(lo // chunk, -(-hi // chunk)) if hi > lo else ():
        start = rank * chunk
        with safe_open(str(_file(folder, rank)), framework="pt") as f:
            pieces.append(f.get_slice(name)[max(lo, start) - start: min(hi, start + chunk) - start])
    return torch.cat(pieces) if pieces else torch.empty(0)


@torch.no_grad()
def load_residual_shards(module: nn.Module, folder: str | os.PathLike) -> int:
    """Fill the sharded buffers of ``module`` from a checkpoint written at any data-parallel size (after the
    module's own load, which leaves them ``None``); returns how many were read. A checkpoint without
    ``mora_residual/`` keeps what the module load gave (a full buffer of an unsharded checkpoint is sliced by the
    layer's load hook).

    Raises:
        MoRAConfigError: a saved buffer's shape differs from the layer's weight (another model).
    """
    folder = Path(folder)
    layers = sharded_layers(module)
    if not layers or not _file(folder, 0).is_file():
        return 0
    world, shapes = _saved_layout(folder)
    for name, layer in layers:
        if name not in shapes:
            continue
        s: ResidualShard = getattr(layer, SHARD)
        if shapes[name] != s.shape:
            raise MoRAConfigError(f"{folder / FOLDER}: residual of {name!r} has shape {shapes[name]} but the layer's "
                                  f"weight has {s.shape}; resume with the model that wrote the checkpoint")
        values = _read_range(folder, name, s.shape, world, s.lo, s.hi)
        setattr(layer, RESIDUAL, pad_to_chunk(values, s, layer._base_weight_shard().device))
    return len(layers)


def read_residual_shards(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full buffers of a checkpoint's ``mora_residual/`` files, keyed like the module state dict
    (``<layer>.mora_base_residual``); ``{}`` when it has none."""
    folder = Path(folder)
    if not _file(folder, 0).is_file():
        return {}
    world, shapes = _saved_layout(folder)
    return {f"{name}.{RESIDUAL}": _read_range(folder, name, shape, world, 0, int(torch.Size(shape).numel()))
            .reshape(shape) for name, shape in shapes.items()}

