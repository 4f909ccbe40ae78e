"""Turn ``target_modules`` / ``exclude_modules`` / ``modules_to_save`` into module names, before any change.

Forms (PEFT's, plus wildcards): a list of names matched as the whole name or a dotted suffix
(``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), entries with ``*``/``?`` wildcards matched the same
way, a single string taken as a regex that must match the whole name, and ``"all-linear"``.

A fused expert parameter (``...experts.gate_up_proj``, :mod:`mora_dist.experts`) is a candidate under its own
name and is also matched through its block's name, so ``"experts"`` reaches both projections of every block.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from torch import nn

from mora_dist.errors import NoMatchingModuleError

# Output heads that "all-linear" leaves alone (HF: lm_head / embed_out; megatron-core: output_layer).
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output_layer")
# Mixture-of-experts routers that "all-linear" leaves alone (transformers 4.x keeps them as nn.Linear; Qwen2-MoE's
# shared-expert gate is a one-output linear): adapting a router changes the routing, so it must be asked for.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
_EMPTY = "<no layer left>"  # marks a plan that chose nothing, for the agreement across pipeline stages


def name_matches(name: str, key: str) -> bool:
    """Whole-name or dotted-suffix match of one list entry (with ``*``/``?`` wildcards)."""
    if any(ch in key for ch in "*?["):
        return fnmatch.fnmatchcase(name, key) or fnmatch.fnmatchcase(name, "*." + key)
    return name == key or name.endswith("." + key)


def _select(names: list[str], spec: list[str] | str | None,
            owners: dict[str, str] | None = None) -> tuple[set[str], list[str]]:
    """``(chosen names, entries of spec that match nothing)``; a name in ``owners`` also matches through its
    owner's name."""
    owners = owners or {}
    if spec is None:
        return set(), []
    if isinstance(spec, str):
        if spec == "all-linear":
            left_out = OUTPUT_HEAD_NAMES + ROUTER_NAMES
            return {n for n in names if n.split(".")[-1] not in left_out}, []
        chosen = {n for n in names if re.fullmatch(spec, n) or (n in owners and re.fullmatch(spec, owners[n]))}
        return chosen, ([] if chosen else [spec])
    chosen: set[str] = set()
    unmatched = []
    for key in spec:
        hits = {n for n in names if name_matches(n, key) or (n in owners and name_matches(owners[n], key))}
        if not hits:
            unmatched.append(key)
        chosen |= hits
    return chosen, unmatched


def _no_match(field: str, spec: list[str] | str, entries: list[str], names: list[str]) -> NoMatchingModuleError:
    if isinstance(spec, str):
        return NoMatchingModuleError(
            f"{field}={spec!r} (a regex, matched against whole names) matches no module; "
            f"candidates look like {names[:5]}"
        )
    return NoMatchingModuleError(
        f"{field} entry {entries[0]!r} matches no module; candidates look like {_suffixes(names)}. "
        f"Fix the name or remove it from {field}"
    )


def _suffixes(names: Iterable[str]) -> list[str]:
    return sorted({n.split(".")[-1] for n in names})[:12]


Named = Iterable[tuple[str, nn.Module]]
Agree = Callable[[list[str]], list[str]]


def _local(entries: list[str]) -> list[str]:
    return entries


def plan_targets(
    model: nn.Module | Named,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None,
    is_candidate: Callable[[nn.Module], bool],
    *,
    parameters: Callable[[nn.Module], list[str]] | None = None,
    unmatched_everywhere: Agree = _local,
) -> list[str]:
    """Names of the modules (and fused expert parameters) to adapt, in model order. Raises
    ``NoMatchingModuleError`` before any change.

    ``model`` is a module or its ``(name, module)`` pairs. ``parameters(module)``: the names of the module's
    fused expert parameters, candidates as ``<module>.<parameter>``. ``unmatched_everywhere`` keeps the entries
    that match on no pipeline stage (a collective; the default is this model alone): an entry is valid if any
    stage has it.
    """
    named = model.named_modules() if isinstance(model, nn.Module) else model
    candidates, owners = [], {}
    for name, module in named:
        if name and is_candidate(module):
            candidates.append(name)
        for param in parameters(module) if parameters else []:
            owners[f"{name}.{param}"] = name
            candidates.append(f"{name}.{param}")
    chosen, unmatched = _select(candidates, target_modules, owners)
    chosen -= _select(candidates, exclude_modules, owners)[0]
    unmatched = unmatched_everywhere(unmatched + ([] if chosen else [_EMPTY]))  # one collective call
    entries = [e for e in unmatched if e != _EMPTY]
    if entries:
        raise _no_match("target_modules", target_modules, entries, candidates)
    if _EMPTY in unmatched:
        raise NoMatchingModuleError(
            f"target_modules={target_modules!r} minus exclude_modules={exclude_modules!r} leaves no linear layer; "
            f"candidates look like {_suffixes(candidates)}"
        )
    return [name for name in candidates if name in chosen]


def plan_target_parameters(
    model: nn.Module | Named,
    target_parameters: list[str] | None,
    parameters: Callable[[nn.Module], list[str]],
    *,
    unmatched_everywhere: Agree = _local,
) -> list[str]:
    """Fused expert parameters named by ``target_parameters`` (PEFT's field: parameter names, suffix match, here
    also ``*`` wildcards), as ``<module>.<parameter>`` in model order. Raises ``NoMatchingModuleError`` if an
    entry matches no fused expert parameter (on any pipeline stage)."""
    if not target_parameters:
        return []
    named = model.named_modules() if isinstance(model, nn.Module) else model
    candidates = [f"{name}.{param}" for name, module in named for param in parameters(module)]
    chosen, unmatched = _select(candidates, list(target_parameters))
    unmatched = unmatched_everywhere(unmatched)
    if unmatched:
        shown = sorted({".".join(c.split(".")[-2:]) for c in candidates})[:12] or "none (no fused experts)"
        raise NoMatchingModuleError(
            f"target_parameters entry {unmatched[0]!r} matches no fused expert parameter; candidates look like "
            f"{shown}. target_parameters adapts 3-D expert weights such as 'experts.gate_up_proj'; name linear "
            "layers in target_modules"
        )
    return [name for name in candidates if name in chosen]


def plan_modules_to_save(
    model: nn.Module | Named, modules_to_save: list[str] | None, *, unmatched_everywhere: Agree = _local
) -> list[str]:
    """Names of the modules trained fully. Raises if an entry matches nothing (on any pipeline stage)."""
    if not modules_to_save:
        return []
    named = model.named_modules() if isinstance(model, nn.Module) else model
    names = [name for name, _ in named if name]
    chosen, unmatched = _select(names, list(modules_to_save))
    unmatched = unmatched_everywhere(unmatched)
    if unmatched:
        raise _no_match("modules_to_save", list(modules_to_save), unmatched, names)
    return [name for name in names if name in chosen]
