"""Config -> runtime objects: process group, tokenizer, data, model with adapters, DeepSpeed engine, callbacks.

Each ``build_*`` takes the validated :class:`~mora_dist.run.config.RunConfig` and returns plain objects; the
launcher (``launch/pretrain.py``) only wires them into the loop. Spec: §3, §5.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
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
from mora_dist.data.sources import hub_id
from mora_dist.run.config import RunConfig
from mora_dist.run.failures import GuardedReader, agree, explain

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def patch_deepspeed_for_cpu() -> None:
    """On a machine without CUDA, stop DeepSpeed from JIT-compiling its shared-memory comm op (C++, about a
    minute per fresh machine) when the process group starts; gloo does the collectives instead.

    Call before ``deepspeed.init_distributed``. Patches one module attribute of ``deepspeed.comm.torch`` (which
    ``import deepspeed.comm.torch`` cannot reach: ``deepspeed.comm`` re-exports ``torch`` under that name).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_distributed(*, cpu_threads: int | None = None) -> bool:
    """``deepspeed.init_distributed`` with NCCL on GPUs, gloo on CPU with ``cpu_threads`` intra-op threads per
    rank (default: ``$OMP_NUM_THREADS``, else the cores divided among the local ranks).

    Started without a launcher (plain ``python``, no ``RANK``/``WORLD_SIZE`` and no MPI job around it), it runs
    as one process, as ``deepspeed`` with one process does, instead of DeepSpeed's MPI discovery.

    Returns:
        Whether it started that way (the caller logs it once its logging is set up).
    """
    import deepspeed

    single = _single_process_env()

    if torch.cuda.is_available():
        deepspeed.init_distributed(dist_backend="nccl")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return single
    patch_deepspeed_for_cpu()
    if cpu_threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        cpu_threads = int(os.environ["OMP_NUM_THREADS"])
    if cpu_threads is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        cpu_threads = max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(cpu_threads)
    deepspeed.init_distributed(dist_backend="gloo")
    return single


def _single_process_env() -> bool:
    """Set a one-process rendezvous when no launcher set one; whether it did."""
    launched = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID")
    if any(key in os.environ for key in launched):
        return False
    import socket

    with socket.socket() as s:  # a free port for the one-process rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    return True


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def build_tokenizer(cfg: RunConfig):
    """Load ``data.tokenizer``; train it from the sources first if it is missing (rank 0, others wait)."""
    path = Path(cfg.data.tokenizer)
    if hub_id(cfg.data.tokenizer) is None and not path.exists():
        error = None
        if _rank() == 0:
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
        from mora_dist.data.indexed import IndexedBlocks

        return split_eval(IndexedBlocks(s.path, cfg.data.seq_len), s.eval_blocks, s.name)
    pack = dict(num_proc=cfg.data.num_proc, desc=f"tokenize+pack {s.name}")
    packed = tokenize_and_pack(_raw_source(cfg, s), tokenizer, cfg.data.seq_len, **pack)
    if s.eval_split is None:
        return split_eval(packed, s.eval_blocks, s.name)
    held = tokenize_and_pack(_raw_source(cfg, s, s.eval_split), tokenizer, cfg.data.seq_len, **pack)
    return packed, head_blocks(held, s.eval_blocks, s.name)


def build_data(cfg: RunConfig, tokenizer, *, dp_rank: int, dp_size: int, start_sample: int) -> Data:
    """Tokenise, pack and split every source (rank 0 first, so the others read its cache), then the mixture.

    A streaming source is split over the data-parallel ranks (each reads only its part; see ``StreamReader``).
    """
    readers, eval_sets = [], {}
    for first in (True, False):
        error = None
        if first == (_rank() == 0):
            for s in cfg.data.sources:
                try:
                    train, held_out = _source_blocks(cfg, s, tokenizer)
                except Exception as exc:
                    error = explain(exc, s)
                    break
                seed = cfg.training.seed * 1009 + len(readers)
                if isinstance(train, datasets.IterableDataset):
                    reader = StreamReader(train, seed=seed, shuffle=cfg.data.shuffle, buffer=cfg.data.shuffle_buffer,
                                          dp_rank=dp_rank, dp_size=dp_size, shard_files=s.eval_split is not None)
                    logger.info("source %s: streaming, read in %d parts over the data-parallel ranks; %d eval "
                                "blocks", s.name, dp_size, len(held_out))
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


