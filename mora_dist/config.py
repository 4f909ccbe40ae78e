"""``MoRAConfig``: what to adapt and how. Field names follow PEFT's ``LoraConfig`` where the meaning is the same.

Spec: §2, §2.3.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from mora_dist.errors import MoRAConfigError

# Spec §2.3: the public code's numbers, and the names we accept for them.
MORA_TYPE_NAMES: dict[str, int] = {
    "sharing": 1,
    "sharing_block": 2,
    "mixed_block": 3,
    "mixed_stride": 4,
    "rope": 6,
    "rotation": 6,
}
MORA_TYPES = (1, 2, 3, 4, 6)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_mora_type(value: int | str, field_name: str = "mora_type") -> int:
    """Map a type name or number (``"rope"``, ``6``, ``"6"``) to the public code's number. Spec: §2.3."""
    if isinstance(value, bool):
        raise MoRAConfigError(f"{field_name}={value!r} is not a MoRA type; use one of {_type_choices()}")
    if isinstance(value, str):
        key = value.strip().lower()
        if key in MORA_TYPE_NAMES:
            return MORA_TYPE_NAMES[key]
        if key.isdigit():
            value = int(key)
        else:
            raise MoRAConfigError(f"{field_name}={value!r} is not a MoRA type; use one of {_type_choices()}")
    if value not in MORA_TYPES:
        raise MoRAConfigError(f"{field_name}={value!r} is not a MoRA type; use one of {_type_choices()}")
    return int(value)


def _type_choices() -> str:
    names = ", ".join(f"{n}={k!r}" for k, n in MORA_TYPE_NAMES.items())
    return f"1, 2, 3, 4, 6 or a name ({names})"


