"""The megatron-core backend trained the way Megatron users train it: no DeepSpeed.

Chosen by ``model.backend: "megatron"`` with ``deepspeed: null``. The GPTModel is split over
``tensor_model_parallel_size`` x ``pipeline_model_parallel_size`` ranks (``virtual_pipeline_model_parallel_size``
chunks per pipeline rank), wrapped in ``Float16Module`` for ``model.dtype: "bfloat16"`` and in megatron-core's
``DistributedDataParallel``; megatron-core's optimizer (``optimizer.use_distributed_optimizer`` selects the
distributed one) steps it, and every optimizer step runs megatron's pipeline schedule
(``get_forward_backward_func``) over the step's micro-batches. ReMoRA runs through the same callbacks, which
see this module's :class:`NativeEngine` where they would see a DeepSpeed engine.

Checkpoints: megatron-core ``dist_checkpointing`` (:mod:`mora_dist.training.dist_checkpoint`: the model's sharded
tensors and each trainable parameter's fp32 master and Adam moments laid out like the parameter), plus
``layout.json``, written through :func:`mora_dist.run.checkpoint.save_checkpoint` (temp folder, then rename), so
a kill leaves the previous checkpoint. They resume at any TP / PP / DP layout the model allows, and export loads
them into a TP = 1 model in one process.

Spec: §3, §4, §5.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mora_dist.model import trainable_summary
from mora_dist.parallel.mappings import finalize_model_grads
from mora_dist.parallel.mpu import MegatronMPU
from mora_dist.run.build import build_callbacks, scheduler_factory
from mora_dist.run.checkpoint import resume_tag
from mora_dist.run.config import RunConfig
from mora_dist.run.distributed import device
from mora_dist.run.megatron.model import build_gpt_chunks, causal_inputs, init_model_parallel
from mora_dist.training import dist_checkpoint

logger = logging.getLogger(__name__)

LAYOUT = "layout.json"


def _forward_step(data_iterator, model):
    """megatron's ``forward_step_func``: mean next-token loss of one micro-batch ``(b, s + 1)``."""
    ids, position_ids, mask, labels = causal_inputs(next(data_iterator).to(device()))
    per_token = model(ids, position_ids, mask, labels=labels)

    def loss_func(output: torch.Tensor):
        loss = output.float().mean()
        # clone: the schedule divides the returned loss by the micro-batch count in place
        return loss, {"loss": loss.detach().clone()}

    return per_token, loss_func


