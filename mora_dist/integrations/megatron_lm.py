"""MoRA / ReMoRA inside Megatron-LM's own ``pretrain()`` (``pretrain_gpt.py`` and the forks built on it).

The whole change to ``pretrain_gpt.py`` is one object and one wrapped provider (``docs/megatron.md`` gives the
diff)::

    recipe = MegatronLMRecipe(MoRAConfig(r=128, mora_type=1, target_modules=[
        "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]),
        ReMoRACallback(merge_every=2000, type_cycle=(1, 2), restart_warmup=0))
    pretrain(train_valid_test_datasets_provider, recipe.model_provider(partial(model_provider, gpt_builder)),
             ModelType.encoder_or_decoder, forward_step)

What it does, and why each piece is needed (Megatron-LM core_v0.16.1 ``megatron/training/training.py``):

- ``pretrain()`` has no optimizer or per-step hook, so the recipe wraps the module's ``setup_model_and_optimizer``
  (builds :class:`MegatronReMoRA` once the optimizer exists and ``--load`` has run) and ``train_step`` (calls
  :meth:`MegatronReMoRA.step` with the completed iteration after ``optimizer.step()``); ``pretrain`` and
  ``train`` look both up as module globals at call time.
- ``train()`` assigns ``config.finalize_model_grads_func = finalize_model_grads`` itself (line 2565), which would
  drop the once-per-step tensor-parallel sum of replicated ``M`` gradients
  (``tensor_parallel_grad_sync="step"``). The provider gives the model's config a ``finalize_model_grads_func``
  that wraps whatever is assigned with that sum (once: an already-wrapped function is kept), and
  :meth:`MegatronReMoRA.step` checks every ``check_every`` steps that the tensor-parallel copies of each
  replicated ``M`` agree, raising :class:`MoRAError` if anything else broke the sync.
- Megatron's ``--save`` / ``--load`` (``torch_dist``) carry the adapters (``mora_M`` and the bf16 merge residual
  are in every MoRA layer's ``sharded_state_dict``) and, through ``mora_remora._extra_state`` on the first
  pipeline stage's model, the ReMoRA state (cycle step, type, merges done, kept cycles); a resumed run reapplies
  the type.
- ``get_megatron_optimizer`` is wrapped so the optimizer's ``sharded_state_dict`` holds an fp32 ``M`` beside
  bf16 weights (megatron-core 0.16's ``Float16OptimizerWithFloat16Params`` maps only its bf16 parameters:
  "Param id 0 does not match any model sharded param") and a fresh ``DistributedOptimizer`` can be loaded into
  (:func:`mora_dist.training.optimizer_state.megatron.make_checkpointable`).
- A base model's ``torch_dist`` checkpoint (``--pretrained-checkpoint``) lacks ``mora_M``, which megatron-core's
  default strictness refuses. The recipe's checkpoints carry the content-metadata flag
  :data:`~mora_dist.parallel.layers.ADAPTERS_SAVED`; loading one without it leaves the adapters and the ReMoRA state
  out of the loaded state dict (they start fresh) and refuses its optimizer state.
- A type cycle usually changes how ``M`` is split over tensor-parallel ranks, which a run cannot do, so with
  more than one type and ``tensor_parallel_sharding="auto"`` the recipe replicates ``M``.

:func:`mora_model_provider` and :class:`MegatronReMoRA` remain for loops that call them by hand.

Spec: §3, §4.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mora_dist.config import MoRAConfig
from mora_dist.errors import MoRAError
from mora_dist.model import apply_mora, mora_layers
from mora_dist.parallel.mappings import finalize_model_grads, sum_replicated_grads
from mora_dist.training.optimizer_state import megatron as megatron_state

logger = logging.getLogger(__name__)

__all__ = ["MegatronLMRecipe", "MegatronReMoRA", "mora_model_provider"]

STATE_MODULE = "mora_remora"  # the first stage's holder of the ReMoRA state: mora_remora._extra_state
_FINALIZE = "_mora_finalize_model_grads_func"


def _with_replicated_sum(finalize: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """``finalize`` followed by :func:`sum_replicated_grads`, unless it already ends with that sum."""
    if finalize is None or getattr(finalize, "sums_replicated_mora_grads", False):
        return finalize

    @functools.wraps(finalize)
    def finalize_then_sum(model: list[nn.Module], *args: Any, **kwargs: Any) -> Any:
        result = finalize(model, *args, **kwargs)
        sum_replicated_grads(model)
        return result

    finalize_then_sum.sums_replicated_mora_grads = True
    return finalize_then_sum


finalize_model_grads.sums_replicated_mora_grads = True
_GUARDED_CONFIGS: dict[type, type] = {}


def _guarded_config_class(cls: type) -> type:
    if cls not in _GUARDED_CONFIGS:
        def get(self: Any) -> Any:
            return self.__dict__.get(_FINALIZE)

        def set_(self: Any, value: Any) -> None:
            self.__dict__[_FINALIZE] = _with_replicated_sum(value)

        _GUARDED_CONFIGS[cls] = type(f"MoRA{cls.__name__}", (cls,), {
            "finalize_model_grads_func": property(get, set_), "__module__": __name__})
    return _GUARDED_CONFIGS[cls]


def keep_replicated_grad_sum(config: Any) -> None:
    """Make ``config.finalize_model_grads_func`` run :func:`sum_replicated_grads` after whatever function is
    assigned to it, now or later (Megatron-LM 0.16's ``train()`` assigns its own), in place: the config becomes
    an instance of a subclass of its own class whose ``finalize_model_grads_func`` is a property."""
    if type(config) in _GUARDED_CONFIGS.values():
        return
    current = config.__dict__.pop("finalize_model_grads_func", None)
    config.__class__ = _guarded_config_class(type(config))
    config.finalize_model_grads_func = current if current is not None else finalize_model_grads


@torch.no_grad()
def disagreeing_replicas(chunks: list[nn.Module], rtol: float = 1e-6) -> list[str]:
    """Names of MoRA layers whose replicated ``M`` differs between the ranks of its tensor-parallel group (a
    fingerprint of every matrix, two all-reduces per group). Collective over every TP group."""
    by_group: dict[int, tuple[Any, list[tuple[str, torch.Tensor]]]] = {}
    for chunk in chunks:
        for name, layer in mora_layers(chunk):
            plan = getattr(layer, "plan", None)
            if plan is None or plan.m_dim is not None or getattr(layer, "tp_size", 1) < 2:
                continue
            by_group.setdefault(id(layer.tp_group), (layer.tp_group, []))[1].append((name, layer.mora_M))
    bad = []
    for group, named in by_group.values():
        prints = []
        for _, M in named:
            flat = M.detach().double().flatten()
            weights = torch.cos(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device))
            prints.append(torch.stack([flat.sum(), flat @ weights]))
        high = torch.stack(prints)
        low = high.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        spread = ((high - low).abs() > rtol * (1 + high.abs())).any(dim=1)
        bad += [name for (name, _), off in zip(named, spread.tolist()) if off]
    return bad


class _ReMoRAState(nn.Module):
    """Carries the ReMoRA state in the model's checkpoints as ``mora_remora._extra_state`` (a ``ShardedObject``
    under ``dist_checkpointing``, written by TP rank 0 of DP rank 0 of the first pipeline stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["remora"] = None  # the MegatronReMoRA, once built (not a submodule)
        self.loaded: dict[str, Any] | None = None

    def get_extra_state(self) -> Any:
        return None if self.remora is None else self.remora.state_dict()

    def set_extra_state(self, state: Any) -> None:
        if state is not None:
            self.loaded = state

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
                           ) -> dict[str, Any]:
        from megatron.core import parallel_state  # megatron-core is heavy: loaded only where megatron is used
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        from mora_dist.parallel.layers import adapters_in_checkpoint, leave_out_of_load

        key = f"{prefix}_extra_state"
        if not adapters_in_checkpoint(metadata):  # a base model's checkpoint: the run starts its first cycle
            leave_out_of_load(self, {key})
            return {}
        replica = (0, parallel_state.get_tensor_model_parallel_rank(),
                   parallel_state.get_data_parallel_rank(with_context_parallel=True))
        return {key: ShardedObject(key, self.get_extra_state(), (1,), (0,), replica_id=replica)}


