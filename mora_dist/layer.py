"""``MoRALinear``: a frozen ``nn.Linear`` plus MoRA's square matrix. Math in :mod:`mora_dist.operators`.

Spec: §2.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mora_dist.config import MoRAConfig, resolve_dtype, resolve_mora_type
from mora_dist.merge import RESIDUAL, FoldNorms, fold_layer, match_residual_to_state, new_residual
from mora_dist.operators import MoRAOperator, check_r_hat, compute_r_hat

logger = logging.getLogger(__name__)


class MoRALayerMixin:
    """What every MoRA wrapper (HF linear, Megatron column/row) shares: the matrix, the operator, merging.

    Subclasses set ``self.base_layer``, ``self.operator`` and ``self.mora_M`` (the local part of ``M``), call
    :meth:`_init_merge_compensation`, and implement ``_base_weight_shard()``, the frozen weight this rank adds
    its ``dW`` shard to.
    """

    base_layer: nn.Module
    operator: MoRAOperator
    mora_M: nn.Parameter
    mora_dropout: nn.Module

    @property
    def r_hat(self) -> int:
        return self.operator.r_hat

    @property
    def mora_type(self) -> int:
        return self.operator.mora_type

    @property
    def global_m_shape(self) -> tuple[int, ...]:
        """Shape of the global matrix, as adapter files hold it (``(E, r_hat, r_hat)`` for experts)."""
        return self.r_hat, self.r_hat

    def adapter_delta(self, x: torch.Tensor, y: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """``y + D(M C(dropout(x)))`` for local ``x: (..., k_local)``, ``y: (..., d_local)``; written into ``y``
        when ``inplace`` (pass it only for a fresh base output that nothing else reads)."""
        return self.operator.forward(self.mora_dropout(x), self.mora_M, y, inplace=inplace)

    def delta_weight(self, M: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's ``dW: (d_local, k_local)`` in fp32 (or the matrix's dtype if wider) from ``M`` (default:
        the module's ``mora_M``; its shape). Spec: §2.4."""
        return self.operator.delta_weight(self.mora_M if M is None else M)

    @torch.no_grad()
    def merge(self, reinit: bool = True, *, M: torch.Tensor | None = None) -> FoldNorms:
        """``W += dW(M)`` through :func:`mora_dist.merge.fold_layer` (compensated in a bf16/fp16 base); zero
        ``M`` if ``reinit``. ``M``: this rank's matrix to merge (default ``mora_M``; ReMoRA passes the fp32
        optimizer master). Local only: no communication. Returns the fold's squared norms. Spec: §2.4."""
        norms = fold_layer(self, self.delta_weight(M))
        if reinit:
            self.mora_M.zero_()
        return norms

    def _init_merge_compensation(self, enabled: bool) -> None:
        """Register ``mora_base_residual`` (see :func:`mora_dist.merge.fold_delta`): allocated now for a bf16 or
        fp16 base, at the first merge for one cast later (DeepSpeed casts parameters, not buffers)."""
        self.merge_compensation = bool(enabled)
        weight = self._base_weight_shard()
        self.register_buffer(RESIDUAL, new_residual(weight) if enabled else None)
        self.register_load_state_dict_pre_hook(match_residual_to_state)

    def get_global_M(self, local: torch.Tensor | None = None) -> torch.Tensor:
        """The global ``(r_hat, r_hat)`` matrix (tensor-parallel layers gather their shards). ``local``: this
        rank's value to gather instead of the module's ``M`` (e.g. its fp32 optimizer master)."""
        return (self.mora_M if local is None else local).detach().clone()

    @torch.no_grad()
    def set_global_M(self, M: torch.Tensor) -> None:
        """Load the global ``(r_hat, r_hat)`` matrix (tensor-parallel layers keep their shard of it)."""
        self.mora_M.copy_(M.to(self.mora_M.dtype))

    def set_mora_type(self, mora_type: int | str) -> None:
        """Switch the operators (ReMoRA). ``M`` keeps its shape; call after a merge, when ``M`` is zero.

        Raises ``MoRAConfigError`` if ``r_hat`` cannot serve the new type (an odd ``r_hat`` for rope). Spec: §3.
        """
        new_type = resolve_mora_type(mora_type)
        if new_type == self.mora_type:
            return
        self.operator = self._make_operator(new_type)

    def release_base(self) -> nn.Module:
        """The base layer as it was before wrapping (for :func:`mora_dist.unload`)."""
        return self.base_layer

    def _make_operator(self, mora_type: int) -> MoRAOperator:
        raise NotImplementedError

    def _base_weight_shard(self) -> torch.Tensor:
        raise NotImplementedError


