"""Tensor-parallel benchmark: communication and step time of MoRA vs a Megatron-Bridge-style LoRA.

For each Megatron target (``linear_qkv``, ``linear_proj``, ``linear_fc1`` gated, ``linear_fc2``) it runs one
training step (forward, backward, AdamW) of a single real megatron-core layer over gloo and counts every
collective torch.distributed actually issues (calls and payload bytes per rank: the tensor all-reduced, the
gathered output, the scattered input), for:

- ``base``: the frozen layer alone (Megatron's own collectives);
- ``mora-6``: MoRA rope type 6 (``M`` always replicated: one ``r_hat^2`` all-reduce of its gradient);
- ``mora-2``: MoRA type 2 with the aligned ``r_hat`` nearest the parameter-matched one
  (:func:`mora_dist.parallel.layouts.suggest_r_hat`): ``M`` split like the base partitions, nothing added;
- ``lora``: LoRA sharded the way Megatron-Bridge / NeMo's ``ParallelLinearAdapter`` shards it, at the same
  parameter count (``r (k + d) ~ r_hat^2``): on a column-parallel base ``A`` is a ``ColumnParallelLinear``
  with ``gather_output=True`` and ``B`` a ``ColumnParallelLinear``; on a row-parallel base ``A`` is a
  ``RowParallelLinear`` and ``B`` a ``ColumnParallelLinear`` with ``gather_output=True``.

"added" columns are the adapter's collectives minus the base layer's. Step times are medians, TP = 1 and 2.

Usage::

    python benchmarks/bench_tp.py                       # hidden 1024, 512 tokens, TP = 1 and 2
    python benchmarks/bench_tp.py --hidden 256 --tokens 64 --repeats 3

Spec: §4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mora_dist.run.distributed import free_port

COLLECTIVES = (
    "all_reduce",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_gather",
    "reduce_scatter",
)
VARIANTS = ("base", "mora-6", "mora-2", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=4, help="query groups (GQA)")
    parser.add_argument("--tokens", type=int, default=512, help="sequence length (batch 1)")
    parser.add_argument("--r", type=int, default=8, help="LoRA-equivalent rank; r_hat = round(sqrt((k + d) r))")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tp", default="1,2")
    parser.add_argument("--out", default="bench_tp.json", help="JSON file for the results ('' for none)")
    return parser.parse_args(argv)


class CommCounter:
    """Counts calls and payload bytes of torch.distributed collectives (patched in this process only)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.active = False
        self._install()

    def _install(self) -> None:
        import megatron.core.tensor_parallel.mappings as mm

        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            wrapped = self._wrap(name, original)
            setattr(dist, name, wrapped)
            for attr in ("dist_all_gather_func", "dist_reduce_scatter_func"):  # bound when megatron was imported
                if getattr(mm, attr, None) is original:
                    setattr(mm, attr, wrapped)

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.active:
                # payload per rank: the all-reduced tensor, the gathered output, the input that is scattered
                payload = args[1] if "reduce_scatter" in name else args[0]
                tensors = payload if isinstance(payload, list) else [payload]
                kind = (
                    "all_reduce" if name == "all_reduce" else ("all_gather" if "gather" in name else "reduce_scatter")
                )
                self.calls[kind] += 1
                self.bytes[kind] += sum(t.numel() * t.element_size() for t in tensors)
            return original(*args, **kwargs)

        return counted

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


def _layers(args: argparse.Namespace) -> dict[str, tuple[str, int, int, int]]:
    """name -> (parallel kind, in_features, out_features, partition stride)."""
    head = args.hidden // args.heads
    qkv = args.hidden + 2 * args.groups * head
    return {
        "linear_qkv": ("column", args.hidden, qkv, 1),
        "linear_proj": ("row", args.hidden, args.hidden, 1),
        "linear_fc1": ("column", args.hidden, 2 * args.ffn, 2),
        "linear_fc2": ("row", args.ffn, args.hidden, 1),
    }