def mora_model_provider(model_provider: Callable[..., nn.Module], config: MoRAConfig, *,
                        load_base: Callable[[nn.Module], None] | None = None,
                        carry_remora_state: bool = False) -> Callable[..., nn.Module]:
    """``model_provider`` with MoRA applied to what it returns, before Megatron wraps the model.

    Args:
        model_provider: the script's provider (any signature: ``pre_process``, ``post_process``, ``vp_stage``...).
        config: what to adapt; ``target_modules`` use Megatron names (``linear_qkv``, ``linear_fc1``...).
        load_base: called on the bare model before the adapters, e.g. to load a Hugging Face checkpoint with
            :func:`mora_dist.run.megatron.hf_weights.load_hf_into_gpt`.
        carry_remora_state: give the first stage's model the ``mora_remora`` holder of the ReMoRA state (what
            :class:`MegatronLMRecipe` does; its key is then expected in every checkpoint the model loads).

    Returns:
        A provider with the same signature. The model's config keeps the tensor-parallel sum of replicated ``M``
        gradients in ``finalize_model_grads_func`` whatever is assigned to it later
        (:func:`keep_replicated_grad_sum`).
    """

    @functools.wraps(model_provider)
    def provider(*args: Any, **kwargs: Any) -> nn.Module:
        model = model_provider(*args, **kwargs)
        if load_base is not None:
            load_base(model)
        apply_mora(model, config)
        model_config = getattr(model, "config", None)
        if model_config is not None and hasattr(model_config, "finalize_model_grads_func"):
            keep_replicated_grad_sum(model_config)
        if carry_remora_state and getattr(model, "pre_process", True):
            model.add_module(STATE_MODULE, _ReMoRAState())
        return model

    return provider


