"""A standard PEFT LoRA adapter that reproduces a MoRA, LoRA, ReMoRA or ReLoRA model exactly (for servers that
load only LoRA).

For MoRA types 1-4, ``dW = D M C = B A`` with ``A = C: (r_hat, k)`` and ``B = D M: (d, r_hat)``
(:func:`mora_dist.operators.lora_factors`), scaling 1. Servers read one ``r`` and one ``lora_alpha``, so every
module is zero-padded to the largest rank ``R`` and ``lora_alpha = r = R``. A run of merge cycles (ReMoRA, ReLoRA)
is one LoRA relative to its starting weights: the cycles' ``A`` rows and ``B`` columns are concatenated (rank
``sum_c r_hat_c`` plus the live adapter). Where a module's rank would exceed ``min(d, k)``, its exact dense
factorisation is smaller and is written instead: ``A = dW, B = I_d`` (``d <= k``) or ``A = I_k, B = dW``; no SVD,
nothing truncated. Type 6 (block-rotary ``dW``, rank up to ``min(d, k)``) has no low-rank form and is refused before
anything is gathered or written.

Fused expert parameters (``mora_M: (E, r_hat, r_hat)``) become PEFT ``target_parameters`` entries: per expert
``A_e: (R, k)`` and ``B_e: (d, R)``, stored as PEFT's ``ParamWrapper`` reads them (``lora_A.weight: (E R, k)`` with
row ``e R + j``, ``lora_B.weight: (d, R E)`` with column ``j E + e``). PEFT nests one wrapper per parameter of a
block in the order the block registers them (the first innermost), so a parameter's keys carry one
``.base_layer`` per adapted parameter registered after it.

Spec: §2.5, §3.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mora_dist.adapters.files import (
    PREFIX,
    base_model_name,
    global_matrices,
    is_rank0,
    merge_stages,
    modules_to_save_state,
    mora_config,
    nbytes,
    parameter_value,
    saved_module_names,
    target_modules,
    write_adapter_dir,
)
from mora_dist.errors import MoRAConfigError
from mora_dist.experts import ADAPTERS, adapted_parameter
from mora_dist.lora import LoRALinear, lora_layers
from mora_dist.model import mora_layers
from mora_dist.operators import lora_factors
from mora_dist.parallel.chunks import pipeline_group, raise_if_any

logger = logging.getLogger(__name__)

# [(A: (r_i, k), B: (d, r_i))], dW = sum_i B_i A_i; for fused experts A: (E, r_i, k), B: (E, d, r_i).
Factors = list[tuple[torch.Tensor, torch.Tensor]]


def mora_factors(M: torch.Tensor, in_features: int, out_features: int, mora_type: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mora_dist.operators.lora_factors` of ``M: (r_hat, r_hat)``, or of every expert of
    ``M: (E, r_hat, r_hat)`` stacked (``A: (E, r_hat, k)``, ``B: (E, d, r_hat)``)."""
    if M.dim() == 2:
        return lora_factors(M, in_features, out_features, mora_type)
    parts = [lora_factors(M_e, in_features, out_features, mora_type) for M_e in M.unbind(0)]
    return torch.stack([A for A, _ in parts]), torch.stack([B for _, B in parts])


def _refuse_rope(types: Mapping[str, int], where: str) -> None:
    rope = sorted(name for name, t in types.items() if t == 6)
    if rope:
        raise MoRAConfigError(
            f"{where}: mora_type=6 (rope) in {rope[:3]}{'...' if len(rope) > 3 else ''} has a block-diagonal dW of "
            "rank up to min(d, k) and no exact LoRA form; export the merged model instead (launch/export.py "
            "without --adapter-only, or merge_mora then save_pretrained)"
        )



