"""The DeepSpeed engine both DeepSpeed back ends train with (Hugging Face, and megatron-core with DeepSpeed over
its data-parallel groups): the DeepSpeed config the run's sections decide, and ``deepspeed.initialize``.
Spec: §5.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn

from mora_dist.run.build import scheduler_factory
from mora_dist.run.config import RunConfig
from mora_dist.training.residual_shards import shard_residuals

logger = logging.getLogger(__name__)


def resolve_torch_adam(setting: bool | None) -> bool:
    """``optimizer.torch_adam``; when unset, ``True`` (torch's AdamW) where DeepSpeed's fused Adam is not
    prebuilt and would be JIT-compiled: on CPU (a C++ build of minutes) or without ``nvcc`` (it would fail)."""
    if setting is not None:
        return setting
    try:
        from deepspeed.git_version_info import installed_ops  # DeepSpeed is heavy: loaded only where it is used

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



def build_engine(cfg: RunConfig, model: nn.Module, accum: int, *, mpu: Any = None, load_universal: bool = False):
    """``deepspeed.initialize`` on the trainable parameters; returns the engine. Without ``mpu`` (the Hugging Face
    back end) the bf16 merge compensation buffers are sharded over the ZeRO group
    (:mod:`mora_dist.training.residual_shards`): each rank keeps ``1/N`` of them."""
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                           config=deepspeed_config(cfg, accum, load_universal=load_universal),
                                           lr_scheduler=scheduler_factory(cfg), mpu=mpu)
    if mpu is None:
        shard_residuals(engine.module, engine.seq_data_parallel_group)
    return engine
