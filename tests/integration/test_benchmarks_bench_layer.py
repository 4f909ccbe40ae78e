"""The layer benchmark (benchmarks/bench_layer.py) at a toy size, so that it cannot rot; and its
saved-activation accounting, which the issue's memory target is read from."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_layer


@pytest.mark.parametrize("tokens", [32, 1024], ids=["adapter_path", "merged_path"])
def test_toy_run_prints_table_and_writes_json(tokens, tmp_path, capsys):
    out = tmp_path / "bench.json"
    records = bench_layer.main([
        "--tokens", str(tokens), "--shapes", "40x24", "--ranks", "4", "--dtypes", "fp32,bf16",
        "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out),
    ])
    variants = ["base", "lora r=4", "mora1 r=4", "mora6 r=4"]
    assert [r["variant"] for r in records] == variants * 2
    assert json.loads(out.read_text())["records"] == records
    table = capsys.readouterr().out
    assert all(v in table for v in variants) and "bfloat16" in table
    for rec in records:
        assert rec["fwd_ms"] > 0 and rec["fwd_bwd_ms"] > 0
        assert (rec["dw_ms"] is None) == (rec["kind"] == "base")


def test_saved_activation_accounting_separates_x_from_the_rest():
    """Catches an accounting that counts the base layer's saves or misses that LoRA keeps x alive."""
    records = {r["variant"]: r for r in bench_layer.main([
        "--tokens", "64", "--shapes", "48x32", "--ranks", "4", "--dtypes", "fp32", "--repeats", "1",
        "--warmup", "0", "--threads", "1", "--out", "",
    ])}
    x_bytes = 64 * 48 * 4
    assert records["base"]["saved_bytes"] == 0 and not records["base"]["x_kept"]
    assert records["lora r=4"]["x_kept"] and records["lora r=4"]["saved_bytes"] == 64 * 4 * 4  # x A^T
    mora1 = records["mora1 r=4"]
    assert not mora1["x_kept"] and mora1["saved_bytes"] == 64 * mora1["adapter_size"] * 4  # u only
    assert records["mora6 r=4"]["x_kept"]
    assert mora1["saved_ratio"] == pytest.approx(mora1["saved_bytes"] / x_bytes)
