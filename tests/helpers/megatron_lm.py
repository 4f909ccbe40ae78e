"""A stand-in for Megatron-LM's ``megatron/training/training.py`` at core_v0.16.1, which is not on the package
index: the same megatron-core entry points, called in the same order, looked up as module globals the way
``pretrain()`` looks them up (so :class:`mora_dist.integrations.megatron_lm.MegatronLMRecipe` patches it as it
patches the real module). Line numbers cite training.py and checkpointing.py of that tag.

Only what the MoRA recipe meets is kept: one model chunk per pipeline stage (no virtual pipeline), a constant
learning rate, ``torch_dist`` checkpoints. ``ARGS`` plays ``get_args()``; the test sets it before :func:`pretrain`.
``ARGS.megatron_lm = "main"`` plays Megatron-LM main's ``train()`` instead, which assigns the finalize function only
where none is set (training.py 4365-4366 at main d98e8a64dd).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,  # training.py imports it under this name
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_model_config

ARGS = SimpleNamespace(bf16=False, use_distributed_optimizer=False, lr=1e-2, train_iters=8, micro_batch_size=2,
                       num_microbatches=2, seq_length=16, save=None, save_interval=None, load=None, iteration=0,
                       dist_ckpt_strictness="assume_ok_unexpected", finalize_through_config=True,
                       pretrained_checkpoint=None, finetune=False, no_load_optim=False, megatron_lm="0.16")
HISTORY: list[dict] = []  # per iteration: {"iteration", "loss"}


def get_model(model_provider_func, wrap_with_ddp=True):
    """training.py 1161-1300: this pipeline stage's model, ``Float16Module`` under --bf16, then megatron DDP."""
    model = model_provider_func(pre_process=parallel_state.is_pipeline_first_stage(),
                                post_process=parallel_state.is_pipeline_last_stage())
    config = get_model_config(model)
    if ARGS.bf16:
        model = Float16Module(config, model)
    if wrap_with_ddp:
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=ARGS.use_distributed_optimizer,
                                                   grad_reduce_in_fp32=ARGS.bf16)
        model = DistributedDataParallel(config, ddp_config, model)
    return [model]


def setup_model_and_optimizer(model_provider_func, model_type, checkpointing_context=None):
    """training.py 1438-1560: get_model, get_megatron_optimizer, then --load (1537)."""
    model = get_model(model_provider_func)
    config = OptimizerConfig(optimizer="adam", lr=ARGS.lr, weight_decay=0.0, clip_grad=1.0, bf16=ARGS.bf16,
                             use_distributed_optimizer=ARGS.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(config, model)
    if ARGS.load is not None or ARGS.pretrained_checkpoint is not None:
        ARGS.iteration = load_checkpoint(model, optimizer, None)
    return model, optimizer, None


def train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
               forward_backward_func, iteration=None):
    """training.py 1603-1720: zero the grad buffers and the optimizer, the schedule (which calls
    ``config.finalize_model_grads_func``), ``optimizer.step()``."""
    for model_chunk in model:
        model_chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses_reduced = forward_backward_func(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
        num_microbatches=ARGS.num_microbatches, seq_length=ARGS.seq_length, micro_batch_size=ARGS.micro_batch_size,
        decoder_seq_length=None, forward_only=False)
    if not ARGS.finalize_through_config:  # a fork that finalizes by hand instead of through the config
        finalize_model_grads(model)
    update_successful, grad_norm, num_zeros_in_grad = optimizer.step()
    assert update_successful
    # the loss exists on the last stage (training.py 1740-1760 reduces it there); shared here for the test
    loss = torch.tensor([sum(float(x["lm loss"]) for x in losses_reduced) / max(len(losses_reduced), 1)],
                        dtype=torch.float64)
    dist.broadcast(loss, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return {"lm loss": float(loss)}, not update_successful, False, False, 0, grad_norm, num_zeros_in_grad


def train(forward_step_func, model, optimizer, opt_param_scheduler, train_data_iterator, config):
    """training.py 2417-2860: the config hooks (2547-2565, finalize assigned unconditionally; on main only when
    unset), the loop calling ``train_step(..., iteration=iteration)`` (2795), ``iteration += 1`` (2839), then the
    periodic save."""
    config.grad_scale_func = optimizer.scale_loss
    if not ARGS.finalize_through_config:
        config.finalize_model_grads_func = None
    elif ARGS.megatron_lm == "0.16" or config.finalize_model_grads_func is None:
        config.finalize_model_grads_func = finalize_model_grads
    forward_backward_func = get_forward_backward_func()
    iteration = ARGS.iteration
    while iteration < ARGS.train_iters:
        loss_dict, *_ = train_step(forward_step_func, train_data_iterator, model, optimizer, opt_param_scheduler,
                                   config, forward_backward_func, iteration=iteration)
        iteration += 1
        HISTORY.append({"iteration": iteration, "loss": loss_dict["lm loss"]})
        if ARGS.save and ARGS.save_interval and iteration % ARGS.save_interval == 0:
            save_checkpoint(iteration, model, optimizer, opt_param_scheduler)
    return iteration


def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func):
    """training.py 702-1060: setup_model_and_optimizer (module global), the data iterators, train."""
    model, optimizer, opt_param_scheduler = setup_model_and_optimizer(model_provider, model_type)
    config = get_model_config(model[0])
    train_data_iterator = train_valid_test_dataset_provider(ARGS.iteration)
    return model, optimizer, train(forward_step_func, model, optimizer, opt_param_scheduler,
                                   train_data_iterator, config)


