"""Every copy of a trainable parameter and of its optimizer state under megatron-core's optimizers.

The only module that touches megatron-core optimizer internals (it implements
:class:`mora_dist.training.optimizer_state.OptimizerState`). ``get_megatron_optimizer`` returns a
``ChainedOptimizer`` over one or more of these, each holding a parameter ``p`` of the module as:

- ``FP32Optimizer``: ``p`` is its own master; the torch optimizer's state is keyed by ``p``.
- ``Float16OptimizerWithFloat16Params``: a bf16/fp16 ``p`` has a full fp32 master in
  ``fp32_from_float16_groups`` (state keyed by it); an fp32 ``p`` (``fp32_from_fp32_groups``) is its own master.
- ``DistributedOptimizer``: each data-parallel rank owns the range ``_get_model_param_range_map(p)["param"]`` of
  ``p.view(-1)`` (possibly empty): its fp32 master is a separate tensor for a bf16/fp16 ``p``
  (``shard_fp32_from_float16_groups``) and a view of ``p`` for an fp32 ``p`` (``shard_fp32_groups``); the state is
  keyed by that shard. ``p.data`` itself is a view of DDP's ``param_and_grad_buffer``, all-gathered from the
  owners after every step.

Writing only ``p.data`` is undone at the next step (the master is copied back: ``dW`` counted twice after a
ReMoRA merge), so :func:`set_full` writes the module copy and the master, and the moments in the owning shard.
Full values are assembled from the shards by a SUM all-reduce over the optimizer's data-parallel group (the
ranges are disjoint): the functions are collective over it. Tested with megatron-core 0.16 on CPU (gloo).

Spec: §5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from mora_dist.errors import MoRAError
from mora_dist.training.optimizer_state.protocol import MOMENT_KEYS


class _Copy(NamedTuple):
    """Where one leaf optimizer keeps ``p`` on this rank: ``master``, the tensor the inner torch optimizer steps
    and keys its state by (``None`` when this rank owns no part of ``p``), the range ``[start, end)`` of
    ``p.view(-1)`` it covers, and the data-parallel group the ranges are spread over (``None``: unsharded)."""

    leaf: Any
    master: torch.Tensor | None
    start: int
    end: int
    group: Any


def _leaves(optimizer: Any) -> list[Any]:
    """The ``FP32Optimizer``/``Float16OptimizerWithFloat16Params``/``DistributedOptimizer`` under ``optimizer``."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is None:
        return [optimizer]
    return [leaf for inner in chained for leaf in _leaves(inner)]


def _kind(leaf: Any) -> str:
    # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    config = getattr(leaf, "config", None)
    for flag in ("use_precision_aware_optimizer", "optimizer_cpu_offload"):
        if getattr(config, flag, False):  # the main params live inside TE's FusedAdam / the offload optimizer
            raise MoRAError(f"megatron OptimizerConfig({flag}=True) is not supported by ReMoRA/ReLoRA merges: "
                            "its fp32 main params are not reachable; set it to False")
    if getattr(getattr(leaf, "ddp_config", None), "use_megatron_fsdp", False):
        raise MoRAError("megatron FSDP (DistributedDataParallelConfig(use_megatron_fsdp=True)) is not supported by "
                        "ReMoRA/ReLoRA merges; use megatron DistributedDataParallel")

    if isinstance(leaf, DistributedOptimizer):
        return "distributed"
    if isinstance(leaf, Float16OptimizerWithFloat16Params):
        return "float16"
    if isinstance(leaf, FP32Optimizer):
        return "fp32"
    raise MoRAError(
        f"megatron optimizer {type(leaf).__name__} is not supported by ReMoRA/ReLoRA merges; supported: "
        "FP32Optimizer, Float16OptimizerWithFloat16Params, DistributedOptimizer (in a ChainedOptimizer)"
    )


def _holds(leaf: Any, p: nn.Parameter) -> bool:
    """Whether ``leaf`` optimizes ``p`` (the same answer on every data-parallel rank)."""
    if getattr(leaf, "is_stub_optimizer", False):
        return False
    kind = _kind(leaf)
    if kind == "distributed":
        # model_param_gbuf_map lists only the parameters with a range on this rank; the buffers list them all.
        return any(p in buffer.param_index_map for buffer in leaf.buffers)
    if kind == "float16":
        return any(q is p for groups in (leaf.float16_groups, leaf.fp32_from_fp32_groups) for g in groups for q in g)
    return any(q is p for g in leaf.optimizer.param_groups for q in g["params"])