class _Engine:
    """The engine interface :class:`~mora_dist.training.remora.ReMoRACallback` reads, over Megatron's pieces."""

    def __init__(self, model: list[nn.Module], optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
        from megatron.core import parallel_state  # megatron-core is heavy: loaded only where megatron is used

        self.module = nn.ModuleList(model)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.mpu = parallel_state
        self.global_steps = 0
        self.device = next(self.module.parameters()).device


class MegatronReMoRA:
    """Runs ReMoRA from a Megatron training loop: call :meth:`step` after every ``optimizer.step()``.

    Args:
        callback: a :class:`~mora_dist.training.remora.ReMoRACallback` (or ``ReLoRACallback``).
        model: the model chunks as Megatron returns them (DDP-wrapped is fine).
        optimizer: Megatron's optimizer as ``setup_model_and_optimizer`` returns it (``FP32Optimizer``,
            ``Float16OptimizerWithFloat16Params``, ``DistributedOptimizer``, chained): a merge writes ``M = 0``
            and resets its moments in whichever copy and shard holds them
            (:mod:`mora_dist.training.optimizer_state.megatron`); or a torch optimizer.
        lr_scheduler: a restarting scheduler from :mod:`mora_dist.training.schedulers` when the callback has a
            ``restart_warmup``; ``None`` otherwise (Megatron's own scheduler does not restart).
        check_every: every this many steps (and at the first), check that the tensor-parallel copies of each
            replicated ``M`` agree (0: never).

    A ReMoRA state loaded into the model's ``mora_remora`` holder (Megatron's ``--load``) is applied here, on
    every pipeline stage.

    Spec: §3, §5.
    """

    def __init__(self, callback: Any, model: nn.Module | list[nn.Module], optimizer: Any,
                 lr_scheduler: Any = None, *, check_every: int = 10) -> None:
        chunks = model if isinstance(model, list) else [model]
        self.callback = callback
        self.check_every = check_every
        self.engine = _Engine(chunks, optimizer, lr_scheduler)
        callback.on_train_begin(self.engine)
        holders = [m for m in self.engine.module.modules() if isinstance(m, _ReMoRAState)]
        loaded = next((h.loaded for h in holders if h.loaded is not None), None)
        loaded = _from_first_stage(loaded)
        for holder in holders:
            holder.__dict__["remora"], holder.loaded = self, None
        if loaded is not None:
            self.load_state_dict(loaded)
            logger.info("ReMoRA state restored from the checkpoint: %d merges, next type %s", self.callback.merges,
                        getattr(self.callback, "current_type", "-"))

    def step(self, iteration: int) -> dict[str, float] | None:
        """After the optimizer step that completed ``iteration`` (1-based): merge when one is due; returns the
        callback's metrics (``remora/merges``...) on a merge step.

        Raises:
            MoRAError: the tensor-parallel copies of a replicated ``M`` differ (their gradients were not summed
                over the TP group: ``config.finalize_model_grads_func`` lost the sum).
        """
        first = self.engine.global_steps == 0
        self.engine.global_steps = iteration
        metrics = self.callback.on_step_end(self.engine)
        if self.check_every and (first or iteration % self.check_every == 0):
            bad = disagreeing_replicas(list(self.engine.module))
            if bad:
                raise MoRAError(
                    f"after iteration {iteration} the tensor-parallel copies of M differ in {bad[:3]}"
                    f"{' and more' if len(bad) > 3 else ''}: their gradients were not summed over the TP group. "
                    "config.finalize_model_grads_func must end with mora_dist.parallel.finalize_model_grads' sum "
                    "(build the model with mora_model_provider / MegatronLMRecipe, which keep it), or build with "
                    "tensor_parallel_grad_sync='backward'"
                )
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Save with the checkpoint (the type cycle position and the merge count)."""
        return self.callback.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the callback's state and give every layer the type it had (the cycle's current type)."""
        self.callback.load_state_dict(state)
        self.callback.on_load(self.engine, {})


def _from_first_stage(value: Any) -> Any:
    """``value`` as the first pipeline stage has it, on every stage (the state holder lives there)."""
    from megatron.core import parallel_state  # megatron-core is heavy: loaded only where megatron is used

    if not dist.is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_first_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


class MegatronLMRecipe:
    """MoRA and ReMoRA in Megatron-LM's ``pretrain()`` with one wrapped provider (see the module docstring).

    Args:
        config: what to adapt (Megatron names). With a multi-type ``callback`` and
            ``tensor_parallel_sharding="auto"``, ``M`` is replicated (a cycle must keep ``M``'s split).
        callback: a ReMoRA / ReLoRA callback with ``restart_warmup=0`` (Megatron's scheduler does not restart),
            or ``None`` for MoRA alone.
        load_base: as in :func:`mora_model_provider`.
        training: the module whose ``setup_model_and_optimizer`` and ``train_step`` ``pretrain()`` calls
            (default ``megatron.training.training``).
        check_every: as in :class:`MegatronReMoRA`.

    Building it patches ``training``; :meth:`uninstall` restores it.
    """

    def __init__(self, config: MoRAConfig, callback: Any = None, *,
                 load_base: Callable[[nn.Module], None] | None = None, training: ModuleType | None = None,
                 check_every: int = 10) -> None:
        cycle = tuple(getattr(callback, "type_cycle", ()))
        if len(set(cycle)) > 1 and config.tensor_parallel_sharding == "auto":
            logger.info("type_cycle=%s: M is replicated over tensor-parallel ranks (tensor_parallel_sharding="
                        "'replicate'): the types split it differently", cycle)
            config = dataclasses.replace(config, tensor_parallel_sharding="replicate")
        self.config, self.callback, self.load_base, self.check_every = config, callback, load_base, check_every
        self.remora: MegatronReMoRA | None = None
        self._loading = False
        self.training = training if training is not None else importlib.import_module("megatron.training.training")
        patched = {"setup_model_and_optimizer": self._setup_model_and_optimizer, "train_step": self._train_step,
                   "get_megatron_optimizer": self._get_megatron_optimizer}
        self._originals = {name: getattr(self.training, name) for name in patched}
        for name, function in patched.items():
            setattr(self.training, name, function)

    def model_provider(self, model_provider: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        """The script's provider with MoRA (and the ReMoRA state holder when there is a callback), whose
        checkpoints say that they hold the adapters (:meth:`_declare_adapters`)."""
        provider = mora_model_provider(model_provider, self.config, load_base=self.load_base,
                                       carry_remora_state=self.callback is not None)

        @functools.wraps(provider)
        def declaring_provider(*args: Any, **kwargs: Any) -> nn.Module:
            return self._declare_adapters(provider(*args, **kwargs))

        return declaring_provider

    def _declare_adapters(self, model: nn.Module) -> nn.Module:
        """Megatron-LM hands one ``metadata`` dict to ``model.sharded_state_dict`` and the optimizer's, and
        stores it as the checkpoint's content metadata (checkpointing.py 587-639); on ``--load`` the dict is the
        one read back (1575-1621). Saving, the flag :data:`ADAPTERS_SAVED` goes into it; loading a checkpoint
        without the flag (a base model's, written without MoRA), the adapters are left out of what is loaded and
        start fresh, where megatron-core's strict load would otherwise stop at the missing ``mora_M``."""
        from mora_dist.parallel.layers import ADAPTERS_SAVED  # megatron-core is heavy: loaded where it is used

        build = model.sharded_state_dict

        @functools.wraps(build)
        def sharded_state_dict(*args: Any, **kwargs: Any) -> Any:
            metadata = kwargs.get("metadata", args[2] if len(args) > 2 else None)
            if metadata is not None and ADAPTERS_SAVED not in metadata:
                metadata[ADAPTERS_SAVED] = not self._loading
                if self._loading:
                    logger.info("the checkpoint holds no MoRA adapters (a base model's): M starts at zero and "
                                "ReMoRA at its first cycle")
            return build(*args, **kwargs)

        model.sharded_state_dict = sharded_state_dict
        return model

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(self.training, name, original)

    def _get_megatron_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        # before setup_model_and_optimizer's --load reads optimizer.sharded_state_dict
        optimizer = self._originals["get_megatron_optimizer"](*args, **kwargs)
        megatron_state.make_checkpointable(optimizer)
        return optimizer

    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        self._loading = True  # the state dicts built in here are those --load / --pretrained-checkpoint read into
        try:
            model, optimizer, scheduler = self._originals["setup_model_and_optimizer"](*args, **kwargs)
        finally:
            self._loading = False
        if self.callback is not None and optimizer is not None:
            self.remora = MegatronReMoRA(self.callback, model, optimizer, check_every=self.check_every)
        return model, optimizer, scheduler

    def _train_step(self, *args: Any, **kwargs: Any) -> Any:
        result = self._originals["train_step"](*args, **kwargs)
        iteration = kwargs.get("iteration", args[7] if len(args) > 7 else None)
        if iteration is None:
            raise MoRAError("Megatron-LM's train_step was called without iteration=; MegatronLMRecipe needs "
                            "Megatron-LM core_v0.16 or newer, which passes it")
        if self.remora is not None:
            metrics = self.remora.step(iteration + 1)  # train() counts the step after train_step returns
            if metrics:
                logger.info("iteration %d: %s", iteration + 1, metrics)
        return result
