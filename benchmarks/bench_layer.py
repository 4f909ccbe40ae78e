"""Layer benchmark : a frozen ``nn.Linear`` against LoRA and MoRA types 1 and 6 on the same base.

For every shape ``(in, out)`` and dtype it times, side by side in one run and round-robin per repeat (so that
noise from other processes hits every variant alike): the forward (autograd on), the forward + backward with an
input that requires grad (``dX`` must flow, the base weight is frozen), and the time to build the dense ``dW``.
It also counts the activations each adapter saves for backward (unique storages, the input's own storage and
parameters excluded) and says whether the adapter keeps the input itself alive.

The pairs are fair by parameter count: MoRA at rank ``r`` has ``r_hat^2 ~ (k + d) r`` parameters, LoRA at rank
``r`` has ``(k + d) r``. Adapter parameters are fp32 (the library default) also when the base runs in bf16.

Usage::

    python benchmarks/bench_layer.py                               # the full grid on CPU, 2 threads
    python benchmarks/bench_layer.py --device cuda --threads 0     # the same on a GPU
    python benchmarks/bench_layer.py --tokens 64 --shapes 96x80 --ranks 8 --repeats 2 --dtypes fp32

Spec: §2 (the layer), §3.1 (LoRA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from mora_dist import MoRALinear
from mora_dist.lora import LoRALinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
DEFAULT_SHAPES = "768x768,2048x2048,2048x5632,5632x2048"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="rows of the input (batch x sequence)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated IN x OUT, e.g. 2048x5632")
    parser.add_argument("--ranks", default="8,64", help="comma-separated LoRA-equivalent ranks r")
    parser.add_argument("--types", default="1,6", help="comma-separated MoRA types")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; 0 leaves it alone")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (robust on a shared CPU; use with --threads 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_layer.json", help="JSON file for the results ('' for none)")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(k: int, d: int, ranks: list[int], types: list[int], dtype: torch.dtype,
                   device: torch.device) -> dict[str, dict]:
    """The base layer and its adapters, sharing one frozen ``nn.Linear``; adapters get non-zero weights."""
    base = nn.Linear(k, d, device=device, dtype=dtype).requires_grad_(False)
    variants = {"base": {"module": base, "kind": "base", "r": 0, "size": 0}}
    for r in ranks:
        lora = LoRALinear(base, r=r).to(device)
        with torch.no_grad():
            lora.lora_B.normal_(0, 0.02)
        variants[f"lora r={r}"] = {"module": lora, "kind": "lora", "r": r, "size": r}
        for mora_type in types:
            mora = MoRALinear(base, r=r, mora_type=mora_type).to(device)
            with torch.no_grad():
                mora.mora_M.normal_(0, 0.02)
            variants[f"mora{mora_type} r={r}"] = {"module": mora, "kind": f"mora{mora_type}", "r": r,
                                                  "size": mora.r_hat}
    return variants


@contextmanager
def _recording_saved(x: torch.Tensor, module: nn.Module, base: nn.Module, record: dict):
    """Record storages saved for backward by ``module`` outside its ``base`` submodule."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    x_ptr = x.untyped_storage().data_ptr()
    inside_base = [False]

    def pack(t: torch.Tensor):
        if not inside_base[0]:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == x_ptr:
                record["x_kept"] = True
            elif ptr not in params:
                record["storages"][ptr] = storage.nbytes()
        return t

    handles = []
    if base is not module:
        handles.append(base.register_forward_pre_hook(lambda *_: inside_base.__setitem__(0, True)))
        handles.append(base.register_forward_hook(lambda *_: inside_base.__setitem__(0, False)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for handle in handles:
            handle.remove()


def saved_activations(module: nn.Module, base: nn.Module, x: torch.Tensor) -> dict:
    """Bytes the adapter saves for backward beyond ``x`` and parameters, and whether it saves ``x`` itself."""
    record = {"storages": {}, "x_kept": False}
    with _recording_saved(x, module, base, record):
        out = module(x)
    del out
    saved = sum(record["storages"].values())
    return {"saved_bytes": saved, "saved_ratio": saved / (x.numel() * x.element_size()), "x_kept": record["x_kept"]}


def _timed(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def bench_group(k: int, d: int, dtype: torch.dtype, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time all variants of one (shape, dtype), interleaved per repeat; returns one record per variant."""
    ranks = [int(r) for r in args.ranks.split(",")]
    types = [int(t) for t in args.types.split(",")]
    variants = build_variants(k, d, ranks, types, dtype, device)
    x = torch.randn(args.tokens, k, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, d, device=device, dtype=dtype)
    base = variants["base"]["module"]

    def fwd(module):
        return lambda: module(x)

    def fwd_bwd(module):
        def run():
            x.grad = None
            for p in module.parameters():
                p.grad = None
            module(x).backward(grad)
        return run

    def build_dw(module):
        def run():
            with torch.no_grad():
                module.delta_weight()
        return run

    times = {name: {"fwd": [], "fwd_bwd": [], "dw": []} for name in variants}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for rep in range(args.warmup + args.repeats):
        for phase, make in (("fwd", fwd), ("fwd_bwd", fwd_bwd), ("dw", build_dw)):
            for name, v in variants.items():
                if phase == "dw" and v["kind"] == "base":
                    continue
                elapsed = _timed(make(v["module"]), device, clock)
                if rep >= args.warmup:
                    times[name][phase].append(elapsed)
    records = []
    for name, v in variants.items():
        rec = {"shape": f"{k}x{d}", "in": k, "out": d, "dtype": str(dtype).removeprefix("torch."),
               "tokens": args.tokens, "variant": name, "kind": v["kind"], "r": v["r"], "adapter_size": v["size"]}
        for phase in ("fwd", "fwd_bwd", "dw"):
            rec[f"{phase}_ms"] = statistics.median(times[name][phase]) * 1e3 if times[name][phase] else None
        rec.update(saved_activations(v["module"], base, x) if v["kind"] != "base"
                   else {"saved_bytes": 0, "saved_ratio": 0.0, "x_kept": False})
        records.append(rec)
    base_rec = records[0]
    for rec in records:
        rec["fwd_ratio"] = rec["fwd_ms"] / base_rec["fwd_ms"]
        rec["fwd_bwd_ratio"] = rec["fwd_bwd_ms"] / base_rec["fwd_bwd_ms"]
    return records


def format_table(records: list[dict]) -> str:
    header = (f"{'shape':>10} {'dtype':>8} {'variant':>11} {'size':>5} {'fwd ms':>9} {'x base':>7} "
              f"{'f+b ms':>9} {'x base':>7} {'dW ms':>8} {'saved/x':>8} {'keeps x':>7}")
    lines = [header, "-" * len(header)]
    for rec in records:
        dw = f"{rec['dw_ms']:8.2f}" if rec["dw_ms"] is not None else f"{'-':>8}"
        lines.append(
            f"{rec['shape']:>10} {rec['dtype']:>8} {rec['variant']:>11} {rec['adapter_size']:>5} "
            f"{rec['fwd_ms']:9.2f} {rec['fwd_ratio']:6.2f}x {rec['fwd_bwd_ms']:9.2f} {rec['fwd_bwd_ratio']:6.2f}x "
            f"{dw} {rec['saved_ratio']:8.3f} {'yes' if rec['x_kept'] else 'no':>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    records = []
    try:
        for dtype_name in args.dtypes.split(","):
            for shape in args.shapes.split(","):
                k, d = (int(v) for v in shape.lower().split("x"))
                group = bench_group(k, d, DTYPES[dtype_name], args, device)
                print(format_table(group).split("\n", 2)[2], flush=True)  # progress: rows of this group
                records += group
    finally:
        torch.set_num_threads(threads)  # callers (tests) keep their setting
    print(f"\ntokens={args.tokens} device={device} threads={args.threads or threads} repeats={args.repeats} "
          f"clock={args.clock} "
          f"(medians; 'x base' = ratio to the frozen base layer; size = LoRA rank or MoRA r_hat)")
    print(format_table(records))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "records": records}, f, indent=1)
    return records


if __name__ == "__main__":
    main()