def _locate(optimizer: Any, p: nn.Parameter) -> _Copy:
    for leaf in _leaves(optimizer):
        if not _holds(leaf, p):
            continue
        kind = _kind(leaf)
        if kind == "fp32":
            return _Copy(leaf, p, 0, p.numel(), None)
        if kind == "float16":
            for model_group, main_group in zip(leaf.float16_groups, leaf.fp32_from_float16_groups):
                for model, main in zip(model_group, main_group):
                    if model is p:
                        return _Copy(leaf, main, 0, p.numel(), None)
            return _Copy(leaf, p, 0, p.numel(), None)  # an fp32 parameter is its own master
        for model_groups, main_groups in ((leaf.model_float16_groups, leaf.shard_fp32_from_float16_groups),
                                          (leaf.model_fp32_groups, leaf.shard_fp32_groups)):
            for model_group, main_group in zip(model_groups, main_groups):
                for model, main in zip(model_group, main_group):
                    if model is p:  # only parameters with a range on this rank are listed
                        param_range = leaf._get_model_param_range_map(p)["param"]
                        return _Copy(leaf, main, param_range.start, param_range.end, leaf.data_parallel_group)
        return _Copy(leaf, None, 0, 0, leaf.data_parallel_group)
    raise MoRAError(f"the megatron optimizer ({type(optimizer).__name__}) does not hold this parameter "
                    f"(shape {tuple(p.shape)})")


def _inner_state(copy: _Copy) -> dict[str, Any]:
    """The torch optimizer's state of this rank's master of ``p`` (empty before the first step or without one)."""
    return {} if copy.master is None else copy.leaf.optimizer.state.get(copy.master, {})


def _full(copy: _Copy, p: nn.Parameter, local: torch.Tensor | None) -> torch.Tensor:
    """Assemble the full fp32 value (shape of ``p``) from this rank's flat part ``local`` of ``[start, end)``."""
    full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    if local is not None:
        full[copy.start:copy.end] = local.detach().float().view(-1)
    if copy.group is not None and dist.get_world_size(copy.group) > 1:
        dist.all_reduce(full, group=copy.group)
    return full.view(p.shape)


def check(optimizer: Any, named_params: Sequence[tuple[str, nn.Parameter]]) -> None:
    """Raise ``MoRAError`` naming the parameter when ``optimizer`` (or a leaf of it) cannot be written. No
    communication, no change."""
    for leaf in _leaves(optimizer):
        if not getattr(leaf, "is_stub_optimizer", False):
            _kind(leaf)
    for name, p in named_params:
        if not any(_holds(leaf, p) for leaf in _leaves(optimizer)):
            raise MoRAError(
                f"parameter {name!r} (shape {tuple(p.shape)}) is not optimized by the megatron optimizer "
                f"{type(optimizer).__name__}; build the optimizer (get_megatron_optimizer) after apply_mora/"
                "apply_lora, over the model the callback merges"
            )


@contextlib.contextmanager
def gathered(params: Sequence[nn.Parameter], *, modifier_rank: int | None = None) -> Iterator[None]:
    """A no-op: megatron-core keeps every parameter whole in the module (``p.data`` is all-gathered)."""
    yield


def get_full(optimizer: Any, p: nn.Parameter, key: str | None = None) -> torch.Tensor | None:
    """The full fp32 master (``key=None``) or moment ``key`` of ``p``, shape of ``p``; ``None`` if the optimizer
    keeps no such moment (before the first step). Collective over the optimizer's data-parallel group."""
    copy = _locate(optimizer, p)
    if key is None:
        return _full(copy, p, copy.master)
    if key not in state_keys(optimizer, p):
        return None
    return _full(copy, p, _inner_state(copy).get(key))


def state_keys(optimizer: Any, p: nn.Parameter) -> list[str]:
    """The moment keys the optimizer keeps for ``p``, agreed over the data-parallel group (a rank that owns no
    part of ``p`` has none locally)."""
    copy = _locate(optimizer, p)
    state = _inner_state(copy)
    present = torch.tensor([float(torch.is_tensor(state.get(k))) for k in MOMENT_KEYS])
    if copy.group is not None and dist.get_world_size(copy.group) > 1:
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=copy.group)
    return [k for k, flag in zip(MOMENT_KEYS, present.tolist()) if flag]