class NativeEngine:
    """What the loop and the callbacks read from a DeepSpeed engine, over megatron-core's own parts.

    Attributes:
        module: the model chunks (``DistributedDataParallel``-wrapped) in an ``nn.ModuleList`` (one chunk without
            virtual pipeline), which the callbacks read like any model.
        optimizer: megatron-core's optimizer; lr_scheduler: ours (:mod:`mora_dist.run.hf`), on its inner
            torch optimizer(s); global_steps: optimizer steps done.
    """

    def __init__(self, cfg: RunConfig, chunks: list[nn.Module], optimizer: Any, lr_scheduler: Any,
                 accum: int) -> None:
        from megatron.core import parallel_state as ps  # megatron-core is heavy: only megatron runs load it

        # megatron-core is heavy: loaded only where megatron is used
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg, self.optimizer, self.lr_scheduler = cfg, optimizer, lr_scheduler
        self.module = nn.ModuleList(chunks)
        self.accum, self.global_steps, self.grad_norm = accum, 0, None
        self.mpu = MegatronMPU(ps)
        self.device = device()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.last_stage_rank = ps.get_pipeline_model_parallel_last_rank()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.forward_backward = get_forward_backward_func()

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self.grad_norm

    def train(self) -> None:
        for chunk in self.module:
            chunk.train()

    def eval(self) -> None:
        for chunk in self.module:
            chunk.eval()

    def _schedule(self, batches: list[torch.Tensor], *, forward_only: bool) -> list[float]:
        """Run megatron's schedule over ``batches`` (one micro-batch ``(b, s + 1)`` each, all of one shape); every
        pipeline stage gets the losses."""
        chunks = list(self.module)
        iterators = [iter(batches) for _ in chunks]
        single = len(chunks) == 1
        out = self.forward_backward(
            forward_step_func=_forward_step, data_iterator=iterators[0] if single else iterators,
            model=chunks[0] if single else chunks, num_microbatches=len(batches),
            # the p2p tensor shape between stages: an evaluation batch may be shorter than micro_batch_size
            seq_length=batches[0].shape[1] - 1, micro_batch_size=batches[0].shape[0],
            forward_only=forward_only,
        )
        losses = torch.tensor([float(d["loss"]) for d in out] if self.is_last_stage else [0.0] * len(batches),
                              dtype=torch.float64, device=self.device)
        if dist.get_world_size(self.pp_group) > 1:
            dist.broadcast(losses, src=self.last_stage_rank, group=self.pp_group)
        return losses.tolist()

    def train_step(self, batches: list[torch.Tensor]) -> list[float]:
        """One optimizer step over ``batches`` (the step's micro-batches); returns their losses."""
        for chunk in self.module:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._schedule(batches, forward_only=False)
        finalize_model_grads(list(self.module))  # DP all-reduce, then the once-per-step TP sum of replicated M
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError(f"megatron optimizer step {self.global_steps + 1} failed (non-finite gradients)")
        self.grad_norm = grad_norm
        self.lr_scheduler.step()
        self.global_steps += 1
        return losses

    @torch.no_grad()
    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward-only loss of one batch ``(b, s + 1)`` (evaluation), the same on every pipeline stage."""
        return torch.tensor(self._schedule([batch], forward_only=True)[0])

    # ---- checkpoints (the interface run/checkpoint.py calls) ----
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool = False):
        """``<save_dir>/<tag>``: a megatron-core ``dist_checkpointing`` checkpoint (model, the optimizer state in
        model space, scheduler, step, ``client_state``) that loads at any TP / PP / DP layout, plus
        ``layout.json`` (the layout it was written at). Collective."""
        from megatron.core import parallel_state as ps  # megatron-core is heavy: only megatron runs load it

        folder = Path(save_dir) / tag
        dist_checkpoint.save_checkpoint(folder, self, client_state=client_state)
        if dist.get_rank() == 0:
            m = self.cfg.model
            (folder / LAYOUT).write_text(json.dumps({
                "tensor_model_parallel_size": m.tensor_model_parallel_size,
                "pipeline_model_parallel_size": m.pipeline_model_parallel_size,
                "virtual_pipeline_model_parallel_size": m.virtual_pipeline_model_parallel_size,
                "expert_model_parallel_size": m.expert_model_parallel_size,
                "expert_tensor_parallel_size": m.expert_tensor_parallel_size,
                "data_parallel_size": ps.get_data_parallel_world_size(),
            }, indent=1))
        dist.barrier()

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict[str, Any]]:
        """Restore model, optimizer, scheduler and step from ``tag``, resharded to this run's layout."""
        folder = Path(load_dir) / tag
        saved = json.loads((folder / LAYOUT).read_text())
        m = self.cfg.model
        now = (m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.virtual_pipeline_model_parallel_size)
        then = (saved["tensor_model_parallel_size"], saved["pipeline_model_parallel_size"],
                saved["virtual_pipeline_model_parallel_size"])
        if now[2] != then[2]:
            raise RuntimeError(f"checkpoint {folder} was written with model.virtual_pipeline_model_parallel_size="
                               f"{then[2]}, this run has {now[2]}: resume with the same value (TP and PP may "
                               "change), or export the adapter and load_mora it into the new layout")
        if now != then:
            logger.info("resharding checkpoint %s from (TP, PP, VPP) = %s to %s", folder, then, now)
        client_state = dist_checkpoint.load_checkpoint(folder, self)
        return str(folder), client_state


