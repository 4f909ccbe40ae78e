"""The evidence scripts (issue 6) at toy sizes, so that they cannot rot: each runs end to end through its CLI
parser, writes its JSON and PNGs, reproduces its JSON exactly when rerun with the same seed, and its figures obey
the structure the README relies on (equal budgets, rank bounds of each method, restarts at the right steps)."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import memorize  # noqa: E402
import pretrain_compare  # noqa: E402
import rank_spectra  # noqa: E402
import results_table  # noqa: E402

TOY_MODEL = ["--hidden", "32", "--layers", "1", "--intermediate", "48", "--heads", "2", "--threads", "0"]


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """The scripts turn on deterministic algorithms; leave the rest of the session as it was."""
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _without_run(path: Path) -> dict:
    body = json.loads(path.read_text())
    body.pop("run")
    return body


@pytest.fixture(scope="module")
def pretrain_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "p.json"
    argv = TOY_MODEL + ["--steps", "6", "--merge-every", "2", "--warmup", "1", "--restart-warmup", "1", "--batch",
                        "2", "--seq", "16", "--eval-windows", "4", "--eval-every", "3", "--r", "2", "--out", str(out)]
    pretrain_compare.main(argv)
    first = _without_run(out)
    pretrain_compare.main(argv)
    return out, first


def test_pretrain_compare_reproduces_and_keeps_budgets_and_rank_bounds(pretrain_json):
    """Catches: a nondeterministic data order or init (rerun differs), a PEFT method with another budget, a
    ReLoRA/ReMoRA that never merges (its update would stay within one adapter's rank)."""
    out, first = pretrain_json
    assert _without_run(out) == first, "same seed, same arguments: the JSON must be identical"
    methods = first["methods"]
    assert list(methods) == ["full", "lora", "mora", "relora", "remora"]
    budgets = [methods[m]["adapter_params"] for m in ("lora", "mora", "relora", "remora")]
    assert max(budgets) / min(budgets) < 1.1
    assert methods["full"]["adapter_params"] == 0 and methods["full"]["trainable_params"] > budgets[0]
    assert [r["step"] for r in methods["remora"]["history"]["restarts"]] == [2, 4]
    lora_ranks = [v["rank"] for v in methods["lora"]["rank"].values()]
    relora_ranks = [v["rank"] for v in methods["relora"]["rank"].values()]
    assert max(lora_ranks) <= 2 < max(relora_ranks), "ReLoRA's 3 cycles of rank 2 must exceed one LoRA's rank"
    assert [e["step"] for e in methods["mora"]["history"]["eval"]] == [0, 3, 6]
    assert out.with_suffix(".png").stat().st_size > 1000


def test_rank_spectra_types_add_rank_as_the_spec_says(pretrain_json, tmp_path):
    """Catches: a type switch that does not happen (cycle (1, 2) would stay at r_hat), or types 3/4 adding
    directions that 1 and 2 do not already span (spec §3: they add nothing)."""
    out = tmp_path / "r.json"
    rank_spectra.main(TOY_MODEL + ["--cycles", "3", "--merge-every", "3", "--restart-warmup", "1", "--batch", "2",
                                   "--seq", "16", "--eval-windows", "4", "--r", "2", "--layer-size", "64",
                                   "--layer-r-hat", "16", "--pretrain-json", str(pretrain_json[0]), "--out", str(out)])
    body = json.loads(out.read_text())
    ranks = body["structural"]["ranks"]
    assert ranks["1,2"][0] == 16 and 16 < ranks["1,2"][1] <= 32
    assert ranks["1,2,3,4"][-1] == ranks["1,2"][-1]
    assert ranks["6,6"][0] == 64
    cycles = body["training_cycles"]
    assert all(len(c["per_cycle"]) == 3 for c in cycles.values())
    assert cycles["1,2"]["per_cycle"][1]["mean_rank"] > cycles["1,2"]["per_cycle"][0]["mean_rank"]
    assert set(body["figure5"]) == {"full", "lora", "mora", "relora", "remora"}
    assert (tmp_path / "r_cycles.png").exists() and (tmp_path / "r_methods.png").exists()


def test_memorize_reproduces_and_masks_keys(tmp_path):
    """Catches: loss or accuracy taken on the key characters (labels must cover only the value), a seed that
    does not fix the pairs, budgets of LoRA and MoRA drifting apart."""
    tok = memorize.ev.CharTokenizer()
    ids, labels = memorize.make_pairs(5, 4, 0, tok)
    assert (labels[:, :5] == -100).all() and (labels[:, 5:] == ids[:, 5:]).all()
    assert torch.equal(memorize.make_pairs(5, 4, 0, tok)[0], ids)
    assert not torch.equal(memorize.make_pairs(5, 4, 1, tok)[0], ids)
    out = tmp_path / "m.json"
    argv = TOY_MODEL + ["--pretrain-steps", "2", "--pretrain-batch", "2", "--seq", "16", "--steps", "4",
                        "--pairs", "6", "--hex-len", "4", "--seeds", "0,1", "--eval-every", "2", "--ranks", "2",
                        "--out", str(out)]
    memorize.main(argv)
    first = _without_run(out)
    memorize.main(argv)
    assert _without_run(out) == first
    variants = first["variants"]
    assert list(variants) == ["FFT", "LoRA r=2", "MoRA1 r=2", "MoRA6 r=2"]
    assert abs(variants["MoRA1 r=2"]["trainable_params"] / variants["LoRA r=2"]["trainable_params"] - 1) < 0.05
    summary = variants["FFT"]["summary"]
    assert summary["steps"] == [0, 2, 4] and all(0 <= a <= 1 for a in summary["mean_char_acc"])
    assert len(variants["FFT"]["per_seed_final"]) == 2
    assert out.with_suffix(".png").exists()


def test_results_table_ratios_are_relative_to_lora_and_base(tmp_path):
    """Catches: ratios divided by the wrong reference (LoRA against itself must be exactly 1)."""
    results_table.main(["--run-layer", "--layer-args", "--tokens 16 --shapes 40x24 --ranks 2 --repeats 1 "
                        "--warmup 0 --dtypes fp32 --threads 0", "--out-dir", str(tmp_path)])
    body = json.loads((tmp_path / "results_table.json").read_text())
    rows = {row["variant"]: row for row in body["layer"]}
    assert set(rows) == {"lora r=2", "mora1 r=2", "mora6 r=2"}
    assert rows["lora r=2"]["fwd_x_lora"] == 1 and rows["lora r=2"]["params"] == (40 + 24) * 2
    r_hat = results_table.ev.compute_r_hat(40, 24, 2, 1)
    assert rows["mora1 r=2"]["params"] == r_hat * r_hat
    assert "| lora r=2 |" in (tmp_path / "results_table.md").read_text()


def test_results_table_reads_list_and_keyed_benchmark_files(tmp_path):
    """Catches: a benchmark file keyed by method (bench_train.py's {"results": {"lora": {...}}}) silently
    dropped from the README's cost table, or nested values breaking the markdown."""
    listed = {"args": {}, "records": [{"a": 1, "calls": {"all_reduce": 2, "all_gather": 1}, "tags": ["x"]}]}
    assert results_table.flat_records(listed) == [{"a": 1, "calls_total": 3}]
    keyed = {"args": {"steps": 3}, "results": {"lora": {"tokens_per_s": 10.0}, "mora": {"tokens_per_s": 9.5}}}
    assert results_table.flat_records(keyed) == [{"name": "lora", "tokens_per_s": 10.0},
                                                 {"name": "mora", "tokens_per_s": 9.5}]
    (tmp_path / "bench_train.json").write_text(json.dumps(keyed))
    results_table.main(["--out-dir", str(tmp_path)])
    text = (tmp_path / "results_table.md").read_text()
    assert "| mora | 9.5 |" in text and "not found (run with --run-layer)" in text