@torch.no_grad()
def set_full(optimizer: Any, p: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Write the full ``value`` (shape of ``p``) to the moment ``key`` of ``p`` in the owning shard, or with
    ``key=None`` to the module's copy *and* the fp32 master, so the next step cannot copy an old value back.
    Call on every rank with the same ``value``."""
    copy = _locate(optimizer, p)
    flat = value.detach().reshape(-1).float().to(p.device)
    if key is None:
        p.data.copy_(flat.view(p.shape).to(p.dtype))
        if copy.master is not None and copy.master is not p:
            copy.master.view(-1).copy_(flat[copy.start:copy.end].to(copy.master.dtype))
        return
    moment = _inner_state(copy).get(key)
    if torch.is_tensor(moment):
        moment.view(-1).copy_(flat[copy.start:copy.end].to(moment.dtype))


def zeroed_fraction(optimizer: Any, params: Sequence[nn.Parameter]) -> float:
    """Fraction of the moment entries of ``params`` that read back as exactly zero (1.0 after a full reset).
    Collective."""
    zeros = total = 0
    for p in params:
        for key in state_keys(optimizer, p):
            value = get_full(optimizer, p, key)
            zeros += int((value == 0).sum())
            total += value.numel()
    return zeros / total if total else 0.0


def prepare_for_load(optimizer: Any) -> None:
    """Give a fresh ``DistributedOptimizer`` its Adam state before a checkpoint is loaded into it: without Apex or
    Transformer Engine megatron-core 0.16 steps ``torch.optim.AdamW``, whose state is created at the first step,
    and ``DistributedOptimizer.state_dict()`` (called by ``sharded_state_dict(..., is_loading=True)``) then
    fails on an empty state. megatron's own dummy step (zero gradients) allocates it; the load overwrites it."""
    for leaf in _leaves(optimizer):
        if getattr(leaf, "is_stub_optimizer", False) or _kind(leaf) != "distributed" or leaf.optimizer.state:
            continue
        leaf._init_optimizer_states_with_dummy_values()


@torch.no_grad()
def ensure_adam_state(optimizer: Any) -> None:
    """Give every master of a fresh optimizer zero Adam moments and step 0 (``torch.optim.AdamW`` creates them at
    its first step), so a checkpoint's values can be written into them with :func:`set_full`."""
    for leaf in _leaves(optimizer):
        inner = getattr(leaf, "optimizer", None)
        if getattr(leaf, "is_stub_optimizer", False) or inner is None:
            continue
        for group in inner.param_groups:
            for master in group["params"]:
                state = inner.state[master]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(master, dtype=torch.float32),
                                 exp_avg_sq=torch.zeros_like(master, dtype=torch.float32))


def adam_steps(optimizer: Any) -> list[float | None]:
    """Per leaf optimizer, the step count of its torch optimizer's state (``None`` without state)."""
    steps: list[float | None] = []
    for leaf in _leaves(optimizer):
        inner = getattr(leaf, "optimizer", None)
        state = next(iter(inner.state.values()), {}) if inner is not None else {}
        step = state.get("step")
        steps.append(None if step is None else float(step))
    return steps


@torch.no_grad()
def set_adam_steps(optimizer: Any, steps: Sequence[float | None]) -> None:
    """Restore :func:`adam_steps` after a checkpoint load. megatron-core 0.16's distributed optimizer restores
    ``torch.optim.AdamW``'s per-parameter ``step`` from the in-memory placeholder, not from the checkpoint, so a
    resumed run's bias correction would restart without this; and it gives every parameter the same ``step``
    tensor, which AdamW's foreach step then increments once per parameter. Each parameter gets its own here."""
    leaves = _leaves(optimizer)
    known = {step for step in steps if step is not None}
    if len(steps) != len(leaves) and len(known) <= 1:
        # the leaves step together; their number follows the layout (MoE experts get their own optimizer under
        # expert parallelism only), so one step count serves any layout
        steps = [next(iter(known), None)] * len(leaves)
    if len(steps) != len(leaves):
        raise MoRAError(f"checkpoint has Adam steps for {len(steps)} optimizers, the model's ChainedOptimizer has "
                        f"{len(leaves)}; resume with the same model and optimizer configuration")
    for leaf, step in zip(leaves, steps):
        if step is None or getattr(leaf, "optimizer", None) is None:
            continue
        for state in leaf.optimizer.state.values():
            old = state.get("step")
            if torch.is_tensor(old):
                state["step"] = torch.full_like(old, step)
            elif old is not None:
                state["step"] = step


