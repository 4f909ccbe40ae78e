"""MoRA on mixture-of-experts blocks whose experts are fused 3-D parameters (transformers 5: Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss, ...).

Such a block keeps expert ``e``'s projection as slice ``e`` of one parameter: ``gate_up_proj: (E, 2I, H)`` and
``down_proj: (E, H, I)``, or the transposed ``(E, H, 2I)`` / ``(E, I, H)`` of gpt-oss (``is_transposed``), with
optional ``*_bias: (E, d)``. Each adapted parameter gets one :class:`MoRAExpertProjection` holding
``mora_M: (E, r_hat, r_hat)``, one square matrix per expert, with the ``r_hat`` and operators a linear layer of
that expert's shape gets (spec §2). The adapters live at ``<experts>.mora.<parameter>``.

The adapter acts on the activations of each routed group of tokens (compress, ``M_e``, decompress), never by
building ``E`` dense ``dW`` tensors per step; ``dW`` is built only to merge. The block's forward is ours (the
routing it receives, the gating and biases follow transformers' experts interface flags ``has_gate``,
``has_bias``, ``is_transposed``, ``has_post_expert_norm`` and the block's ``_apply_gate``), so the model's own
experts implementation setting (eager, grouped or batched matmuls) does not apply while adapters are in.

Spec: §2, §2.4.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mora_dist.config import MoRAConfig, resolve_dtype, resolve_mora_type
from mora_dist.errors import MoRAConfigError
from mora_dist.layer import MoRALayerMixin
from mora_dist.merge import SHARD, FoldNorms, fold_layer, sync_weight
from mora_dist.operators import MoRAOperator, check_r_hat
from mora_dist.targeting import name_matches

# transformers' experts interface (``use_experts_implementation``) sets these on every fused-experts module.
INTERFACE_FLAGS = ("has_gate", "has_bias", "is_transposed")
# Dtypes a merge folds into exactly (fp32 arithmetic, compensated in bf16/fp16); quantized experts are refused.
FOLDABLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ADAPTERS = "mora"  # the ModuleDict of a block's adapters: <experts>.mora.<parameter>


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter: its full shape


def fused_projections(module: nn.Module) -> list[str]:
    """Names of the fused expert weights of ``module`` in forward order (``gate_up_proj`` or ``up_proj``, then
    ``down_proj``), or ``[]`` if it is not a fused-experts module of transformers' interface."""
    if not all(hasattr(module, flag) for flag in INTERFACE_FLAGS):
        return []
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    if all(isinstance(getattr(module, n, None), nn.Parameter) and len(_shape(getattr(module, n))) == 3
           for n in names):
        return names
    return []


