"""Adapter files, one module per format: ours (:mod:`.mora`), a standard PEFT LoRA (:mod:`.peft_lora`) and the
MoRA authors' PEFT fork (:mod:`.authors`). ``save_mora(format=...)`` picks the writer from :data:`WRITERS`;
``load_mora`` reads ours and the authors'. Spec: §2.5.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from mora_dist.adapters.authors import save_mora_authors
from mora_dist.adapters.mora import load_mora, mora_state_dict, read_adapter_config, write_mora
from mora_dist.adapters.peft_lora import save_peft_lora
from mora_dist.errors import MoRAConfigError
from mora_dist.model import Model

__all__ = [
    "WRITERS",
    "load_mora",
    "mora_state_dict",
    "read_adapter_config",
    "save_mora",
    "save_mora_authors",
    "save_peft_lora",
]

# format -> writer(model, path, optimizer): the one table of output formats (``launch/export.py --format``).
WRITERS: dict[str, Callable[[Model, str | os.PathLike, Any], Any]] = {
    "mora": lambda model, path, optimizer: write_mora(model, path),
    "peft-lora": lambda model, path, optimizer: save_peft_lora(model, path, optimizer=optimizer),
    "mora-authors": lambda model, path, optimizer: save_mora_authors(model, path, optimizer=optimizer),
}


def save_mora(model: Model, path: str | os.PathLike, *, format: str = "mora", optimizer: Any = None) -> Any:
    """Write the adapter to directory ``path`` atomically. Collective under tensor and pipeline parallelism (call
    on every rank; global rank 0 writes).

    Args:
        model: a model with MoRA layers (``apply_mora``), or the list of its chunks (virtual pipeline).
        path: the folder to write (replaced if it exists).
        format: ``"mora"`` (our files: the global ``M`` of every layer), ``"peft-lora"`` (a standard PEFT LoRA
            that reproduces the model exactly, types 1-4) or ``"mora-authors"`` (the MoRA authors' PEFT fork).
        optimizer: for ``"peft-lora"`` and ``"mora-authors"``: read ``M`` from this (DeepSpeed or megatron-core)
            optimizer's fp32 master instead of the module's copy, which may be bf16.

    Returns:
        The writer's report (``peft-lora``: rank and bytes on rank 0), ``None`` for ``"mora"``.

    Raises:
        MoRAConfigError: an unknown ``format``, ``optimizer`` with ``format="mora"``, or a model the format cannot
            express (nothing is written).

    Spec: §2.5.
    """
    if format not in WRITERS:
        raise MoRAConfigError(f"format={format!r} is not one of {tuple(WRITERS)}")
    if format == "mora" and optimizer is not None:
        raise MoRAConfigError("save_mora(format='mora') writes the module's M; optimizer= is for the export formats")
    return WRITERS[format](model, path, optimizer)
