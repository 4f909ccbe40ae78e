"""Per-rank memory of the bf16 merge compensation buffers, sharded over data parallelism or kept whole, at DP 1, 2
and 4 under ZeRO-2 and ZeRO-3, side by side in one run on CPU (gloo): each rank's bytes of M, the optimizer state,
the buffers and the base weights, its resident memory before a ReMoRA merge and the peak it reaches during one.

A Llama with wide layers (bf16, every linear layer adapted with MoRA). Each configuration runs in processes of its
own, so a rank's peak resident memory is its own. Resident memory is read from ``/proc/self/status`` (``VmHWM`` reset
through ``/proc/self/clear_refs`` just before the merge), so this runs on Linux only.
Usage: ``python benchmarks/bench_residual_memory.py [--hidden 1024] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _rank(args: argparse.Namespace, stage: int, sharded: bool) -> dict:
    import deepspeed
    import torch.distributed as dist
    import transformers

    from mora_dist import MoRAConfig, apply_mora, shard_residuals
    from mora_dist.merge import RESIDUAL
    from mora_dist.model import mora_layers
    from mora_dist.run.distributed import patch_deepspeed_for_cpu
    from mora_dist.training.remora import ReMoRACallback

    patch_deepspeed_for_cpu()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    apply_mora(model, MoRAConfig(r=8, target_modules="all-linear", mora_type=1))
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    ds = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3,
          "torch_adam": True}}, "zero_optimization": zero, "bf16": {"enabled": True}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                     if p.requires_grad], config=ds)
    if sharded:
        shard_residuals(engine.module, engine.seq_data_parallel_group)
    ids = torch.randint(0, 256, (1, 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    callback = ReMoRACallback(merge_every=1, type_cycle=(1, 2), restart_warmup=0)
    callback.on_train_begin(engine)
    callback.merge(engine)  # the first merge allocates the buffers (DeepSpeed cast the weights to bf16)
    layers = [layer for _, layer in mora_layers(engine.module)]
    dist.barrier()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    seconds = callback.merge(engine)["remora/merge_seconds"]
    peak = _status_kib("VmHWM")
    opt = engine.optimizer
    moments = [v for state in getattr(opt, "optimizer", opt).state.values() for v in state.values()]
    weights = [getattr(layer._base_weight_shard(), "ds_tensor", layer._base_weight_shard()) for layer in layers]
    largest = max(int(torch.Size(getattr(w, "ds_shape", w.shape)).numel()) for w in
                  (layer._base_weight_shard() for layer in layers))
    model = sum(2 * int(torch.Size(getattr(w, "ds_shape", w.shape)).numel()) for w in
                (layer._base_weight_shard() for layer in layers))
    return {"M": _bytes(layer.mora_M for layer in layers), "moments": _bytes(moments), "adapted_bf16": model,
            "residual": _bytes(getattr(layer, RESIDUAL) for layer in layers), "weights": _bytes(weights),
            "rss_before": before * 1024, "merge_peak_increase": (peak - before) * 1024,
            "largest_layer_bf16": 2 * largest, "merge_seconds": seconds}


def _entry(rank: int, world: int, port: int, args, stage: int, sharded: bool, queue) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    queue.put((rank, _rank(args, stage, sharded)))


def _launch(world: int, args, stage: int, sharded: bool) -> list[dict]:
    import multiprocessing as mp

    from mora_dist.run.distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, args, stage, sharded, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1200) for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a rank of DP={world} ZeRO-{stage} exited with {p.exitcode}")
    return [results[r] for r in range(world)]


def _table(rows: list[dict]) -> str:
    lines = ["| ZeRO | residual | DP | residual / rank (MiB) | vs DP 1 | weights / rank (MiB) | M + optimizer / rank "
             "(MiB) | RSS before merge (MiB) | merge peak increase (MiB, median rank) | largest layer bf16 (MiB) | "
             "adapted weights bf16 (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {'sharded' if r['sharded'] else 'whole'} | {r['dp']} | "
                     f"{r['residual'] / MIB:.2f} | {r['residual_vs_dp1']:.3f} | {r['weights'] / MIB:.2f} | "
                     f"{(r['M'] + r['moments']) / MIB:.2f} | {r['rss_before'] / MIB:.0f} | "
                     f"{r['merge_peak_increase'] / MIB:.1f} | {r['largest_layer_bf16'] / MIB:.1f} | "
                     f"{r['adapted_bf16'] / MIB:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "residual_memory.json")
    args = parser.parse_args(argv)
    # Every tensor of 64 KiB or more in its own mapping, returned to the system when freed: resident memory then
    # follows the live tensors (glibc's default raises this threshold as buffers are freed, and a freed layer's
    # temporaries stay resident in the heap, which would hide what a merge holds at once). Inherited by the ranks.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows = []
    for stage in (2, 3):
        for sharded in (False, True):
            dp1 = None
            for dp in args.dp:
                ranks = _launch(dp, args, stage, sharded)
                row = {"stage": stage, "sharded": sharded, "dp": dp,
                       **{k: statistics.median(r[k] for r in ranks) for k in ranks[0]}}
                dp1 = dp1 or row["residual"]
                row["residual_vs_dp1"] = row["residual"] / dp1
                rows.append(row)
                print(f"ZeRO-{stage} {'sharded' if sharded else 'whole'} DP={dp}: residual "
                      f"{row['residual'] / MIB:.2f} MiB/rank, merge peak +{row['merge_peak_increase'] / MIB:.1f} MiB",
                      flush=True)
    body = {"model": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                      "dtype": "bfloat16", "targets": "all-linear", "r": 8},
            "machine": f"CPU, {torch.get_num_threads()} threads available, gloo", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(_table(rows) + "\n")
    print(_table(rows))
    return body


if __name__ == "__main__":
    sys.exit(main() and 0)
