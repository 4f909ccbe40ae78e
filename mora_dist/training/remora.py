"""ReMoRA and its baseline ReLoRA as training callbacks. ReMoRA: every ``merge_every`` optimizer steps, fold ``dW``
into the frozen base weights, zero ``M`` in every copy, reset its optimizer moments, switch the MoRA type and let
the scheduler restart the learning rate. ReLoRA: the same with LoRA (merge ``(alpha/r) B A``, new ``A``, ``B = 0``).

Correct under ZeRO 0-3, fp32 and bf16, and at tensor-parallel size > 1 (each rank merges its own shard of ``dW``
locally). Every write to parameters or optimizer state goes through the engine's
:class:`~mora_dist.training.optimizer_state.OptimizerState` (``optimizer_state.deepspeed`` for torch and DeepSpeed,
``optimizer_state.megatron`` for megatron-core's optimizers), chosen by
:func:`~mora_dist.training.optimizer_state.backend_for`. A merge checks that the optimizer holds every tensor it
will write before it changes anything, so a refused merge leaves the model as it was.

Why a merge can never be applied twice (the order of a training loop is ``engine.step()``, then
``callbacks.on_step_end(engine)``, then possibly ``callbacks.save_checkpoint``): a checkpoint written at step
``s`` holds the weights *after* every merge at steps ``<= s`` and the callback state that names the last of them
(``last_merged_step``), while it holds the pre-merge base weights *and* the pre-merge ``M`` of every later merge.
Resuming from ``s`` replays steps ``s+1..`` and re-does each later merge exactly once, from the same ``M`` the
crashed run merged; a merge in flight when the run crashed is lost with the process and replayed the same way.
Within a run, ``on_step_end`` is called after every micro-step (``engine.global_steps`` moves only at gradient
accumulation boundaries) and possibly twice by a caller, so a merge for a step ``<= last_merged_step`` is skipped.
Saving at a merge step before ``on_step_end`` ran would store pre-merge weights with a state that says the
merge is yet to come, and the resumed run (which starts at ``s+1``) would never do it: ``on_save`` raises then.

Spec: §3, §5.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mora_dist.config import resolve_mora_type
from mora_dist.errors import MoRAConfigError, MoRAError
from mora_dist.lora import LoRALinear, lora_layers
from mora_dist.merge import FoldNorms
from mora_dist.model import mora_layers
from mora_dist.parallel.chunks import expert_group, merge_stage_dicts, pipeline_group
from mora_dist.training.callbacks import Callback
from mora_dist.training.optimizer_state import OptimizerState, backend_for
from mora_dist.training.schedulers import RestartScheduler

logger = logging.getLogger(__name__)

_RESET_METHODS = ("full", "random", "magnitude")


def parse_optimizer_reset(value: str | dict[str, Any]) -> tuple[str, float]:
    """``"full"`` or ``{"method": "random" | "magnitude" | "full", "ratio": r}`` -> ``(method, ratio)``.

    Raises:
        MoRAConfigError: an unknown method or a ratio outside ``(0, 1]``.
    """
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, dict) or set(value) - {"method", "ratio"}:
        raise MoRAConfigError(
            f"optimizer_reset={value!r}: use 'full' or {{'method': 'random' | 'magnitude', 'ratio': 0.9}}"
        )
    method = value.get("method", "full")
    if method not in _RESET_METHODS:
        raise MoRAConfigError(f"optimizer_reset method={method!r} is not one of {_RESET_METHODS}")
    ratio = float(value.get("ratio", 1.0 if method == "full" else 0.9))
    if not 0.0 < ratio <= 1.0 or (method == "full" and ratio != 1.0):
        raise MoRAConfigError(
            f"optimizer_reset ratio={ratio!r} must be in (0, 1] (and 1 for method='full'), the fraction pruned"
        )
    return method, ratio


@torch.no_grad()
def prune_moment(value: torch.Tensor, method: str, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """ReLoRA's moment pruning: ``"full"`` zeros all, ``"random"`` zeros a random ``ratio`` of the entries,
    ``"magnitude"`` zeros those at or below the ``ratio`` quantile of ``|value|``. Spec: §3 step 4, §3.1."""
    if method == "full":
        return torch.zeros_like(value)
    if method == "random":
        keep = torch.rand(value.shape, generator=generator) > ratio
        return value * keep.to(value.device, value.dtype)
    magnitude = value.abs()
    threshold = torch.quantile(magnitude.flatten().float(), ratio)
    return value * (magnitude > threshold).to(value.dtype)


class RestartCallback(Callback):
    """What ReMoRA and ReLoRA share: when to merge, optimizer-state reset, scheduler alignment, state, metrics.

    Subclasses implement ``_layers``, ``_merge_layer`` (``W += dW`` of one layer from the optimizer's fp32
    masters, returns the fold's squared norms of this rank's shard) and ``_reinit_values`` (new values of the
    layer's trainable tensors).
    """

    prefix = "restart"

    def __init__(self, *, merge_every: int, optimizer_reset: str | dict[str, Any], restart_warmup: int,
                 seed: int) -> None:
        if isinstance(merge_every, bool) or not isinstance(merge_every, int) or merge_every < 1:
            raise MoRAConfigError(f"merge_every={merge_every!r} must be a positive integer (optimizer steps)")
        if isinstance(restart_warmup, bool) or not isinstance(restart_warmup, int) or not (
            0 <= restart_warmup < merge_every
        ):
            raise MoRAConfigError(
                f"restart_warmup={restart_warmup!r} must be an integer in [0, merge_every={merge_every})"
            )
        self.merge_every, self.restart_warmup, self.seed = merge_every, restart_warmup, seed
        self.reset_method, self.reset_ratio = parse_optimizer_reset(optimizer_reset)
        self.merged_steps: list[int] = []
        self.last_seen_step = 0
        # Every merged cycle's update in global, fp32 form (step, type, matrices or factors), so the whole run
        # exports as one exact LoRA relative to its starting weights (mora_dist.adapters.peft_lora). Spec: §2.5.
        self.cycles: list[dict[str, Any]] = []

    @property
    def merges(self) -> int:
        return len(self.merged_steps)

    @property
    def last_merged_step(self) -> int:
        return self.merged_steps[-1] if self.merged_steps else 0

    def _layers(self, module: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def _merge_layer(self, engine: Any, layer: nn.Module) -> FoldNorms:
        raise NotImplementedError

    def _reinit_values(self, layer: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _after_merge(self, layers: Sequence[nn.Module]) -> dict[str, float]:
        return {}

    def _cycle_record(self, engine: Any) -> dict[str, Any]:
        """This cycle's update before it is merged: global, fp32 (optimizer masters), on every rank."""
        raise NotImplementedError

    def _check_scheduler(self, engine: Any) -> None:
        sched = getattr(engine, "lr_scheduler", None)
        if isinstance(sched, RestartScheduler):
            if sched.cycle_length != self.merge_every or sched.restart_warmup != self.restart_warmup:
                raise MoRAConfigError(
                    f"{type(sched).__name__}(cycle_length={sched.cycle_length}, restart_warmup="
                    f"{sched.restart_warmup}) does not restart where {type(self).__name__}(merge_every="
                    f"{self.merge_every}, restart_warmup={self.restart_warmup}) merges; build it with the same values"
                )
        elif self.restart_warmup > 0:
            raise MoRAConfigError(
                f"restart_warmup={self.restart_warmup} needs a restarting scheduler, got {type(sched).__name__}; "
                "pass lr_scheduler=JaggedCosineLR(...) or RestartedCosineLR(...) with cycle_length=merge_every "
                "to deepspeed.initialize, or set restart_warmup=0"
            )

    def on_train_begin(self, engine: Any) -> None:
        self._check_scheduler(engine)
        if not self._layers(engine.module):
            raise MoRAConfigError(f"{type(self).__name__}: the engine's model has no adapter layers to merge")

    def on_step_end(self, engine: Any) -> dict[str, float] | None:
        step = int(engine.global_steps)
        self.last_seen_step = step
        if step == 0 or step % self.merge_every or step <= self.last_merged_step:
            return None
        return self.merge(engine)

    def on_save(self, engine: Any, client_state: dict[str, Any]) -> None:
        step = int(engine.global_steps)
        if step > 0 and step % self.merge_every == 0 and step > self.last_merged_step:
            raise MoRAConfigError(
                f"checkpoint at step {step} before the merge due at that step; call callbacks.on_step_end(engine) "
                "after engine.step() and before saving, or the resumed run would never merge it"
            )

    def merge(self, engine: Any) -> dict[str, float]:
        """Merge now (every rank must call): ``W += dW``, re-initialise, reset moments; returns the metrics.

        Raises:
            MoRAError: the engine's optimizer does not hold a tensor the merge writes (raised before any change).
        """
        start = time.perf_counter()
        step = int(engine.global_steps)
        state = backend_for(engine.optimizer)
        layers = self._layers(engine.module)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        # Plan every write first: a merge that cannot complete must leave W and the adapters untouched.
        chunks = engine.module if isinstance(engine.module, (list, tuple)) else [engine.module]  # pipeline chunks
        names = {id(layer): name for chunk in chunks for name, layer in chunk.named_modules()}
        plan = [(f"{names.get(id(layer), '?')}.{name}", getattr(layer, name), value)
                for layer in layers for name, value in self._reinit_values(layer, generator).items()]
        state.check(engine.optimizer, [(name, param) for name, param, _ in plan])
        record = {"step": step, **self._cycle_record(engine)}
        sums = {False: [0.0, 0.0], True: [0.0, 0.0]}  # {expert layer: [||dW||^2, ||residual||^2]}
        for layer in layers:
            norms = self._merge_layer(engine, layer)
            part = sums[bool(getattr(layer, "is_expert", False))]
            part[0] += norms.delta_sq
            part[1] += norms.residual_sq
        for _, param, value in plan:
            state.set_full(engine.optimizer, param, value)
        params = [param for _, param, _ in plan]
        self._reset_moments(state, engine.optimizer, params, generator)
        fraction = state.zeroed_fraction(engine.optimizer, params)
        self.merged_steps.append(step)
        self.cycles.append(record)
        sq_norm, residual_sq = (self._model_parallel_sum(engine, sums[False][i])
                                + self._model_parallel_sum(engine, sums[True][i], expert=True) for i in (0, 1))
        delta_norm = math.sqrt(sq_norm)
        metrics = {
            f"{self.prefix}/merges": float(self.merges),
            f"{self.prefix}/delta_norm": delta_norm,
            # what the base dtype could not absorb, relative to ||dW|| (carried to the next merge when
            # merge_compensation is on, lost otherwise; 0 for an fp32 base)
            f"{self.prefix}/merge_residual": math.sqrt(residual_sq) / delta_norm
            if delta_norm > 0 else 0.0,
            f"{self.prefix}/zeroed_fraction": fraction,
            **self._after_merge(layers),
        }
        metrics[f"{self.prefix}/merge_seconds"] = time.perf_counter() - start
        logger.info("%s merge %d at step %d: %s", self.prefix, self.merges, step, metrics)
        return metrics

    def _reset_moments(self, state: OptimizerState, optimizer: Any, params: Sequence[nn.Parameter],
                       generator: torch.Generator) -> None:
        for param in params:
            for key in state.state_keys(optimizer, param):
                if self.reset_method == "full":
                    new = torch.zeros(tuple(getattr(param, "ds_shape", param.shape)))
                else:
                    new = prune_moment(state.get_full(optimizer, param, key).cpu(), self.reset_method,
                                       self.reset_ratio, generator)
                state.set_full(optimizer, param, new, key)

    @staticmethod
    def _model_parallel_sum(engine: Any, value: float, *, expert: bool = False) -> float:
        """Sum over the tensor x pipeline group: each rank's ``dW`` is a disjoint part of the model's (its TP
        shard of its stage's layers), so the metrics are the whole model's on every layout. MoE expert layers
        (``expert``) are split over the expert-TP x expert-parallel x pipeline group instead."""
        mpu = getattr(engine, "mpu", None)
        if mpu is None or not dist.is_initialized():
            return value
        names = ("get_expert_tensor_model_pipeline_parallel_group",) if expert else ()
        names += ("get_model_parallel_group", "get_tensor_model_parallel_group")
        name = next((n for n in names if hasattr(mpu, n)), None)
        if name is None:
            return value
        group = getattr(mpu, name)()
        device = engine.device if hasattr(engine, "device") else torch.device("cpu")  # NCCL needs device tensors
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, group=group)
        return float(t.item())

    def state_dict(self) -> dict[str, Any]:
        return {
            "merge_every": self.merge_every,
            "merged_steps": list(self.merged_steps),
            "last_merged_step": self.last_merged_step,
            "step_in_cycle": self.last_seen_step - self.last_merged_step,
            "cycles": list(self.cycles),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["merge_every"] != self.merge_every:
            raise MoRAConfigError(
                f"merge_every={self.merge_every} but the checkpoint was written with merge_every="
                f"{state['merge_every']}; resume with the same value (the schedule and merges are aligned to it)"
            )
        self.merged_steps = [int(s) for s in state["merged_steps"]]
        self.cycles = list(state.get("cycles", []))  # absent in checkpoints written before cycles were kept
        self.last_seen_step = self.last_merged_step + int(state["step_in_cycle"])


class ReMoRACallback(RestartCallback):
    """ReMoRA (merge and reinitialise MoRA) as a training callback.

    Every ``merge_every`` optimizer steps, after the step: ``W += dW(M, type)`` in fp32 for every MoRA layer
    (ZeRO-3: inside ``GatheredParameters(modifier_rank=0)``; tensor parallel: each rank its own shard), ``M = 0``
    in the module and the fp32 master, the moments of ``M`` reset, the type advanced along ``type_cycle``. The
    learning-rate restart is the scheduler's job (:mod:`mora_dist.training.schedulers`), checked at
    ``on_train_begin`` to restart where this callback merges.

    Args:
        merge_every: ``T``, optimizer steps between merges (paper: 2000).
        type_cycle: MoRA types (numbers or names) used in turn; the model must be built with the first.
        optimizer_reset: ``"full"`` or ReLoRA-style ``{"method": "magnitude" | "random", "ratio": 0.9}``.
        restart_warmup: warmup steps after each restart, which the engine's scheduler must have (0: none).
        seed: seed of the pruning masks (identical on every rank).

    Reports per merge: ``remora/merges``, ``remora/type`` (the type just merged) and ``remora/next_type``,
    ``remora/delta_norm`` (Frobenius norm of all merged ``dW``), ``remora/merge_residual`` (norm of what the
    base weights' dtype could not absorb, relative to ``delta_norm``), ``remora/zeroed_fraction`` (of M's
    moments, read back through DeepSpeed's getters), ``remora/merge_seconds``.

    Spec: §3, §5.
    """

    prefix = "remora"

    def __init__(self, *, merge_every: int = 2000, type_cycle: Sequence[int | str] = (1, 2),
                 optimizer_reset: str | dict[str, Any] = "full", restart_warmup: int = 50, seed: int = 0) -> None:
        super().__init__(merge_every=merge_every, optimizer_reset=optimizer_reset, restart_warmup=restart_warmup,
                         seed=seed)
        if isinstance(type_cycle, (str, int)) or len(type_cycle) == 0:
            raise MoRAConfigError(f"type_cycle={type_cycle!r} must be a non-empty sequence of MoRA types, e.g. (1, 2)")
        self.type_cycle = tuple(resolve_mora_type(t, "type_cycle") for t in type_cycle)
        self.type_index = 0

    @property
    def current_type(self) -> int:
        return self.type_cycle[self.type_index % len(self.type_cycle)]

    def _layers(self, module: nn.Module) -> list[nn.Module]:
        return [layer for _, layer in mora_layers(module)]

    def on_train_begin(self, engine: Any) -> None:
        super().on_train_begin(engine)
        for name, layer in mora_layers(engine.module):
            for mora_type in self.type_cycle:
                try:
                    layer._make_operator(mora_type)
                except MoRAError as exc:  # odd r_hat for RoPE, or a TP split of M that the type would change
                    raise MoRAConfigError(f"type_cycle={self.type_cycle}: layer {name!r} cannot use type "
                                          f"{mora_type}: {exc}") from exc
            # Tensor-parallel layers re-plan their shard in _make_operator: end on the layer's own type.
            layer.operator = layer._make_operator(layer.mora_type)
            if self.merges == 0 and layer.mora_type != self.current_type:
                raise MoRAConfigError(
                    f"layer {name!r} has mora_type={layer.mora_type} but type_cycle={self.type_cycle} starts with "
                    f"{self.current_type}; build the model with mora_type={self.current_type}"
                )
        self._apply_type(engine)

    def on_load(self, engine: Any, client_state: dict[str, Any]) -> None:
        self._apply_type(engine)

    def _apply_type(self, engine: Any) -> None:
        for _, layer in mora_layers(engine.module):
            layer.set_mora_type(self.current_type)

    @torch.no_grad()
    def _merge_layer(self, engine: Any, layer: nn.Module) -> FoldNorms:
        # dW from the optimizer's fp32 master of M (under DeepSpeed bf16 the module copy is bf16-rounded);
        # M itself is zeroed in every copy by the optimizer-state backend afterwards.
        state = backend_for(engine.optimizer)
        M = state.get_full(engine.optimizer, layer.mora_M)
        weight = layer._base_weight_shard()
        with state.gathered([weight], modifier_rank=0):
            return layer.merge(reinit=False, M=M)

    def _cycle_record(self, engine: Any) -> dict[str, Any]:
        state = backend_for(engine.optimizer)
        matrices = {name: layer.get_global_M(state.get_full(engine.optimizer, layer.mora_M)).float().cpu()
                    for name, layer in mora_layers(engine.module)}
        # every rank keeps the whole model's record: pipeline stages and expert-parallel ranks hold other layers
        for group in (pipeline_group(engine.module), expert_group(engine.module)):
            matrices = merge_stage_dicts(matrices, group)
        return {"mora_type": self.current_type, "matrices": matrices}

    def _reinit_values(self, layer: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
        M = layer.mora_M
        return {"mora_M": torch.zeros(tuple(getattr(M, "ds_shape", M.shape)))}

    def _after_merge(self, layers: Sequence[nn.Module]) -> dict[str, float]:
        merged_type = self.current_type
        self.type_index += 1
        for layer in layers:
            layer.set_mora_type(self.current_type)
        return {"remora/type": float(merged_type), "remora/next_type": float(self.current_type)}

    def state_dict(self) -> dict[str, Any]:
        # The type itself is not stored: it is type_cycle[type_index], as current_type reads it.
        return {**super().state_dict(), "type_cycle": list(self.type_cycle), "type_index": self.type_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["type_cycle"]) != self.type_cycle:
            raise MoRAConfigError(
                f"type_cycle={self.type_cycle} but the checkpoint was written with type_cycle="
                f"{tuple(state['type_cycle'])}; resume with the same cycle"
            )
        super().load_state_dict(state)
        self.type_index = int(state["type_index"])


class ReLoRACallback(RestartCallback):
    """ReLoRA (merge and restart LoRA), the baseline, in the same machinery as :class:`ReMoRACallback`.

    Every ``merge_every`` steps: ``W += (alpha/r) B A`` in fp32, ``A`` re-drawn kaiming-uniform(a=sqrt(5)) from a
    generator seeded by ``(seed, step)`` (the same on every rank and on a resumed run), ``B = 0``, both written
    to the module and the fp32 master, and the moments of ``A`` and ``B`` pruned (default: random, 99.9%).

    Args:
        merge_every: steps between restarts.
        optimizer_reset: ``{"method": "random" | "magnitude", "ratio": r}`` or ``"full"`` (default:
            random, 0.999).
        restart_warmup: warmup steps after each restart, which the engine's scheduler must have (0: none).
        seed: seed of the new ``A`` and of the pruning masks.

    Reports ``relora/merges``, ``relora/delta_norm``, ``relora/merge_residual``, ``relora/zeroed_fraction`` (of
    A's and B's moments), ``relora/merge_seconds``.

    Spec: §3.1.
    """

    prefix = "relora"

    def __init__(self, *, merge_every: int = 2000,
                 optimizer_reset: str | dict[str, Any] | None = None, restart_warmup: int = 50, seed: int = 0) -> None:
        if optimizer_reset is None:
            optimizer_reset = {"method": "random", "ratio": 0.999}
        super().__init__(merge_every=merge_every, optimizer_reset=optimizer_reset, restart_warmup=restart_warmup,
                         seed=seed)

    def _layers(self, module: nn.Module) -> list[nn.Module]:
        return [layer for _, layer in lora_layers(module)]

    @torch.no_grad()
    def _merge_layer(self, engine: Any, layer: LoRALinear) -> FoldNorms:
        state = backend_for(engine.optimizer)
        A, B = (state.get_full(engine.optimizer, p) for p in (layer.lora_A, layer.lora_B))  # fp32 masters
        with state.gathered([layer.base_layer.weight], modifier_rank=0):
            return layer.merge(reinit=False, A=A, B=B)

    def _cycle_record(self, engine: Any) -> dict[str, Any]:
        state = backend_for(engine.optimizer)
        factors = {name: (state.get_full(engine.optimizer, layer.lora_A).float().cpu(),
                          state.get_full(engine.optimizer, layer.lora_B).float().cpu())
                   for name, layer in lora_layers(engine.module)}
        return {"scaling": float(next(iter(self._layers(engine.module))).scaling), "factors": factors}

    def _reinit_values(self, layer: LoRALinear, generator: torch.Generator) -> dict[str, torch.Tensor]:
        A, B = layer.lora_A, layer.lora_B
        new_a = torch.empty(tuple(getattr(A, "ds_shape", A.shape)))
        nn.init.kaiming_uniform_(new_a, a=math.sqrt(5), generator=generator)
        return {"lora_A": new_a, "lora_B": torch.zeros(tuple(getattr(B, "ds_shape", B.shape)))}
