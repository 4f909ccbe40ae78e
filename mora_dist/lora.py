"""LoRA of a given rank, the baseline MoRA is compared with (and ReLoRA's adapter). Spec: §3.1.

``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with ``A: (r, k)`` kaiming-uniform(a=sqrt(5)), ``B: (d, r)``
zero. Shares targeting and merging conventions with MoRA: ``merge()`` folds ``(alpha/r) B A`` into ``W`` in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mora_dist.experts import fused_expert_params, refuse_unadaptable_experts
from mora_dist.merge import RESIDUAL, FoldNorms, fold_layer, match_residual_to_state, new_residual
from mora_dist.targeting import plan_modules_to_save, plan_targets


class LoRALinear(nn.Module):
    """``y = x (W + (alpha/r) B A)^T + b`` around a frozen ``nn.Linear``. ``x: (..., k)``. Spec: §3.1."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, lora_alpha: float | None = None, dropout: float = 0.0,
                 *, lora_dtype: torch.dtype = torch.float32, merge_compensation: bool = True) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"r={r} must be a positive integer")
        self.base_layer = base_layer.requires_grad_(False)
        self.r = r
        self.scaling = (lora_alpha if lora_alpha is not None else r) / r
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, dtype=lora_dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, dtype=lora_dtype, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merge_compensation = merge_compensation  # as MoRALinear's (spec §2.4): bf16 merges lose nothing
        self.register_buffer(RESIDUAL, new_residual(base_layer.weight) if merge_compensation else None)
        self.register_load_state_dict_pre_hook(match_residual_to_state)
        self.train(base_layer.training)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Kaiming-uniform ``A``, zero ``B`` (ReLoRA's re-initialisation at every restart)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _base_weight_shard(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta_weight(self, A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> torch.Tensor:
        """``(alpha/r) B A: (d, k)`` in at least fp32 (default ``A``, ``B``: the module's)."""
        A = self.lora_A if A is None else A
        B = self.lora_B if B is None else B
        dtype = torch.promote_types(A.dtype, torch.float32)
        return self.scaling * (B.to(dtype) @ A.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()
        return y + (self.scaling * h).to(y.dtype)

    @torch.no_grad()
    def merge(self, reinit: bool = True, *, A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> FoldNorms:
        """``W += (alpha/r) B A`` through :func:`mora_dist.merge.fold_layer` (compensated in a bf16/fp16 base);
        new ``A``, ``B = 0`` if ``reinit``. ``A``, ``B``: the factors to merge (default the module's; ReLoRA passes
        the fp32 optimizer masters)."""
        norms = fold_layer(self, self.delta_weight(A, B))
        if reinit:
            self.reset_lora_parameters()
        return norms


def lora_rank_for_budget(in_features: int, out_features: int, r_hat: int) -> int:
    """LoRA rank with about the parameter count of an ``r_hat x r_hat`` matrix: ``round(r_hat^2 / (k + d))``."""
    return max(1, round(r_hat * r_hat / (in_features + out_features)))


def apply_lora(model: nn.Module, target_modules: list[str] | str, r: int = 8, lora_alpha: float | None = None,
               dropout: float = 0.0, exclude_modules: list[str] | str | None = None,
               modules_to_save: list[str] | None = None, *, merge_compensation: bool = True) -> nn.Module:
    """Wrap targeted ``nn.Linear`` layers with ``LoRALinear`` in place; freeze all but adapters and
    ``modules_to_save``. ``merge_compensation``: see :class:`mora_dist.MoRAConfig`. Experts held as fused 3-D
    parameters that the targets reach are refused (this LoRA adapts ``nn.Linear`` only)."""
    refuse_unadaptable_experts(model.named_modules(), target_modules, exclude_modules, fused_expert_params,
                               "the LoRA baseline adapts nn.Linear layers only")
    targets = plan_targets(model, target_modules, exclude_modules, lambda m: type(m) is nn.Linear)
    to_save = plan_modules_to_save(model, modules_to_save)
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r=r, lora_alpha=lora_alpha, dropout=dropout,
                                          merge_compensation=merge_compensation))
    for name in to_save:
        model.get_submodule(name).requires_grad_(True)
    return model


def lora_layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module