def _float16_sharded_state_dict(self: Any, model_sharded_state_dict: dict, is_loading: bool = False,
                                metadata: dict | None = None) -> dict:
    """``Float16OptimizerWithFloat16Params.sharded_state_dict`` (megatron-core 0.16, optimizer.py 800-848) with
    the optimizer-state ids mapped over every parameter in the torch optimizer's order, fp32 ones included.
    megatron's maps only its bf16/fp16 parameters, so an fp32 ``M`` beside them (or alone: only ``M`` trains)
    fails with "Param id 0 does not match any model sharded param", or pairs states with the wrong tensors
    when fp32 and bf16 parameters interleave."""
    # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        self.init_state_fn(self.optimizer, self.config)
    state_dict = self.state_dict()
    ordered, ids_of_masters = [], {}
    for g, (group, saved) in enumerate(zip(self.optimizer.param_groups, state_dict["optimizer"]["param_groups"])):
        model_of_master = {id(m): p for m, p in zip(self.fp32_from_float16_groups[g], self.float16_groups[g])}
        for param, param_id in zip(group["params"], saved["params"]):
            ordered.append(model_of_master.get(id(param), param))
            ids_of_masters[id(param)] = param_id
    id_to_sharded = get_param_id_to_sharded_param_map(model_sharded_state_dict, iter(ordered))
    state_dict["fp32_from_fp16_params"] = [
        [make_sharded_optimizer_tensor(id_to_sharded[ids_of_masters[id(master)]], master,
                                       prefix="optimizer.state.fp32_param") for master in masters]
        for masters in state_dict["fp32_from_fp16_params"]
    ]
    step = self._extract_common_per_param_step(state_dict["optimizer"])
    optim_state_to_sharding_state(state_dict["optimizer"], id_to_sharded, exclude_keys="step")
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict


def make_checkpointable(optimizer: Any) -> None:
    """Let ``optimizer.sharded_state_dict`` / ``load_state_dict`` (what Megatron-LM's ``torch_dist`` ``--save`` /
    ``--load`` call) carry MoRA's parameters exactly, in place and idempotently, on megatron-core 0.16:

    - ``Float16OptimizerWithFloat16Params``: :func:`_float16_sharded_state_dict` (an fp32 ``M`` beside bf16
      weights);
    - ``DistributedOptimizer``: :func:`prepare_for_load` before a load; the load under ``no_grad`` (megatron copies
      into the main shards with autograd on, and an fp32 ``M``'s shard is a view of a leaf that requires grad);
      and the torch optimizer's step count saved beside the state (``mora_adam_step``) and restored with
      :func:`set_adam_steps` (megatron restores a placeholder, so bias correction would restart).

    Every kind refuses to load the optimizer state of a checkpoint without MoRA adapters (a base model's: its
    moments belong to the base weights, none to ``M``), naming the flags that skip it.
    """
    import types

    for leaf in _leaves(optimizer):
        if getattr(leaf, "is_stub_optimizer", False) or leaf.__dict__.get("_mora_checkpointable"):
            continue
        kind = _kind(leaf)
        if kind == "float16":
            leaf.sharded_state_dict = types.MethodType(_float16_sharded_state_dict, leaf)
        elif kind == "distributed":
            _patch_distributed(leaf)
        _refuse_base_optimizer_state(leaf)
        leaf._mora_checkpointable = True


def _refuse_base_optimizer_state(leaf: Any) -> None:
    from mora_dist.parallel.layers import adapters_in_checkpoint  # megatron-core is heavy: loaded where used

    build = leaf.sharded_state_dict

    def sharded_state_dict(model_sharded_state_dict: dict, is_loading: bool = False, *args: Any,
                           **kwargs: Any) -> dict:
        if is_loading and not adapters_in_checkpoint(kwargs.get("metadata")):
            raise MoRAError("the checkpoint being loaded holds no MoRA adapters (a base model's), so its optimizer "
                            "state is the base weights' and none is M's: load it with --finetune or "
                            "--no-load-optim (Megatron-LM), or pass it as --pretrained-checkpoint")
        return build(model_sharded_state_dict, is_loading, *args, **kwargs)

    leaf.sharded_state_dict = sharded_state_dict


def _patch_distributed(leaf: Any) -> None:
    save, load = leaf.sharded_state_dict, leaf.load_state_dict

    def sharded_state_dict(model_sharded_state_dict: dict, is_loading: bool = False, *args: Any,
                           **kwargs: Any) -> dict:
        if is_loading:
            prepare_for_load(leaf)
        state = save(model_sharded_state_dict, is_loading, *args, **kwargs)
        state[ADAM_STEP_KEY] = adam_steps(leaf)[0]
        return state

    def load_state_dict(state_dict: dict) -> Any:
        step = state_dict.pop(ADAM_STEP_KEY, None)
        with torch.no_grad():
            result = load(state_dict)
        if step is not None:
            set_adam_steps(leaf, [step])
        return result

    leaf.sharded_state_dict, leaf.load_state_dict = sharded_state_dict, load_state_dict


ADAM_STEP_KEY = "mora_adam_step"