def unknown_expert_params(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of 3-D parameters an expert-like module holds directly when it is not a fused-experts
    module we adapt (a custom MoE block): such a block must be refused, never skipped."""
    expert_like = "expert" in type(module).__name__.lower() or any(
        hasattr(module, a) for a in ("num_experts", "num_local_experts"))
    if not expert_like or fused_projections(module) or isinstance(module, MoRAExpertsMixin):
        return []
    return [(n, _shape(p)) for n, p in module.named_parameters(recurse=False) if len(_shape(p)) == 3]


def fused_expert_params(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every 3-D expert weight of ``module``, known layout or not (``[]`` for other modules)."""
    return unknown_expert_params(module) or [(n, _shape(getattr(module, n))) for n in fused_projections(module)]


def refuse_unadaptable_experts(named: Iterable[tuple[str, nn.Module]], target_modules: list[str] | str | None,
                               exclude_modules: list[str] | str | None,
                               expert_params: Callable[[nn.Module], list[tuple[str, tuple[int, ...]]]],
                               why: str) -> None:
    """Raise before any change when ``target_modules`` reach an experts block whose 3-D weights
    (``expert_params(module)``) the caller cannot adapt (``why`` says why): skipping it silently would train
    everything but the experts.

    Raises:
        MoRAConfigError: names the module path, its class, the parameters and the ``exclude_modules`` fix.
    """
    spec, exclude = target_modules, exclude_modules or []
    exclude = [exclude] if isinstance(exclude, str) else exclude
    for name, module in named:
        params = expert_params(module)
        if not params or any(name_matches(name, e) for e in exclude):
            continue
        if spec is None:
            reached = False
        elif spec == "all-linear":
            reached = True
        elif isinstance(spec, list):
            reached = any(name_matches(name, t) or any(name_matches(f"{name}.{p}", t) for p, _ in params)
                          for t in spec)
        else:
            reached = any(re.fullmatch(spec, f"{name}.{p}") for p, _ in params) or bool(re.fullmatch(spec, name))
        if reached:
            listed = ", ".join(f"{p} {shape}" for p, shape in params)
            raise MoRAConfigError(
                f"{name} ({type(module).__qualname__}) holds its experts as 3-D parameters ({listed}) but {why}: "
                f"target_modules={spec!r} would train the other layers and leave these experts untouched. Add "
                f"exclude_modules=['*{name.rpartition('.')[2]}'] to adapt the rest without them"
            )


def projection_features(module: nn.Module, param_name: str) -> tuple[int, int]:
    """``(k, d)`` of one expert's projection: ``(E, d, k)``, or ``(E, k, d)`` when ``is_transposed``."""
    _, a, b = _shape(getattr(module, param_name))
    return (a, b) if module.is_transposed else (b, a)


def check_projection(module: nn.Module, name: str, param_name: str, config: MoRAConfig, r_hat: int) -> None:
    """Raise before any change if the parameter cannot be adapted: its dtype (quantized experts cannot be folded
    into exactly), expert parallelism (each rank holds a subset of the experts), or ``r_hat`` for its shape
    (``r_hat^2 > d k``: every expert's matrix would outgrow its weight, E times over)."""
    where = f"{name}.{param_name}"
    param = getattr(module, param_name)
    if param.dtype not in FOLDABLE_DTYPES:
        raise MoRAConfigError(
            f"{where} has dtype {param.dtype}, which a MoRA merge cannot fold into exactly; load the model in "
            "bfloat16, float16 or float32 (dequantize the experts), or exclude it with exclude_modules"
        )
    if getattr(module, "_is_expert_parallel", False):
        raise MoRAConfigError(f"{where}: expert parallelism (each rank holds some experts) is not supported yet; "
                              "load the model without an expert-parallel plan")
    k, d = projection_features(module, param_name)
    check_r_hat(k, d, r_hat, config.mora_type, where=where)
    if r_hat * r_hat > k * d:
        largest = int((k * d) ** 0.5)
        raise MoRAConfigError(
            f"{where}: r_hat={r_hat} gives each of its {_shape(param)[0]} experts a {r_hat}x{r_hat} matrix, more "
            f"entries than the expert's own ({d}, {k}) weight; lower r (or r_hat to at most {largest}), or train "
            "these experts fully with modules_to_save"
        )


class MoRAExpertProjection(MoRALayerMixin, nn.Module):
    """MoRA on one fused expert parameter: ``mora_M: (E, r_hat, r_hat)``, one square matrix per expert, zero at
    start, sharing the fixed operators of a ``(d, k)`` linear layer; expert ``e``'s projection becomes
    ``x (W_e + dW(M_e))^T + b_e``.

    It is a child of the experts block it adapts (``<experts>.mora.<parameter>``), which owns the base parameter
    and calls :meth:`forward` once per step with the tokens grouped by expert.

    Spec: §2.
    """

    def __init__(self, experts: nn.Module, param_name: str, r_hat: int, mora_type: int | str, *,
                 dropout: float = 0.0, mora_dtype: torch.dtype | str = torch.float32,
                 merge_compensation: bool = True) -> None:
        super().__init__()
        self.__dict__["_experts"] = experts  # a reference, not a submodule: the block owns this projection
        self.param_name = param_name
        self.transposed = bool(experts.is_transposed)
        self.in_features, self.out_features = projection_features(experts, param_name)
        self.num_experts = _shape(getattr(experts, param_name))[0]
        self.operator = self._make_operator(resolve_mora_type(mora_type), r_hat)
        device = getattr(experts, param_name).device
        self.mora_M = nn.Parameter(torch.zeros(self.num_experts, r_hat, r_hat, dtype=resolve_dtype(mora_dtype),
                                               device=device))
        self.mora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_merge_compensation(merge_compensation)

    @property
    def global_m_shape(self) -> tuple[int, ...]:
        return self.num_experts, self.r_hat, self.r_hat

    def _make_operator(self, mora_type: int, r_hat: int | None = None) -> MoRAOperator:
        r_hat = self.operator.r_hat if r_hat is None else r_hat
        return MoRAOperator(self.in_features, self.out_features, r_hat, mora_type)

    def _base_weight_shard(self) -> torch.Tensor:
        return getattr(self._experts, self.param_name)

    def forward(self, x: torch.Tensor, counts: list[int], y: torch.Tensor) -> torch.Tensor:
        """``y + D(M_e C(x))`` row-group by row-group: ``x: (S, k)`` and the base output ``y: (S, d)`` hold the
        routed tokens sorted by expert, ``counts[e]`` rows for expert ``e``. One compression and one
        decompression for all groups; only the ``(r_hat, r_hat)`` products run per expert."""
        M = self.mora_M
        u = self.operator.compress(self.mora_dropout(x).to(M.dtype))  # (S, r_hat), or (S, n, r_hat) for rope
        z = torch.cat([self.operator.apply_matrix(u_e, M_e) for u_e, M_e in zip(u.split(counts), M.unbind(0))])
        return self.operator.decompress_add(y, z.to(y.dtype))

    def expert_delta_weight(self, M_e: torch.Tensor) -> torch.Tensor:
        """``dW`` of one expert in the base parameter's layout: ``(d, k)``, or ``(k, d)`` when transposed."""
        delta = self.operator.delta_weight(M_e)
        return delta.t() if self.transposed else delta

    def delta_weight(self, M: torch.Tensor | None = None) -> torch.Tensor:
        """``dW`` of every expert, ``(E, d, k)`` (``(E, k, d)`` when transposed), in fp32. Spec: §2.4."""
        M = self.mora_M if M is None else M
        return torch.stack([self.expert_delta_weight(M_e) for M_e in M.unbind(0)])

    @torch.no_grad()
    def merge(self, reinit: bool = True, *, M: torch.Tensor | None = None) -> FoldNorms:
        """``W_e += dW(M_e)`` for every expert, one expert at a time (one ``(d, k)`` fp32 update in memory, not
        ``E``), through :func:`mora_dist.merge.fold_layer`. Spec: §2.4."""
        M = self.mora_M if M is None else M
        delta_sq = residual_sq = 0.0
        for e, M_e in enumerate(M.unbind(0)):
            norms = fold_layer(self, self.expert_delta_weight(M_e), part=e, sync=False)
            delta_sq, residual_sq = delta_sq + norms.delta_sq, residual_sq + norms.residual_sq
        if getattr(self, SHARD, None) is not None:
            sync_weight(self)
        if reinit:
            self.mora_M.zero_()
        return FoldNorms(delta_sq, residual_sq)

    def release_base(self) -> nn.Module:
        raise TypeError("an expert projection is released with its experts block (mora_dist.experts.release)")

    def extra_repr(self) -> str:
        return (f"{self.param_name}: experts={self.num_experts}, r_hat={self.r_hat}, mora_type={self.mora_type}, "
                f"M_dtype={self.mora_M.dtype}")


class MoRAExpertsMixin:
    """The forward of an adapted fused-experts block. :func:`adapt` gives the block a subclass of its own class
    with this mixin first (the way ``torch.nn.utils.parametrize`` does), so the block keeps its parameters and
    state-dict keys, and ZeRO-3 gathers them for this forward as for the original one.

    ``hidden_states: (T, H)``, ``top_k_index: (T, top_k)`` (ids ``>= E`` are dropped slots),
    ``top_k_weights: (T, top_k)``; returns ``(T, H)``.
    """

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        first, down = fused_projections(self)
        flat = top_k_index.reshape(-1)
        with torch.no_grad():
            kept = (flat < self.num_experts).nonzero().squeeze(1)
            order = kept[torch.argsort(flat[kept], stable=True)]  # (token, slot) pairs grouped by expert
            tokens = order // top_k_index.shape[-1]
            counts = torch.bincount(flat[order], minlength=self.num_experts).tolist()
        h = self._project(hidden_states[tokens], counts, first)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        out = self._project(h, counts, down)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        out = out * top_k_weights.reshape(-1)[order, None]
        return torch.zeros_like(hidden_states).index_add_(0, tokens, out.to(hidden_states.dtype))

    def _project(self, x: torch.Tensor, counts: list[int], name: str) -> torch.Tensor:
        """Expert ``e``'s base projection on its ``counts[e]`` rows of ``x`` (sorted by expert), then the adapter."""
        weight = getattr(self, name)
        bias = getattr(self, f"{name}_bias") if self.has_bias else None
        parts = []
        for e, x_e in enumerate(x.split(counts)):
            if counts[e]:
                y_e = x_e @ weight[e] if self.is_transposed else F.linear(x_e, weight[e])
                parts.append(y_e if bias is None else y_e + bias[e])
        width = weight.shape[2] if self.is_transposed else weight.shape[1]
        y = torch.cat(parts) if parts else x.new_zeros(0, width)
        adapters = getattr(self, ADAPTERS)
        return adapters[name](x, counts, y) if name in adapters else y


_ADAPTED_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    if cls not in _ADAPTED_CLASSES:
        _ADAPTED_CLASSES[cls] = type(f"MoRA{cls.__name__}", (MoRAExpertsMixin, cls), {"__module__": __name__})
    return _ADAPTED_CLASSES[cls]


def adapt(module: nn.Module, r_hats: dict[str, int], config: MoRAConfig) -> None:
    """Give the fused-experts ``module`` one :class:`MoRAExpertProjection` per parameter in ``r_hats``
    (``{parameter name: r_hat}``), in place; its base parameters are frozen by the caller."""
    module.add_module(ADAPTERS, nn.ModuleDict({
        name: MoRAExpertProjection(module, name, r_hat, config.mora_type, dropout=config.dropout,
                                   mora_dtype=config.torch_dtype, merge_compensation=config.merge_compensation)
        for name, r_hat in r_hats.items()
    }))
    module.__class__ = _adapted_class(type(module))


def adapted_parameter(layer_name: str) -> tuple[str, str]:
    """``(block, parameter)`` of the expert adapter named ``layer_name`` (``<block>.mora.<parameter>``)."""
    block, _, parameter = layer_name.rpartition(f".{ADAPTERS}.")
    return block, parameter


def release(module: nn.Module) -> nn.Module:
    """Undo :func:`adapt` (after merging, for :func:`mora_dist.unload`): the block's own class, no adapters."""
    delattr(module, ADAPTERS)
    module.__class__ = module.__class__.__mro__[2]  # (adapted class, MoRAExpertsMixin, original class, ...)
    return module