def _autocast_on(device_type: str) -> bool:
    # the meta device (a memory plan's trace) has no autocast
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


class MoRALinear(MoRALayerMixin, nn.Module):
    """``y = x W^T + b + D(M C(dropout(x)))`` around a frozen ``nn.Linear``; equivalently ``y = x (W + dW)^T + b``.

    Only ``mora_M: (r_hat, r_hat)`` is trainable, zero at start; it is kept in ``mora_dtype`` (fp32 by default)
    even when the base runs in bf16. ``x: (..., k)``, ``y: (..., d)``.

    Args:
        base_layer: the ``nn.Linear`` to adapt (with or without bias); frozen by this wrapper.
        r: LoRA-equivalent rank (ignored when ``r_hat`` is given).
        mora_type: 1, 2, 3, 4, 6 or a name.
        r_hat: side of the square matrix, instead of ``r``.
        dropout: dropout on ``x`` before compression.
        mora_dtype: dtype of ``M`` and of the adapter arithmetic.
        merge_compensation: keep what a bf16/fp16 base rounds away at a merge in ``mora_base_residual``
            (``(d, k)``, bf16 for a bf16 base) and fold it into the next merge. Spec: §2.4.

    Spec: §2.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        mora_type: int | str = 6,
        r_hat: int | None = None,
        dropout: float = 0.0,
        *,
        mora_dtype: torch.dtype | str = torch.float32,
        merge_compensation: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        mora_type = resolve_mora_type(mora_type)
        k, d = base_layer.in_features, base_layer.out_features
        if r_hat is None:
            r_hat = compute_r_hat(k, d, r, mora_type)
        check_r_hat(k, d, r_hat, mora_type)
        self.base_layer = base_layer
        self.in_features, self.out_features = k, d
        base_layer.requires_grad_(False)
        self.operator = self._make_operator(mora_type, r_hat)
        device = base_layer.weight.device
        self.mora_M = nn.Parameter(torch.zeros(r_hat, r_hat, dtype=resolve_dtype(mora_dtype), device=device))
        self.mora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_merge_compensation(merge_compensation)
        self.train(base_layer.training)  # a wrapper made for an eval-mode model must not start dropping out

    # ---- the dispatch interface (:mod:`mora_dist.dispatch`) ----
    @staticmethod
    def global_features(base_layer: nn.Linear) -> tuple[int, int]:
        """``(k, d)`` of the base weight."""
        return base_layer.in_features, base_layer.out_features

    @classmethod
    def check(cls, base_layer: nn.Linear, name: str, config: MoRAConfig, r_hat: int) -> None:
        """Nothing beyond ``r_hat`` (checked by the planner) can fail for a plain linear layer."""

    @classmethod
    def from_base(cls, base_layer: nn.Linear, name: str, config: MoRAConfig, r_hat: int) -> MoRALinear:
        return cls(base_layer, mora_type=config.mora_type, r_hat=r_hat, dropout=config.dropout,
                   mora_dtype=config.torch_dtype, merge_compensation=config.merge_compensation)

    def _make_operator(self, mora_type: int, r_hat: int | None = None) -> MoRAOperator:
        r_hat = self.operator.r_hat if r_hat is None else r_hat
        return MoRAOperator(self.in_features, self.out_features, r_hat, mora_type)

    def _base_weight_shard(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (so code that reads ``.weight`` of a linear layer keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self._fusable():
            # One autograd node for base and adapter: the adapter adds into the base's output and dX in place.
            out = self.operator.forward_fused(x, self.mora_M, weight=base.weight, bias=base.bias)
            if out is not None:
                return out
        # The base output is fresh and read by no one else: adding into it saves a d-wide allocation and pass.
        return self.adapter_delta(x, base(x), inplace=True)

    def _fusable(self) -> bool:
        """Whether the frozen base may run inside the adapter's autograd function: a plain ``nn.Linear`` with
        frozen parameters, no hooks (ZeRO-3 gathers weights in hooks), no active dropout on the adapter, and no
        autocast."""
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not any(p.requires_grad for p in base.parameters())
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
            and (isinstance(self.mora_dropout, nn.Identity) or not self.training)
            and not _autocast_on(base.weight.device.type)  # autocast would cast inside, not in backward
        )

    def extra_repr(self) -> str:
        return f"r_hat={self.r_hat}, mora_type={self.mora_type}, M_dtype={self.mora_M.dtype}"