def unwrap_model(model):
    """megatron/training/utils.py unwrap_model: the modules inside DDP and Float16Module."""
    out = []
    for chunk in model:
        while isinstance(chunk, (DistributedDataParallel, Float16Module)):
            chunk = chunk.module
        out.append(chunk)
    return out


def _build_sharded_state_dict_metadata():
    """checkpointing.py 401-433 (``--dist-ckpt-optim-fully-reshardable`` off)."""
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"} if ARGS.use_distributed_optimizer else {}
    metadata.update(singleton_local_shards=False, chained_optim_avoid_prefix=True,
                    dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return metadata


def _state_dict(model, optimizer, metadata, iteration=None, is_loading=False):
    """checkpointing.py generate_state_dict (877-945), ``torch_dist`` format, on the unwrapped model (504,
    1504): one ``metadata`` dict for the model and the optimizer (600-601, 1620-1621)."""
    model = unwrap_model(model)
    state_dict = {"checkpoint_version": 3.0}
    if iteration is not None:
        state_dict["iteration"] = iteration
    state_dict["model"] = model[0].sharded_state_dict(metadata=metadata)
    if optimizer is not None:
        state_dict["optimizer"] = optimizer.sharded_state_dict(state_dict, is_loading=is_loading,
                                                               metadata=metadata)
    return state_dict


def save_checkpoint(iteration, model, optimizer, opt_param_scheduler):
    """checkpointing.py save_checkpoint: the metadata (587), generate_state_dict (593), ``dist_checkpointing.save``
    with that metadata as the checkpoint's content metadata (635-639), the tracker."""
    name = os.path.join(ARGS.save, f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(name, exist_ok=True)
    dist.barrier()
    metadata = _build_sharded_state_dict_metadata()
    state_dict = _state_dict(model, optimizer, metadata, iteration)
    dist_checkpointing.save(state_dict, name, content_metadata=_clean_metadata_for_serialization(metadata))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(ARGS.save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    dist.barrier()


def load_checkpoint(model, optimizer, opt_param_scheduler):
    """checkpointing.py load_checkpoint: --pretrained-checkpoint when --load holds none (1494-1502, which sets
    --finetune), the tracker, the content metadata of the checkpoint (1575) handed to the model's and the
    optimizer's sharded_state_dict (1620-1621; no optimizer under --finetune / --no-load-optim, 1579),
    ``dist_checkpointing.load`` with --dist-ckpt-strictness (1130), ``model.load_state_dict(state_dict['model'],
    strict=True)`` (1762), ``optimizer.load_state_dict`` (1794). Returns the iteration (0 under --finetune)."""
    load_dir = ARGS.load
    if load_dir is None or not os.path.exists(os.path.join(load_dir, "latest_checkpointed_iteration.txt")):
        load_dir, ARGS.finetune = ARGS.pretrained_checkpoint, True
    with open(os.path.join(load_dir, "latest_checkpointed_iteration.txt")) as f:
        iteration = int(f.read())
    name = os.path.join(load_dir, f"iter_{iteration:07d}")
    metadata = dist_checkpointing.load_content_metadata(name) or {}
    metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    with_optimizer = not ARGS.finetune and not ARGS.no_load_optim
    sharded = _state_dict(model, optimizer if with_optimizer else None, metadata, is_loading=True)
    state_dict = dist_checkpointing.load(sharded, name, strict=ARGS.dist_ckpt_strictness)
    model[0].load_state_dict(state_dict["model"], strict=True)
    if with_optimizer:
        optimizer.load_state_dict(state_dict["optimizer"])
    return 0 if ARGS.finetune else state_dict["iteration"]


def reset() -> None:
    """Back to the defaults (one harness per worker process)."""
    HISTORY.clear()
    ARGS.__dict__.update(bf16=False, use_distributed_optimizer=False, save=None, save_interval=None, load=None,
                         micro_batch_size=2,
                         iteration=0, finalize_through_config=True, pretrained_checkpoint=None, finetune=False,
                         no_load_optim=False, megatron_lm="0.16")
