"""What a rank really holds, read off a live engine: the bytes of each kind of tensor (base weights, adapter
matrices, other trainable weights, gradients and communication buffers, optimizer states, compensation buffers)
and the activations autograd saves for backward. The memory planner's figures are checked against these."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(obj: Any, depth: int = 0, seen: set[int] | None = None):
    """Tensors inside ``obj``: itself, or nested (four levels) in lists, tuples, dicts and the attributes of
    DeepSpeed's own helper objects (its gradient buckets)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 4:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        if not obj.is_meta:  # DeepSpeed keeps meta copies of parameter shapes: no memory
            yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1, seen)
    elif type(obj).__module__.startswith("deepspeed.runtime.zero") and hasattr(obj, "__dict__") \
            and not isinstance(obj, (nn.Module, torch.optim.Optimizer)):
        for v in vars(obj).values():
            yield from _tensors(v, depth + 1, seen)


def rank_bytes(module: nn.Module, optimizer: Any) -> dict[str, int]:
    """Bytes of the distinct storages this rank holds, by kind. A storage is counted once, under the first kind
    that claims it: module parameters (their ZeRO-3 partition where they have one), compensation buffers, the
    optimizer's per-parameter state (Adam moments), its fp32 master copies, then every other tensor the optimizer
    (and its wrapped optimizer) holds and the parameters' ``.grad``: gradients and reduction buckets. Under ZeRO-1/2
    the gradients are the partition DeepSpeed keeps (``averaged_gradients``), by its own bytes."""
    from mora_dist.merge import RESIDUAL

    seen: set[int] = set()
    out = {"weights": 0, "mora": 0, "trainable": 0, "residual": 0, "moments": 0, "masters": 0, "grads": 0}

    def claim(kind: str, tensors) -> None:
        for t in tensors:
            if t is None or not torch.is_tensor(t) or t.numel() == 0:
                continue
            k = _key(t)
            if k not in seen:
                seen.add(k)
                out[kind] += t.untyped_storage().nbytes()

    for name, p in module.named_parameters():  # by their own bytes: ZeRO keeps many in one flat storage
        local = getattr(p, "ds_tensor", p)
        kind = "mora" if name.endswith("mora_M") else "trainable" if p.requires_grad else "weights"
        out[kind] += local.numel() * local.element_size()
        seen.add(_key(local))
    claim("residual", [b for n, b in module.named_buffers() if n.endswith(RESIDUAL)])
    inners = [optimizer]
    while hasattr(inners[-1], "optimizer") and inners[-1].optimizer is not inners[-1]:
        inners.append(inners[-1].optimizer)
    for opt in inners:
        state = getattr(opt, "state", None)
        if isinstance(state, dict):
            claim("moments", [t for s in state.values() if isinstance(s, dict) for t in _tensors(s)])
    for opt in inners:
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                     "shard_fp32_from_float16_groups", "fp32_groups_flat"):
            claim("masters", _tensors(getattr(opt, attr, None)))
    for opt in inners:
        for value in vars(opt).values():
            claim("grads", _tensors(value))
    claim("grads", [p.grad for p in module.parameters()])
    partition = getattr(optimizer, "averaged_gradients", None)
    if partition:  # ZeRO-1/2: views into reduction buffers whose size depends on which gradient they alias
        out["grads"] = sum(t.numel() * t.element_size() for t in _tensors(partition))
    return out


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward while the context is open, parameters and
    buffers of ``module`` left out (they are not activations)."""

    def __init__(self, module: nn.Module):
        self._module = module
        self._seen: dict[int, int] = {}
        self.bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        k = _key(t)
        # read at each save: ZeRO-3 swaps a gathered weight into the parameter while its layer runs
        params = {_key(p) for p in [*self._module.parameters(), *self._module.buffers()]}
        if k not in params and k not in self._seen:
            self._seen[k] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self.bytes = sum(self._seen.values())
