"""Autograd collectives for MoRA's tensor-parallel layers. Megatron's own mappings
(``megatron.core.tensor_parallel.mappings``) move activations; these move the square matrix.

- :func:`reduce_replicated_grad`: identity in forward, SUM all-reduce of the gradient in backward. Applied to a
  replicated ``M`` where it enters the forward, so every rank's parameter receives the full gradient (each rank
  only sees the part of ``dL/dM`` produced by its own output rows or input columns) before any optimizer,
  Megatron DDP ``main_grad`` hook or DeepSpeed ZeRO hook reads it. One ``r_hat x r_hat`` all-reduce per forward
  of the layer: under gradient accumulation that is one per micro-batch (the per-micro-batch sums add up to the
  same total).
- :func:`sum_replicated_grads` / :func:`finalize_model_grads` (``tensor_parallel_grad_sync="step"``): the same
  sum once per optimizer step, on the accumulated ``main_grad`` (or ``grad``), one coalesced all-reduce per
  group; ``finalize_model_grads`` is Megatron's with that sum appended, for ``config.finalize_model_grads_func``.
- :func:`gather_matrix_shards`: the global ``M`` from per-rank row or column shards (checkpoints, no autograd).

Spec: §4.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _ReduceReplicatedGrad(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce SUM over ``group``."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return matrix.view_as(matrix)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def reduce_replicated_grad(matrix: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``matrix`` unchanged, with its gradient SUM-reduced over ``group`` in backward. ``(r_hat, r_hat)``.

    No-op when ``group`` is None or has one rank. Spec: §4.
    """
    if group is None or dist.get_world_size(group) == 1:
        return matrix
    return _ReduceReplicatedGrad.apply(matrix, group)


@torch.no_grad()
def sum_replicated_grads(modules: torch.nn.Module | list[torch.nn.Module]) -> int:
    """SUM-reduce, over their tensor-parallel group, the accumulated gradients of the replicated matrices of
    layers built with ``tensor_parallel_grad_sync="step"``. Call once per optimizer step, after the backward
    passes of all micro-batches; returns the number of matrices reduced. Spec: §4.
    """
    by_group: dict[int, tuple[dist.ProcessGroup, list[torch.Tensor]]] = {}
    for module in modules if isinstance(modules, list) else [modules]:
        for param in module.parameters():
            group = getattr(param, "mora_tp_sum_group", None)
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if group is None or grad is None:
                continue
            by_group.setdefault(id(group), (group, []))[1].append(grad)
    count = 0
    for group, grads in by_group.values():
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)
        count += len(grads)
    return count


def finalize_model_grads(model: list[torch.nn.Module], *args, **kwargs):
    """Megatron's ``finalize_model_grads`` (data-parallel and layernorm reductions), then
    :func:`sum_replicated_grads`. Set it as ``config.finalize_model_grads_func`` or call it where a loop calls
    Megatron's. Spec: §4.
    """
    # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.distributed import finalize_model_grads as megatron_finalize_model_grads

    result = megatron_finalize_model_grads(model, *args, **kwargs)
    sum_replicated_grads(model)
    return result


@torch.no_grad()
def gather_matrix_shards(
    local: torch.Tensor, ids_per_rank: list[torch.Tensor], dim: int, group: dist.ProcessGroup
) -> torch.Tensor:
    """All-gather equal-shaped shards of ``M`` and place rank ``t``'s along ``dim`` at ``ids_per_rank[t]``.

    Args:
        local: this rank's shard, ``(r_hat / tp, r_hat)`` for rows or ``(r_hat, r_hat / tp)`` for columns.
        ids_per_rank: global row/column ids held by each rank of ``group``.
        dim: 0 for row shards, 1 for column shards.
        group: the tensor-parallel group.

    Returns:
        The global ``(r_hat, r_hat)`` matrix, on ``local``'s device.
    """
    shards = [torch.empty_like(local) for _ in ids_per_rank]
    dist.all_gather(shards, local.contiguous(), group=group)
    r_hat = sum(len(ids) for ids in ids_per_rank)
    full = local.new_zeros(r_hat, r_hat)
    for ids, shard in zip(ids_per_rank, shards):
        full.index_copy_(dim, ids.to(local.device), shard)
    return full