def _optimizers(optimizer: Any) -> list[Any]:
    """The optimizers inside a ``ChainedOptimizer`` (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


class _JointParamGroups(torch.optim.Optimizer):
    """The param groups of megatron's inner torch optimizers as one optimizer, for one LR scheduler to drive:
    under expert parallelism megatron builds a second optimizer for the experts. The groups are the inner
    optimizers' own dicts, so the scheduler's learning rates reach them; megatron's optimizer steps them."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        super().__init__([torch.zeros(0, requires_grad=True)], {})  # a placeholder: the groups are replaced
        self.param_groups = [group for optimizer in optimizers for group in optimizer.param_groups]

    def step(self, closure: Any = None) -> None:
        raise RuntimeError("stepped by megatron's optimizer, not through the LR scheduler's view of its groups")


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer whose ``param_groups`` megatron's optimizer steps with (our schedulers drive it)."""
    inner = [leaf.optimizer for leaf in _optimizers(optimizer)]
    return inner[0] if len(inner) == 1 else _JointParamGroups(inner)


class NativeBackend:
    """megatron-core DDP, optimizer and pipeline schedule (no DeepSpeed)."""

    def __init__(self, cfg: RunConfig) -> None:
        from megatron.core import parallel_state  # megatron-core is heavy: only megatron runs load it

        m = cfg.model
        init_model_parallel(m.tensor_model_parallel_size, cfg.training.seed, pp=m.pipeline_model_parallel_size,
                            vpp=m.virtual_pipeline_model_parallel_size, ep=m.expert_model_parallel_size,
                            etp=m.expert_tensor_parallel_size)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()

    def build(self, cfg: RunConfig, vocab_size: int, eos_token_id: int, accum: int):
        # megatron-core is heavy: only megatron runs load it
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        # megatron-core is heavy: loaded only where megatron is used
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        m, o, t = cfg.model, cfg.optimizer, cfg.training
        chunks = build_gpt_chunks(cfg, vocab_size)
        logger.info("%s (%s, TP=%d, PP=%d, VPP=%s, %s)", trainable_summary(chunks), cfg.method,
                    m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
                    m.virtual_pipeline_model_parallel_size, m.dtype)
        config = chunks[0].config
        bf16 = m.dtype == "bfloat16"
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=o.use_distributed_optimizer)
        wrapped = []
        for i, chunk in enumerate(chunks):
            inner = Float16Module(config, chunk) if bf16 else chunk
            # bucketing only for the first chunk, as Megatron-LM does under virtual pipeline parallelism
            wrapped.append(DistributedDataParallel(config, ddp_config, inner, disable_bucketing=i > 0))
        opt_config = OptimizerConfig(
            optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
            adam_eps=o.eps, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=o.use_distributed_optimizer, clip_grad=t.max_grad_norm,
        )
        optimizer = get_megatron_optimizer(opt_config, wrapped)
        scheduler = scheduler_factory(cfg)(_torch_optimizer(optimizer))
        engine = NativeEngine(cfg, wrapped, optimizer, scheduler, accum)
        return engine, build_callbacks(cfg)

    def loss(self, engine: NativeEngine, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Evaluation loss of ``input_ids: (b, s)`` through the pipeline, and the predicted-token count."""
        return engine.loss(input_ids), input_ids.shape[0] * (input_ids.shape[1] - 1)

    def train_step(self, engine: NativeEngine, batches: list[torch.Tensor]) -> list[float]:
        return engine.train_step(batches)


# ---------------------------------------------------------------- export: the checkpoint at TP = 1
def load_native_run_into(model: nn.Module, run_dir: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
    """Load a native run's checkpoint ``tag`` (default: the one ``--resume`` picks) into ``model``, built at this
    process's layout (TP = 1, PP = 1 for exports): ``dist_checkpointing`` reshards it. Returns the client state."""
    from mora_dist.training.callbacks import TrainerEngineView

    ckpt = Path(run_dir) / "checkpoints"
    folder = ckpt / (tag or resume_tag(ckpt))
    return dist_checkpoint.load_checkpoint(folder, TrainerEngineView(model, None, None, 0))