def cycle_factors(cycles: Sequence[Mapping[str, Any]], shapes: Mapping[str, tuple[int, int]]) -> dict[str, Factors]:
    """LoRA factors of merge cycles kept by the ReMoRA / ReLoRA callbacks (``state_dict()["cycles"]``).

    Args:
        cycles: each ``{"step", "mora_type", "matrices": {name: M}}`` (ReMoRA) or
            ``{"step", "scaling", "factors": {name: (A, B)}}`` (ReLoRA).
        shapes: ``{name: (in_features, out_features)}`` of the model's adapted layers.

    Raises:
        MoRAConfigError: a type-6 cycle, or a cycle whose modules are not the model's.
    """
    _refuse_rope({f"cycle at step {c['step']}": int(c["mora_type"]) for c in cycles if "matrices" in c},
                 "--since-start")
    out: dict[str, Factors] = {name: [] for name in shapes}
    for cycle in cycles:
        values = cycle["matrices"] if "matrices" in cycle else cycle["factors"]
        if set(values) != set(shapes):
            raise MoRAConfigError(
                f"the merge cycle at step {cycle['step']} adapted {sorted(set(values) ^ set(shapes))[:3]}, which the "
                "model does not (or the other way round); export from the run that kept these cycles"
            )
        for name, value in values.items():
            if "matrices" in cycle:
                out[name].append(mora_factors(value.float(), *shapes[name], cycle["mora_type"]))
            else:
                A, B = value
                out[name].append((A.float(), B.float() * float(cycle["scaling"])))
    return out



def live_factors(model: nn.Module, optimizer: Any = None) -> dict[str, Factors]:
    """LoRA factors of the model's live adapters: MoRA types 1-4, or LoRA (``A``, ``scaling * B``). Collective.

    Raises:
        MoRAConfigError: a type-6 MoRA layer (before any collective), or a model without adapters.
    """
    mora = dict(mora_layers(model))
    if mora:
        _refuse_rope({name: layer.mora_type for name, layer in mora.items()}, "peft-lora export")
        matrices = global_matrices(model, optimizer)
        return {name: [mora_factors(matrices[name], layer.in_features, layer.out_features, layer.mora_type)]
                for name, layer in mora.items()}
    lora = dict(lora_layers(model))
    if not lora:
        raise MoRAConfigError("peft-lora export: the model has no MoRA or LoRA layers (apply_mora / apply_lora)")
    return {name: [(parameter_value(layer.lora_A, optimizer),
                    parameter_value(layer.lora_B, optimizer) * layer.scaling)] for name, layer in lora.items()}



def combine(factors: Factors) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(A, B, dense)``: the terms concatenated (``A`` rows, ``B`` columns), or, when their rank exceeds
    ``min(d, k)``, the exact dense factorisation of ``dW = sum B_i A_i`` (computed in float64) of rank
    ``min(d, k)``. Expert terms (a leading ``E`` dimension) are combined expert by expert."""
    A = torch.cat([a for a, _ in factors], dim=-2)
    B = torch.cat([b for _, b in factors], dim=-1)
    d, k = B.shape[-2], A.shape[-1]
    if A.shape[-2] <= min(d, k):
        return A, B, False
    delta = (B.double() @ A.double()).float()  # (..., d, k)
    eye = torch.eye(min(d, k)).expand(*delta.shape[:-2], -1, -1).contiguous()
    return (delta, eye, True) if d <= k else (eye, delta, True)



def _pad(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)



def _expert_module_keys(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """``{expert adapter name: the PEFT module path of its ParamWrapper}`` for the expert adapters among
    ``names`` (``<block>.mora.<parameter>``, the block a module of ``model``): the block, plus one ``.base_layer``
    per adapted parameter the block registers after this one (PEFT wraps them in registration order)."""
    adapted: dict[str, list[str]] = {}
    for name in names:
        block, parameter = adapted_parameter(name)
        if block:
            adapted.setdefault(block, []).append(parameter)
    keys = {}
    for block, parameters in adapted.items():
        order = [p for p, _ in model.get_submodule(block).named_parameters(recurse=False) if p in parameters]
        for i, parameter in enumerate(order):
            keys[f"{block}.{ADAPTERS}.{parameter}"] = block + ".base_layer" * (len(order) - 1 - i)
    return keys



# PEFT (>= 0.21, on transformers 5) rewrites the config of these model families as if it were written for
# transformers 4, where their experts were nn.Linear modules with these names: a target_modules entry with such a
# leaf name is moved to the fused expert parameter. A Linear of that name (DeepSeek-V3's shared experts and dense
# MLPs) is therefore written as a target_parameters entry of its weight, which PEFT leaves alone.
_PEFT_V4_EXPERT_NAMES = {"mixtral": {"gate", "w1", "w2", "w3"},
                         "qwen2_moe": {"gate", "gate_proj", "up_proj", "down_proj"}}


def _peft_renamed(model: nn.Module, names: Sequence[str]) -> set[str]:
    """The module names among ``names`` that PEFT's transformers-4 config conversion would retarget."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # PEFT converts configs on transformers 5 only
        return set()
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as families
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = {**families, "mixtral": "mixtral", "qwen2_moe": "qwen2_moe"}.get(model_type)  # as PEFT extends it
    old_names = _PEFT_V4_EXPERT_NAMES.get(family, set())
    return {name for name in names if name.rpartition(".")[2] in old_names}


