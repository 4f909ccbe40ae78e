"""Config -> what every back end shares: tokenizer, data, adapters on a model, restart callbacks, LR schedule.

Each ``build_*`` takes the validated :class:`~mora_dist.run.config.RunConfig` and returns plain objects; the
back ends (:mod:`mora_dist.run.hf`, :mod:`mora_dist.run.megatron`) build model and engine with them. Spec: §3.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn

from mora_dist.data import (
    MapReader,
    Mixture,
    ShardedBatches,
    StreamReader,
    head_blocks,
    load_text_source,
    load_tokenizer,
    split_eval,
    tokenize_and_pack,
    train_tokenizer,
)
from mora_dist.data.indexed import IndexedBlocks
from mora_dist.data.sources import hub_id
from mora_dist.lora import apply_lora
from mora_dist.model import apply_mora
from mora_dist.run.config import RunConfig
from mora_dist.run.distributed import rank
from mora_dist.run.failures import GuardedReader, agree, explain
from mora_dist.training.callbacks import CallbackList
from mora_dist.training.remora import ReLoRACallback, ReMoRACallback
from mora_dist.training.schedulers import JaggedCosineLR

logger = logging.getLogger(__name__)



def build_tokenizer(cfg: RunConfig):
    """Load ``data.tokenizer``; train it from the sources first if it is missing (rank 0, others wait)."""
    path = Path(cfg.data.tokenizer)
    if hub_id(cfg.data.tokenizer) is None and not path.exists():
        error = None
        if rank() == 0:
            try:
                sources = [_raw_source(cfg, s) for s in cfg.data.sources if s.format != "megatron"]
                train_tokenizer((row["text"] for ds in sources for row in ds), cfg.data.tokenizer_vocab_size, path)
            except Exception as exc:
                error = explain(exc, *cfg.data.sources)
        agree(error)  # the barrier, and a failure stops every rank
    return load_tokenizer(cfg.data.tokenizer)


def _raw_source(cfg: RunConfig, s, split: str | None = None):
    return load_text_source(s.path, hub_config=s.hub_config, split=split or s.split, eval_split=s.eval_split,
                            fmt=s.format, text_field=s.text_field, streaming=cfg.data.streaming,
                            cache_dir=cfg.data.cache_dir)


@dataclass
class Data:
    """The training stream of this rank and the held-out blocks of every source (name -> blocks)."""

    train: ShardedBatches
    eval_sets: dict[str, list[list[int]]]


def _source_blocks(cfg: RunConfig, s, tokenizer):
    """``(train, held_out)`` packed blocks of one source (map-style, streaming, or Megatron indexed)."""
    if s.format == "megatron":
        return split_eval(IndexedBlocks(s.path, cfg.data.seq_len), s.eval_blocks, s.name)
    pack = dict(num_proc=cfg.data.num_proc, desc=f"tokenize+pack {s.name}")
    packed = tokenize_and_pack(_raw_source(cfg, s), tokenizer, cfg.data.seq_len, **pack)
    if s.eval_split is None:
        return split_eval(packed, s.eval_blocks, s.name)
    held = tokenize_and_pack(_raw_source(cfg, s, s.eval_split), tokenizer, cfg.data.seq_len, **pack)
    return packed, head_blocks(held, s.eval_blocks, s.name)


def build_data(cfg: RunConfig, tokenizer, *, dp_rank: int, dp_size: int, start_sample: int,
               stream_states: list[dict | None] | None = None) -> Data:
    """Tokenise, pack and split every source (rank 0 first, so the others read its cache), then the mixture.

    A streaming source is split over the data-parallel ranks (each reads only its part; see ``StreamReader``).
    ``stream_states``: per source, this rank's saved reader position (``ShardedBatches.reader_states`` of the run
    that wrote the checkpoint); a streaming source resumes from it by reading one shuffle chunk, not its whole part.
    """
    readers, eval_sets = [], {}
    for first in (True, False):
        error = None
        if first == (rank() == 0):
            for s in cfg.data.sources:
                try:
                    train, held_out = _source_blocks(cfg, s, tokenizer)
                except Exception as exc:
                    error = explain(exc, s)
                    break
                seed = cfg.training.seed * 1009 + len(readers)
                if isinstance(train, datasets.IterableDataset):
                    state = stream_states[len(readers)] if stream_states else None
                    reader = StreamReader(train, seed=seed, shuffle=cfg.data.shuffle, buffer=cfg.data.shuffle_buffer,
                                          dp_rank=dp_rank, dp_size=dp_size, shard_files=s.eval_split is not None,
                                          state=state)
                    logger.info("source %s: streaming, read in %d parts over the data-parallel ranks; %d eval "
                                "blocks%s", s.name, dp_size, len(held_out),
                                f"; resumed at its saved position (sample {state['cursor']} of this rank)"
                                if state else "")
                else:
                    reader = MapReader(train, seed=seed, shuffle=cfg.data.shuffle)
                    logger.info("source %s: %d train blocks (%d tokens), %d eval blocks", s.name, len(train),
                                len(train) * cfg.data.seq_len, len(held_out))
                readers.append(GuardedReader(reader, s))  # a bad line met later names its file and line
                eval_sets[s.name] = held_out
        agree(error)  # the barrier, and a failure stops every rank
    mixture = Mixture([s.weight for s in cfg.data.sources], seed=cfg.training.seed)
    train = ShardedBatches(mixture, readers, micro_batch_size=cfg.training.micro_batch_size, dp_rank=dp_rank,
                           dp_size=dp_size, start_sample=start_sample)
    return Data(train=train, eval_sets=eval_sets)


def apply_adapters(cfg: RunConfig, model: nn.Module) -> nn.Module:
    """MoRA, LoRA or nothing (full-rank), as the config says."""
    if cfg.mora is not None:
        apply_mora(model, cfg.mora)
    elif cfg.lora is not None:
        lo = cfg.lora
        apply_lora(model, lo.target_modules, r=lo.r, lora_alpha=lo.lora_alpha, dropout=lo.dropout,
                   exclude_modules=lo.exclude_modules, modules_to_save=lo.modules_to_save,
                   merge_compensation=lo.merge_compensation)
    warn_if_adapters_outgrow(model)
    return model


def warn_if_adapters_outgrow(model: nn.Module) -> None:
    """Warn when the adapters hold more parameters than the layers they adapt (e.g. a large ``r`` on a small
    model): the run then trains more than full fine-tuning of those layers would."""
    adapter = base = 0
    for module in model.modules():
        own = [p for n, p in module.named_parameters(recurse=False) if n.startswith(("mora_", "lora_"))]
        if own and isinstance(getattr(module, "base_layer", None), nn.Module):
            adapter += sum(p.numel() for p in own)
            base += sum(p.numel() for p in module.base_layer.parameters())
    if adapter > base:
        logger.warning("the adapters hold %s parameters, more than the %s of the layers they adapt: lower mora.r "
                       "(or lora.r) for this model size", f"{adapter:,}", f"{base:,}")


def build_callbacks(cfg: RunConfig) -> CallbackList:
    """``CallbackList`` with the ReMoRA or ReLoRA callback (empty for plain MoRA / LoRA / full-rank)."""
    restart_warmup = cfg.scheduler.restart_warmup_steps if cfg.scheduler.name == "jagged_cosine" else 0
    callbacks = []
    for section, callback_class in ((cfg.remora, ReMoRACallback), (cfg.relora, ReLoRACallback)):
        if section is None:
            continue
        reset: Any = "full" if section.optimizer_reset == "full" else {"method": section.optimizer_reset,
                                                                        "ratio": section.prune_ratio}
        kwargs = dict(merge_every=section.merge_every, optimizer_reset=reset, restart_warmup=restart_warmup,
                      seed=cfg.training.seed)
        if callback_class is ReMoRACallback:
            kwargs["type_cycle"] = tuple(section.mora_types)
        callbacks.append(callback_class(**kwargs))
    return CallbackList(callbacks)


class _WarmupCosine:
    """``min(1, s / W) `` then cosine from 1 to ``floor`` over the rest (``constant``: no decay)."""

    def __init__(self, warmup: int, total: int, floor: float, decay: bool) -> None:
        self.warmup, self.total, self.floor, self.decay = warmup, total, floor, decay

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        if not self.decay:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(cfg: RunConfig):
    """A callable ``optimizer -> LR scheduler`` for ``deepspeed.initialize(lr_scheduler=...)``. Spec: §3.1."""
    s, t = cfg.scheduler, cfg.training
    restart = cfg.remora or cfg.relora
    if s.name == "jagged_cosine":
        total = t.max_steps
        if total < restart.merge_every:
            total = restart.merge_every
            logger.warning("training.max_steps=%d is shorter than one merge cycle (%d steps): no merge happens; the "
                           "learning rate follows the first %d steps of a %d-step schedule", t.max_steps, total,
                           t.max_steps, total)
        return lambda opt: JaggedCosineLR(opt, total_steps=total, first_warmup=s.warmup_steps,
                                          restart_warmup=s.restart_warmup_steps, cycle_length=restart.merge_every,
                                          min_lr_ratio=s.min_lr_ratio)
    factor = _WarmupCosine(s.warmup_steps, t.max_steps, s.min_lr_ratio, decay=s.name == "cosine")
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)
