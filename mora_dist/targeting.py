"""Turn ``target_modules`` / ``exclude_modules`` / ``modules_to_save`` into module names, before any change.

Forms (PEFT's, plus wildcards): a list of names matched as the whole name or a dotted suffix
(``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), entries with ``*``/``?`` wildcards matched the same
way, a single string taken as a regex that must match the whole name, and ``"all-linear"``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from torch import nn

from mora_dist.errors import NoMatchingModuleError

# Output heads that "all-linear" leaves alone (HF: lm_head / embed_out; megatron-core: output_layer).
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output_layer")


def name_matches(name: str, key: str) -> bool:
    """Whole-name or dotted-suffix match of one list entry (with ``*``/``?`` wildcards)."""
    if any(ch in key for ch in "*?["):
        return fnmatch.fnmatchcase(name, key) or fnmatch.fnmatchcase(name, "*." + key)
    return name == key or name.endswith("." + key)


def _select(names: list[str], spec: list[str] | str | None, field: str, strict: bool) -> set[str]:
    if spec is None:
        return set()
    if isinstance(spec, str):
        if spec == "all-linear":
            return {n for n in names if n.split(".")[-1] not in OUTPUT_HEAD_NAMES}
        chosen = {n for n in names if re.fullmatch(spec, n)}
        if strict and not chosen:
            raise NoMatchingModuleError(
                f"{field}={spec!r} (a regex, matched against whole names) matches no module; "
                f"candidates look like {names[:5]}"
            )
        return chosen
    chosen: set[str] = set()
    for key in spec:
        hits = {n for n in names if name_matches(n, key)}
        if strict and not hits:
            raise NoMatchingModuleError(
                f"{field} entry {key!r} matches no module; candidates look like {_suffixes(names)}. "
                f"Fix the name or remove it from {field}"
            )
        chosen |= hits
    return chosen


def _suffixes(names: Iterable[str]) -> list[str]:
    return sorted({n.split(".")[-1] for n in names})[:12]


def plan_targets(
    model: nn.Module,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None,
    is_candidate: Callable[[nn.Module], bool],
) -> list[str]:
    """Names of the modules to wrap, in model order. Raises ``NoMatchingModuleError`` before any change."""
    candidates = [name for name, module in model.named_modules() if name and is_candidate(module)]
    chosen = _select(candidates, target_modules, "target_modules", strict=True)
    chosen -= _select(candidates, exclude_modules, "exclude_modules", strict=False)
    if not chosen:
        raise NoMatchingModuleError(
            f"target_modules={target_modules!r} minus exclude_modules={exclude_modules!r} leaves no linear layer; "
            f"candidates look like {_suffixes(candidates)}"
        )
    return [name for name in candidates if name in chosen]


def plan_modules_to_save(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """Names of the modules trained fully. Raises if an entry matches nothing."""
    if not modules_to_save:
        return []
    names = [name for name, _ in model.named_modules() if name]
    chosen = _select(names, list(modules_to_save), "modules_to_save", strict=True)
    return [name for name in names if name in chosen]