def _lora_tensors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A.weight, lora_B.weight)`` of one module: ``A, B`` themselves, or for experts
    ``A: (E, R, k) -> (E R, k)`` and ``B: (E, d, R) -> (d, R E)`` (PEFT's ParamWrapper layout)."""
    if A.dim() == 2:
        return A, B
    experts, rank, k = A.shape
    return A.reshape(experts * rank, k), B.permute(1, 2, 0).reshape(B.shape[1], rank * experts)



def peft_lora_terms(model: nn.Module, *, optimizer: Any = None,
                    cycles: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Factors]:
    """Per adapted module, the LoRA terms of the kept ``cycles`` (if any) then of the live adapter. Collective.

    Raises:
        MoRAConfigError: a type-6 layer or cycle, before any collective.
    """
    group = pipeline_group(model)
    problems = []
    try:  # every stage checks its own layers; all refuse together, before any collective
        past = cycle_factors(cycles, _shapes(model)) if cycles else {}
        _refuse_rope({name: layer.mora_type for name, layer in mora_layers(model)}, "peft-lora export")
    except MoRAConfigError as exc:
        problems.append(str(exc))
    raise_if_any(problems, group, MoRAConfigError, "")
    terms = live_factors(model, optimizer)
    return merge_stages({name: past.get(name, []) + live for name, live in terms.items()}, group)



def write_peft_lora(path: str | os.PathLike, terms: Mapping[str, Factors], *, model: nn.Module,
                    extra: Mapping[str, torch.Tensor], modules_to_save: Sequence[str], dropout: float,
                    mora_bytes: int | None = None) -> dict[str, Any]:
    """Write ``terms`` (keyed by ``model``'s module names) as one PEFT LoRA adapter, on this rank only: each
    module's terms concatenated (or its dense factorisation), zero-padded to the common rank, ``lora_alpha = r``;
    ``extra``: the ``modules_to_save`` tensors under their file keys. Returns the report of
    :func:`save_peft_lora`."""
    combined = {name: combine(factors) for name, factors in terms.items()}
    rank = max(A.shape[-2] for A, _, _ in combined.values())
    experts = _expert_module_keys(model, list(terms))
    state: dict[str, torch.Tensor] = {}
    for name, (A, B, _) in combined.items():
        lora_A, lora_B = _lora_tensors(_pad(A, rank, -2), _pad(B, rank, -1))
        state[f"{PREFIX}{experts.get(name, name)}.lora_A.weight"] = lora_A
        state[f"{PREFIX}{experts.get(name, name)}.lora_B.weight"] = lora_B
    state.update(extra)
    renamed = _peft_renamed(model, [name for name in terms if name not in experts])
    if (experts or renamed) and dropout:
        logger.info("peft-lora adapter %s: lora_dropout 0 (PEFT's target_parameters LoRA has no dropout; the "
                    "outputs at inference are the same)", path)
        dropout = 0.0
    linear = [name for name in terms if name not in experts and name not in renamed]
    parameters = ["{}.{}".format(*adapted_parameter(name)) for name in experts] + [f"{n}.weight" for n in renamed]
    values = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name(model),
        "inference_mode": True,
        "r": rank, "lora_alpha": rank, "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "target_modules": target_modules(model, linear) if linear else [],
        "target_parameters": sorted(parameters) or None,
        "modules_to_save": list(modules_to_save) or None,
    }
    write_adapter_dir(path, values, state)
    report = {"rank": rank, "bytes": nbytes(state), "mora_bytes": mora_bytes,
              "dense_modules": sorted(name for name, (_, _, dense) in combined.items() if dense)}
    logger.info("peft-lora adapter %s: rank %d, %.2f MB of tensors%s%s", path, rank, report["bytes"] / 1e6,
                "" if mora_bytes is None else f" (the MoRA file: {mora_bytes / 1e6:.2f} MB, "
                f"{report['bytes'] / mora_bytes:.1f}x)",
                f"; {len(report['dense_modules'])} module(s) written dense (rank > min(d, k))"
                if report["dense_modules"] else "")
    return report



