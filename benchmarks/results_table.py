"""Cost: the layer, tensor-parallel and training benchmarks gathered into one results table.

Reads the JSON files the benchmarks write (``bench_layer.py --out``, and any other benchmark JSON with a list
of flat records), and writes ``results_table.md`` (the README's cost tables) and ``results_table.json``.

For the layer benchmark it gives, per shape and dtype, every adapter's forward and forward + backward time as a
ratio to the frozen base layer and to LoRA at the same budget, the time to build the dense ``dW`` (the work of a
merge), the activations saved for backward (relative to the input), and the adapter's parameter count. Other
benchmark files (training throughput, tensor-parallel timings) are shown as they come, one row per record.

Usage::

    python benchmarks/results_table.py --run-layer          # run bench_layer.py (the layer grid, CPU time), tabulate
    python benchmarks/bench_tp.py --out benchmarks/results/bench_tp.json           # then, optionally:
    python benchmarks/bench_train.py --json benchmarks/results/bench_train.json
    python benchmarks/results_table.py                       # tabulates every JSON found in benchmarks/results/
    python benchmarks/results_table.py --layer-json benchmarks/results/h200/bench_layer_h200.json \
        --extra-json benchmarks/results/h200/bench_train_h200.json --stem results_table_h200   # GPU figures
    python benchmarks/results_table.py --run-layer --layer-args "--tokens 32 --shapes 64x48 --ranks 2 \
        --repeats 1 --warmup 0 --dtypes fp32" --out-dir /tmp/rt                                    # toy (CI)

Spec: §2 (the layer), §3.1 (LoRA), §4 (tensor parallelism).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence_common as ev  # noqa: E402

# The layer grid, timed in process CPU time on one thread: robust to other jobs on a shared CPU.
LAYER_GRID = "--repeats 5 --warmup 1 --threads 1 --clock cpu --dtypes fp32,bf16"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=str(ev.RESULTS_DIR))
    p.add_argument("--stem", default="results_table", help="name of the .md and .json written to OUT_DIR")
    p.add_argument("--layer-json", default=None,
                   help="bench_layer.py output (default: OUT_DIR/bench_layer_cpu_1thread.json)")
    p.add_argument("--run-layer", action="store_true", help="run bench_layer.py first, into --layer-json")
    p.add_argument("--layer-args", default=LAYER_GRID, help="arguments for bench_layer.py with --run-layer")
    p.add_argument("--extra-json", action="append", default=None,
                   help="other benchmark JSON files to include; repeatable (default: bench_tp.json and "
                        "bench_train.json in OUT_DIR, those that exist)")
    return p.parse_args(argv)


def layer_rows(records: list[dict]) -> list[dict]:
    """One row per adapter: ratios to the base layer and to LoRA of the same ``r``, ``dW`` time, memory."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["shape"], rec["dtype"], rec.get("tokens")), []).append(rec)
    for (shape, dtype, tokens), recs in groups.items():
        lora = {rec["r"]: rec for rec in recs if rec["kind"] == "lora"}
        k, d = recs[0]["in"], recs[0]["out"]
        for rec in recs:
            if rec["kind"] == "base":
                continue
            ref = lora.get(rec["r"])
            size = rec["adapter_size"]
            params = size * size if rec["kind"].startswith("mora") else (k + d) * size
            rows.append({
                "shape": shape, "dtype": dtype, "tokens": tokens, "variant": rec["variant"], "params": params,
                "fwd_x_base": rec["fwd_ratio"], "fwd_bwd_x_base": rec["fwd_bwd_ratio"],
                "fwd_x_lora": rec["fwd_ms"] / ref["fwd_ms"] if ref else None,
                "fwd_bwd_x_lora": rec["fwd_bwd_ms"] / ref["fwd_bwd_ms"] if ref else None,
                "dw_ms": rec["dw_ms"], "saved_x_input": rec["saved_ratio"], "keeps_input": rec["x_kept"],
                "base_fwd_ms": next(r["fwd_ms"] for r in recs if r["kind"] == "base"),
            })
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def flat_records(payload) -> list[dict]:
    """The list of flat records in a benchmark JSON: the payload itself, or its first list-of-dicts value."""
    if isinstance(payload, list):
        records = payload
    else:
        records = next((v for v in payload.values() if isinstance(v, list) and v and isinstance(v[0], dict)), None)
        if records is None:  # {"results": {"lora": {...}, "mora": {...}}}: one record per key
            table = next((v for v in payload.values() if isinstance(v, dict) and v
                          and all(isinstance(r, dict) for r in v.values())), {})
            records = [{"name": name, **rec} for name, rec in table.items()]
    return [_flatten(rec) for rec in records]


def _flatten(record: dict) -> dict:
    """Scalars as they are; a dict of numbers (collective calls or bytes per kind) as its total."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            flat[f"{key}_total"] = sum(value.values())
        elif not isinstance(value, (dict, list)):
            flat[key] = value
    return flat


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layer_json = Path(args.layer_json) if args.layer_json else out_dir / "bench_layer_cpu_1thread.json"
    if args.run_layer:
        import bench_layer

        bench_layer.main(shlex.split(args.layer_args) + ["--out", str(layer_json)])
    sections = ["# Cost of the adapters (generated by benchmarks/results_table.py)", ""]
    result = {"sources": {}}
    if layer_json.exists():
        payload = json.loads(layer_json.read_text(encoding="utf-8"))
        rows = layer_rows(payload["records"])
        result["layer"] = rows
        result["sources"]["layer"] = {"file": layer_json.name, "args": payload.get("args", {}),
                                      "torch": payload.get("torch")}
        bench_args = payload.get("args", {})
        sections += [f"## Layer (`bench_layer.py`, {bench_args.get('tokens')} tokens, device "
                     f"{bench_args.get('device')}, {bench_args.get('threads')} threads, "
                     f"{bench_args.get('clock', 'wall')} clock, medians of {bench_args.get('repeats')})", "",
                     markdown(rows, ["shape", "dtype", "variant", "params", "fwd_x_base", "fwd_bwd_x_base",
                                     "fwd_x_lora", "fwd_bwd_x_lora", "dw_ms", "saved_x_input", "keeps_input"]),
                     "", "`x_base`: time / frozen base layer; `x_lora`: time / LoRA of the same budget; `dw_ms`: "
                     "building the dense dW (the work of a merge); `saved_x_input`: activations saved for "
                     "backward / input size.", ""]
    else:
        sections += [f"Layer benchmark: {layer_json} not found (run with --run-layer).", ""]
    extras = args.extra_json
    if extras is None:
        extras = [str(out_dir / name) for name in ("bench_tp.json", "bench_train.json") if (out_dir / name).exists()]
    for extra in extras:
        path = Path(extra)
        if not path.exists():
            sections += [f"{path.name}: not found.", ""]
            continue
        records = flat_records(json.loads(path.read_text(encoding="utf-8")))
        result[path.stem] = records
        columns = list(dict.fromkeys(k for rec in records for k in rec))
        sections += [f"## {path.stem}", "", markdown(records, columns), ""]
    text = "\n".join(sections)
    (out_dir / f"{args.stem}.md").write_text(text, encoding="utf-8")
    ev.write_json(out_dir / f"{args.stem}.json", result)
    print(text)
    return result


if __name__ == "__main__":
    main()