def _build(variant: str, name: str, spec, config, r_hat: int, lora_r: int, max_tp: int):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from mora_dist.parallel.layers import MoRAColumnParallelLinear, MoRARowParallelLinear
    from mora_dist.parallel.layouts import suggest_r_hat

    kind, k, d, stride = spec
    init = torch.nn.init.xavier_normal_
    if kind == "column":
        base = ColumnParallelLinear(
            k, d, config=config, init_method=init, bias=False, gather_output=False, stride=stride
        )
    else:
        base = RowParallelLinear(
            k, d, config=config, init_method=init, bias=False, input_is_parallel=True, skip_bias_add=False
        )
    base.requires_grad_(False)
    if variant.startswith("mora"):
        cls = MoRAColumnParallelLinear if kind == "column" else MoRARowParallelLinear
        if variant == "mora-6":
            return cls(base, r_hat // 2 * 2, 6, name=name)
        # the aligned r_hat nearest the parameter-matched one, chosen for the largest TP so it is TP-independent
        aligned = suggest_r_hat(kind, k, d, r_hat, 2, tp_size=max_tp, stride=stride) or r_hat
        return cls(base, aligned, 2, name=name)
    if variant == "lora":
        return BridgeLoRA(base, kind, k, d, lora_r, config)
    return base


class BridgeLoRA(torch.nn.Module):
    """LoRA sharded like Megatron-Bridge's ``ParallelLinearAdapter`` (A and B both split, gathers between)."""

    def __init__(self, base, kind: str, k: int, d: int, r: int, config) -> None:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.base, self.kind = base, kind
        init = torch.nn.init.xavier_normal_
        if kind == "column":
            self.linear_in = ColumnParallelLinear(
                k, r, config=config, init_method=init, bias=False, gather_output=True
            )
            self.linear_out = ColumnParallelLinear(
                r, d, config=config, init_method=init, bias=False, gather_output=False
            )
        else:
            self.linear_in = RowParallelLinear(
                k, r, config=config, init_method=init, bias=False, input_is_parallel=True, skip_bias_add=True
            )
            self.linear_out = ColumnParallelLinear(
                r, d, config=config, init_method=init, bias=False, gather_output=True
            )

    def forward(self, x):
        y, bias = self.base(x)
        return y + self.linear_out(self.linear_in(x)[0])[0], bias


def _global_params(layer, variant: str, k: int, d: int, lora_r: int) -> int:
    if variant == "lora":
        return lora_r * (k + d)
    return layer.r_hat**2 if variant.startswith("mora") else 0


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_seed, enable_cpu_megatron

    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    cpu_model_parallel_seed(0)
    counter = CommCounter()
    config = ModelParallelConfig(
        tensor_model_parallel_size=world, use_cpu_initialization=True, gradient_accumulation_fusion=False
    )
    records = []
    for name, spec in _layers(args).items():
        kind, k, d, _ = spec
        r_hat = int(((k + d) * args.r) ** 0.5 + 0.5)
        lora_r = max(1, round(r_hat * r_hat / (k + d)))
        x_width = k if kind == "column" else k // world
        x = torch.randn(args.tokens, 1, x_width)
        for variant in VARIANTS:
            torch.manual_seed(0)
            layer = _build(variant, name, spec, config, r_hat, lora_r, max(int(t) for t in args.tp.split(",")))
            params = [p for p in layer.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4) if params else None
            times = []
            for i in range(args.repeats + 1):
                counter.reset()
                counter.active = i == 0
                dist.barrier()
                start = time.perf_counter()
                xi = x.clone().requires_grad_(True)
                y, _ = layer(xi)
                y.float().square().mean().backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad()
                times.append(time.perf_counter() - start)
                if i == 0:
                    calls, sent = dict(counter.calls), dict(counter.bytes)
                counter.active = False
            records.append(
                dict(
                    layer=name,
                    tp=world,
                    variant=variant,
                    params=_global_params(layer, variant, k, d, lora_r),
                    r_hat=getattr(layer, "r_hat", r_hat),
                    lora_r=lora_r,
                    calls=calls,
                    bytes=sent,
                    step_ms=1e3 * statistics.median(times[1:]),
                    m_replicated=getattr(getattr(layer, "plan", None), "m_dim", 0) is None,
                )
            )
    if rank == 0:
        queue.put(records)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    records = queue.get(timeout=1800)
    for p in procs:
        p.join()
    return records


def _table(records: list[dict]) -> str:
    base = {(r["layer"], r["tp"]): r for r in records if r["variant"] == "base"}
    lines = [
        "| layer | TP | variant | r_hat / r | trainable params | M | added collectives | added bytes/step/rank "
        "| step ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        b = base[(r["layer"], r["tp"])]
        added_calls = sum(r["calls"].values()) - sum(b["calls"].values())
        added_bytes = sum(r["bytes"].values()) - sum(b["bytes"].values())
        detail = ", ".join(
            f"{k} {v - b['calls'].get(k, 0):+d}" for k, v in sorted(r["calls"].items()) if v != b["calls"].get(k, 0)
        )
        shape = {"base": "", "lora": f"r={r['lora_r']}"}.get(r["variant"], f"r_hat={r['r_hat']}")
        where = ("replicated" if r["m_replicated"] else "sharded") if r["variant"].startswith("mora") else ""
        where = "whole" if where and r["tp"] == 1 else where
        if r["variant"] == "base":
            detail = ", ".join(f"{k} {v}" for k, v in sorted(r["calls"].items()))
            lines.append(
                f"| {r['layer']} | {r['tp']} | base | | 0 | | base: {detail or 'none'} "
                f"| base: {sum(r['bytes'].values()):,} | {r['step_ms']:.2f} |"
            )
            continue
        lines.append(
            f"| {r['layer']} | {r['tp']} | {r['variant']} | {shape} | {r['params']:,} | {where} | {added_calls:+d} "
            f"{'(' + detail + ')' if detail else ''} | {added_bytes:,} | {r['step_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    records = []
    for world in (int(t) for t in args.tp.split(",")):
        records += run(world, args)
    print(_table(records))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "records": records}, f, indent=1)
    return records


if __name__ == "__main__":
    main()