def build_hf_model(cfg: RunConfig, vocab_size: int, eos_token_id: int) -> nn.Module:
    """A Llama from the model section (or the local checkpoint ``model.pretrained``) with the adapters applied.

    Seeded by ``training.seed`` so every rank builds the same initial weights.
    """
    import transformers

    m = cfg.model
    torch.manual_seed(cfg.training.seed)
    if m.pretrained is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(m.pretrained, dtype=_DTYPES[m.dtype])
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
    else:
        a = m.arch()
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=a["hidden_size"], intermediate_size=a["intermediate_size"],
            num_hidden_layers=a["num_layers"], num_attention_heads=a["num_heads"],
            num_key_value_heads=a["num_kv_heads"], max_position_embeddings=cfg.data.seq_len,
            rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
            bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        )
        model = transformers.LlamaForCausalLM(config).to(_DTYPES[m.dtype])
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return apply_adapters(cfg, model)


def apply_adapters(cfg: RunConfig, model: nn.Module) -> nn.Module:
    """MoRA, LoRA or nothing (full-rank), as the config says."""
    if cfg.mora is not None:
        from mora_dist.model import apply_mora

        apply_mora(model, cfg.mora)
    elif cfg.lora is not None:
        from mora_dist.lora import apply_lora

        lo = cfg.lora
        apply_lora(model, lo.target_modules, r=lo.r, lora_alpha=lo.lora_alpha, dropout=lo.dropout,
                   exclude_modules=lo.exclude_modules, modules_to_save=lo.modules_to_save,
                   merge_compensation=lo.merge_compensation)
    warn_if_adapters_outgrow(model)
    return model


def resolve_torch_adam(setting: bool | None) -> bool:
    """``optimizer.torch_adam``; when unset, ``True`` (torch's AdamW) where DeepSpeed's fused Adam is not
    prebuilt and would be JIT-compiled: on CPU (a C++ build of minutes) or without ``nvcc`` (it would fail)."""
    if setting is not None:
        return setting
    try:
        from deepspeed.git_version_info import installed_ops

        prebuilt = bool(installed_ops.get("fused_adam"))
    except ImportError:
        prebuilt = False
    if prebuilt:
        return False
    cuda_home_nvcc = Path(os.environ.get("CUDA_HOME") or "/nonexistent", "bin", "nvcc")
    if not torch.cuda.is_available():
        reason = "no CUDA: DeepSpeed would compile its C++ Adam for the CPU first (minutes)"
    elif shutil.which("nvcc") is None and not cuda_home_nvcc.exists():
        reason = "no nvcc to compile DeepSpeed's fused CUDA Adam"
    else:
        return False
    logger.info("optimizer.torch_adam unset: using torch's AdamW (%s); set it to false to force the fused op", reason)
    return True


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


def deepspeed_config(cfg: RunConfig, accum: int, *, load_universal: bool = False) -> dict[str, Any]:
    """The user's DeepSpeed section plus what the other sections decide (batch, optimizer, clipping, dtype).

    ``load_universal``: the checkpoint to resume is read in DeepSpeed's universal form (another data-parallel
    size, :mod:`mora_dist.run.reshard`).
    """
    ds = cfg.deepspeed_dict()
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    t, o = cfg.training, cfg.optimizer
    ds.update(
        train_batch_size=t.global_batch_size,
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=accum,
        gradient_clipping=t.max_grad_norm,
        optimizer={"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                "weight_decay": o.weight_decay,
                                                "torch_adam": resolve_torch_adam(o.torch_adam)}},
    )
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    if cfg.model.dtype == "bfloat16":
        ds.setdefault("bf16", {"enabled": True})
    elif cfg.model.dtype == "float16":
        ds.setdefault("fp16", {"enabled": True})
    return ds


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
        from mora_dist.training.schedulers import JaggedCosineLR

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


def build_callbacks(cfg: RunConfig):
    """``CallbackList`` with the ReMoRA or ReLoRA callback (empty for plain MoRA / LoRA / full-rank)."""
    from mora_dist.training.callbacks import CallbackList

    callbacks = []
    restart_warmup = cfg.scheduler.restart_warmup_steps if cfg.scheduler.name == "jagged_cosine" else 0
    for section, name in ((cfg.remora, "ReMoRACallback"), (cfg.relora, "ReLoRACallback")):
        if section is None:
            continue
        from mora_dist.training import remora

        reset: Any = "full" if section.optimizer_reset == "full" else {"method": section.optimizer_reset,
                                                                        "ratio": section.prune_ratio}
        kwargs = dict(merge_every=section.merge_every, optimizer_reset=reset, restart_warmup=restart_warmup,
                      seed=cfg.training.seed)
        if name == "ReMoRACallback":
            kwargs["type_cycle"] = tuple(section.mora_types)
        callbacks.append(getattr(remora, name)(**kwargs))
    return CallbackList(callbacks)


def build_engine(cfg: RunConfig, model: nn.Module, accum: int, *, mpu: Any = None, load_universal: bool = False):
    """``deepspeed.initialize`` on the trainable parameters; returns the engine."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                           config=deepspeed_config(cfg, accum, load_universal=load_universal),
                                           lr_scheduler=scheduler_factory(cfg), mpu=mpu)
    return engine