def resolve_dtype(value: str | torch.dtype, field_name: str = "mora_dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.")
    if key not in _DTYPES:
        raise MoRAConfigError(f"{field_name}={value!r} is not a supported dtype; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


@dataclass
class MoRAConfig:
    """Configuration of MoRA adapters.

    Args:
        r: LoRA-equivalent rank; each layer gets ``r_hat = round(sqrt((in + out) * r))`` (even for RoPE).
        r_hat: side of the square matrix, instead of ``r`` (the same for every targeted layer).
        mora_type: 1, 2, 3, 4, 6 or a name (``"sharing"``, ``"sharing_block"``, ``"mixed_block"``,
            ``"mixed_stride"``, ``"rope"``). 6 (RoPE) suits small ranks (r=8), 1 (sharing) large ranks (r=256).
        target_modules: module names (suffix match, ``*`` wildcards), a regex string (full match), or
            ``"all-linear"`` (every linear layer except the output head).
            Fused expert parameters (``experts.gate_up_proj``) are matched by their own name or their block's
            (``"experts"``); ``"all-linear"`` includes them and leaves routers (``gate``, ``router``) out.
        exclude_modules: the same forms; matched modules (and expert parameters) are left alone.
        target_parameters: PEFT's field for parameters that are not modules: names of fused 3-D expert weights
            (suffix match, ``*`` wildcards), e.g. ``["experts.gate_up_proj", "experts.down_proj"]``; adapted in
            addition to ``target_modules`` (which may then be ``None``).
        dropout: dropout applied to the input before compression.
        mora_dtype: dtype of the square matrix and of the adapter's arithmetic (fp32 by default).
        modules_to_save: modules trained fully (embeddings, norms, lm_head for pretraining).
        tensor_parallel_sharding: ``"auto"`` shards the matrix like the base layer where the type allows it and
            replicates it otherwise; ``"replicate"`` always replicates; ``"shard"`` raises where it cannot shard
            (Megatron layers only). Spec: §4.
        tensor_parallel_grad_sync: when a replicated matrix's gradient is SUM-reduced over the tensor-parallel
            group: ``"backward"`` in every backward pass (works with any loop: DeepSpeed, Megatron DDP, plain
            torch; once per micro-batch under gradient accumulation) or ``"step"`` once per optimizer step, by
            :func:`mora_dist.parallel.finalize_model_grads` (Megatron loops). Spec: §4.
        merge_compensation: make merges into a bf16/fp16 base lose nothing: each layer keeps what the base
            dtype rounds away at a merge (``mora_base_residual``, the shape of the base weight shard, bf16 for a
            bf16 base, fp32 for fp16) and folds it into the next merge, so ``W + residual`` is the fp32 sum of all
            updates and ``W`` the nearest bf16 to it. Memory: 2 bytes per adapted base weight entry (bf16), not
            partitioned by ZeRO-3. Never allocated for an fp32 base. ``False``: merges round (updates below half
            a bf16 step of ``W``, about 0.2 % of ``|W|``, vanish). Spec: §2.4.

    Spec: §2, §2.3.
    """

    r: int | None = 8
    r_hat: int | None = None
    mora_type: int | str = 6
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    dropout: float = 0.0
    mora_dtype: str = "float32"
    modules_to_save: list[str] | None = None
    tensor_parallel_sharding: str = "auto"
    tensor_parallel_grad_sync: str = "backward"
    merge_compensation: bool = True
    # Kept so adapter_config.json reads like PEFT's; MoRA has no scaling (spec §2), so it is never used.
    lora_alpha: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.mora_type = resolve_mora_type(self.mora_type)
        if self.r_hat is not None:
            if isinstance(self.r_hat, bool) or not isinstance(self.r_hat, int) or self.r_hat < 1:
                raise MoRAConfigError(f"r_hat={self.r_hat!r} must be a positive integer (or None to derive it from r)")
            if self.mora_type == 6 and self.r_hat % 2:
                raise MoRAConfigError(
                    f"r_hat={self.r_hat} is odd, but mora_type=6 (rope) rotates pairs (i, i + r_hat/2); "
                    f"use an even r_hat such as {self.r_hat + 1}"
                )
        elif self.r is None or isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise MoRAConfigError(f"r={self.r!r} must be a positive integer (or give r_hat explicitly)")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise MoRAConfigError(f"dropout={self.dropout!r} must lie in [0, 1)")
        resolve_dtype(self.mora_dtype)
        if isinstance(self.mora_dtype, torch.dtype):
            self.mora_dtype = str(self.mora_dtype).removeprefix("torch.")
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(
                    isinstance(t, str) and t for t in self.target_parameters):
                raise MoRAConfigError(f"target_parameters={self.target_parameters!r} must be a list of parameter "
                                      "names, e.g. ['experts.gate_up_proj', 'experts.down_proj']")
            self.target_parameters = list(self.target_parameters)
        if self.target_modules is None and not self.target_parameters:
            raise MoRAConfigError(
                "target_modules=None: name the layers to adapt, e.g. ['q_proj', 'v_proj'], a regex, or 'all-linear' "
                "(or give target_parameters for fused expert weights)"
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "all-linear":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise MoRAConfigError(f"{name}={value!r} is not a valid regex: {exc}") from exc
            elif isinstance(value, (list, tuple, set)):
                setattr(self, name, list(value))
        if self.tensor_parallel_grad_sync not in ("backward", "step"):
            raise MoRAConfigError(
                f"tensor_parallel_grad_sync={self.tensor_parallel_grad_sync!r}: use 'backward' (all-reduce a "
                "replicated M's gradient in every backward) or 'step' (once per optimizer step, in "
                "mora_dist.parallel.finalize_model_grads)"
            )
        if not isinstance(self.merge_compensation, bool):
            raise MoRAConfigError(f"merge_compensation={self.merge_compensation!r} must be true or false")
        if self.tensor_parallel_sharding not in ("auto", "replicate", "shard"):
            raise MoRAConfigError(
                f"tensor_parallel_sharding={self.tensor_parallel_sharding!r}: use 'auto', 'replicate' or 'shard'"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.mora_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoRAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise MoRAConfigError(f"unknown MoRAConfig field(s) {unknown}; known fields are {sorted(names)}")
        return cls(**values)