def save_peft_lora(model: nn.Module, path: str | os.PathLike, *, optimizer: Any = None,
                   cycles: Sequence[Mapping[str, Any]] | None = None,
                   modules_to_save: Sequence[str] | None = None) -> dict[str, Any]:
    """Write a standard PEFT LoRA adapter that reproduces ``model`` (or, with ``cycles``, the whole run's update
    relative to its starting weights) exactly. Collective under TP / ZeRO: call on every rank; rank 0 writes.

    Args:
        model: a MoRA model (types 1-4) or a LoRA model (ReLoRA), adapters unmerged.
        path: the adapter folder (replaced atomically).
        optimizer: read the trainable tensors from this optimizer's fp32 masters (DeepSpeed or megatron-core).
        cycles: the merge cycles the ReMoRA / ReLoRA callback kept; the adapter then applies to the run's
            *starting* base weights.
        modules_to_save: fully trained modules to include (default: the MoRA config's ``modules_to_save``).

    Returns:
        ``{"rank", "bytes", "mora_bytes", "dense_modules"}`` on rank 0 (``{}`` elsewhere): the common rank, the
        tensor bytes written, the bytes of our own MoRA file for the same model (``None`` for a LoRA model) and
        the modules written as their dense factorisation.

    Raises:
        MoRAConfigError: a type-6 layer or cycle (nothing is written).

    Spec: §2.5.
    """
    terms = peft_lora_terms(model, optimizer=optimizer, cycles=cycles)
    config = mora_config(model)
    names = modules_to_save if modules_to_save is not None else getattr(config, "modules_to_save", None)
    extra = modules_to_save_state(model, names)
    if not is_rank0():
        return {}
    mora_bytes = None
    if config is not None:
        live = (factors[-1][0] for factors in terms.values())  # A: (r_hat, k) or (E, r_hat, k)
        mora_bytes = sum(4 * A.shape[-2] * A[..., 0].numel() for A in live)
        mora_bytes += nbytes(extra)
    return write_peft_lora(path, terms, model=model, extra=extra, modules_to_save=saved_module_names(extra),
                           dropout=_dropout(model), mora_bytes=mora_bytes)



def _shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    layers = dict(mora_layers(model)) or dict(lora_layers(model))
    return {name: _features(layer) for name, layer in layers.items()}



def _features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, LoRALinear):
        return layer.base_layer.in_features, layer.base_layer.out_features
    return layer.in_features, layer.out_features



def _dropout(model: nn.Module) -> float:
    config = mora_config(model)
    if config is not None:
        return float(config.dropout)
    rates = {float(getattr(layer.lora_dropout, "p", 0.0)) for _, layer in lora_layers(model)}
    return rates.pop() if len(rates) == 1 else 0.0
