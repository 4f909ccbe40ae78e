"""The evidence scripts at toy sizes, so that they cannot rot: each runs end to end through its CLI
parser, writes its JSON and PNGs, reproduces its JSON exactly when rerun with the same seed, and its figures obey
the structure the README relies on (equal budgets, rank bounds of each method, restarts at the right steps)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import cpt_compare  # noqa: E402
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


CPT_TOY = ["--hidden", "32", "--layers", "1", "--intermediate", "48", "--heads", "2", "--base-steps", "4",
           "--steps", "4", "--merge-every", "2", "--warmup", "1", "--restart-warmup", "1", "--drugs", "4",
           "--batch", "5", "--seq", "32", "--seeds", "0,1", "--lr-grid-peft", "1e-3,3e-3", "--lr-grid-full", "1e-4",
           "--eval-every", "2", "--old-windows", "4", "--threads", "1", "--sweep-extend", "1"]


def test_cpt_world_keeps_held_out_phrasings_out_of_training():
    """Catches: a development or test phrasing leaking into the training documents (the probe would measure
    recall, not knowledge), a fact missing from a training phrasing, a probe span that is not the answer."""
    tok = cpt_compare.ev.CharTokenizer()
    facts = cpt_compare.make_world(6, 0)
    assert len({f.drug for f in facts}) == 6 and all(f.answer != f.drug for f in facts if f.relation == "interaction")
    text = "\n\n".join(cpt_compare.training_documents(facts))
    for fact in facts:
        for phrasing in range(cpt_compare.TRAIN_PHRASINGS):
            assert text.count(fact.sentence(phrasing)) == 1
        for phrasing in (cpt_compare.DEV, cpt_compare.TEST):
            assert fact.probe(phrasing)[0] not in text
    for rel, templates in cpt_compare.TEMPLATES.items():
        held_out = {t.split("{d}")[0] + "|" + t.split("{d}")[1].split("{a}")[0] for t in templates[4:]}
        seen = {t.split("{d}")[0] + "|" + t.split("{d}")[1].split("{a}")[0] for t in templates[:4]}
        assert not held_out & seen, f"{rel}: a held-out phrasing repeats a training one"
    ids, spans = cpt_compare.probe_batch(facts, cpt_compare.TEST, tok)
    for row, (fact, (start, length)) in enumerate(zip(facts, spans)):
        assert tok.decode(ids[row, start: start + length]) == fact.answer
        assert tok.decode(ids[row, :start]) == fact.probe(cpt_compare.TEST)[0]


class _NextCharOracle(torch.nn.Module):
    """Logits that put all mass on the next character of ``truth`` (default: the input), ``shift`` positions
    off (0: always right)."""

    def __init__(self, shift: int, truth: torch.Tensor | None = None) -> None:
        super().__init__()
        self.shift, self.truth = shift, truth

    def forward(self, input_ids):
        target = torch.roll(input_ids if self.truth is None else self.truth, -1 - self.shift, dims=1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(target, 96).float()})()


def test_cpt_probe_reads_the_answer_span_only():
    """Catches: the probe scoring the wrong positions (off by one would give the oracle a low score), or exact
    match counted per character."""
    tok = cpt_compare.ev.CharTokenizer()
    facts = cpt_compare.make_world(3, 0)
    ids, spans = cpt_compare.probe_batch(facts, cpt_compare.TEST, tok)
    relations = [f.relation for f in facts]
    right = cpt_compare.probe_accuracy(_NextCharOracle(0), ids, spans, relations)
    assert right == {"char_acc": 1.0, "exact": 1.0, **{f"exact_{rel}": 1.0 for rel in cpt_compare.RELATIONS}}
    shifted = cpt_compare.probe_accuracy(_NextCharOracle(1), ids, spans, relations)
    assert shifted["exact"] == 0.0 and shifted["char_acc"] < 0.3
    wrong = ids.clone()
    wrong[relations.index("dose"), spans[relations.index("dose")][0]] = 0  # one dose character mispredicted
    one_wrong = cpt_compare.probe_accuracy(_NextCharOracle(0, truth=wrong), ids, spans, relations)
    assert one_wrong["exact_dose"] == 2 / 3 and one_wrong["exact_target"] == 1.0 and one_wrong["exact"] == 11 / 12


class _SentenceOracle(torch.nn.Module):
    """Certain of the next character in rows whose text ``believe`` accepts, uniform elsewhere."""

    def __init__(self, believe) -> None:
        super().__init__()
        self.believe, self.tok = believe, cpt_compare.ev.CharTokenizer()

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, 96)
        for row, ids in enumerate(input_ids):
            if self.believe(self.tok.decode(ids)):
                logits[row] = 20 * torch.nn.functional.one_hot(torch.roll(ids, -1), 96).float()
        return type("Out", (), {"logits": logits})()


def test_cpt_choice_probe_ranks_every_candidate_of_the_relation():
    """Catches: a candidate pool that misses the true answer or offers the drug as its own interaction, scores
    taken outside the answer and the rest of the sentence, or facts counted under the wrong relation."""
    tok = cpt_compare.ev.CharTokenizer()
    facts = cpt_compare.make_world(4, 0)
    relations = [f.relation for f in facts]
    ids, rows = cpt_compare.choice_batch(facts, cpt_compare.TEST, tok)
    assert len(rows) == 4 * (4 + 8 + 8 + 3) and sum(right for *_, right in rows) == len(facts)
    truth = {f.sentence(cpt_compare.TEST) for f in facts}
    knows = cpt_compare.choice_accuracy(_SentenceOracle(lambda text: text.rstrip("\n") in truth), ids, rows,
                                        relations, chunk=7)
    assert knows == {"choice": 1.0, **{f"choice_{rel}": 1.0 for rel in cpt_compare.RELATIONS}}
    five = cpt_compare.choice_accuracy(_SentenceOracle(lambda text: " 5 mg" in text), ids, rows, relations)
    doses = [f.answer for f in facts if f.relation == "dose"]
    assert five["choice_dose"] == doses.count("5") / 4


def test_cpt_replay_share_takes_whole_rows_from_the_old_domain():
    """Catches: replay that draws from the new domain only (or the other way round)."""
    new, old = torch.zeros(500, dtype=torch.long), torch.ones(500, dtype=torch.long)
    x, _ = cpt_compare.make_batch_fn(new, old, batch=10, seq=16, replay=0.2, seed=0)(0)
    assert x.shape == (10, 16) and x[:8].eq(0).all() and x[8:].eq(1).all()
    x, _ = cpt_compare.make_batch_fn(new, old, batch=10, seq=16, replay=0.0, seed=0)(0)
    assert x.eq(0).all()


def test_cpt_sweep_grows_the_grid_past_a_best_rate_at_its_end():
    """Catches: a sweep that settles for the end of its grid (the optimum may lie beyond), one that grows on
    the wrong side, or one that grows past --sweep-extend."""
    assert [cpt_compare.next_lr(v, up=True) for v in (1e-3, 3e-3, 3e-2)] == [3e-3, 1e-2, 1e-1]
    assert [cpt_compare.next_lr(v, up=False) for v in (1e-3, 3e-3)] == [3e-4, 1e-3]

    def sweep(optimum, grid, extend):
        def run(jobs):  # development accuracy peaks at ``optimum`` (log scale)
            return [{"eval": [{"dev_char_acc": -abs(math.log(lr / optimum)), "dev_loss": 1.0}]}
                    for _, lr, _, _ in jobs]
        runs = cpt_compare.sweep_learning_rates({"m": None}, {"m": grid}, 0, run, extend)
        return sorted(lr for _, lr, _, _ in runs)

    assert sweep(3e-3, [1e-3, 3e-3], 2) == [1e-3, 3e-3, 1e-2]
    assert sweep(1e-1, [1e-3, 3e-3], 2) == [1e-3, 3e-3, 1e-2, 3e-2]
    assert sweep(1e-5, [1e-3, 3e-3], 1) == [3e-4, 1e-3, 3e-3]
    assert sweep(1e-3, [1e-3], 2) == [1e-3]


def test_cpt_compare_reproduces_across_worker_counts_and_records_the_sweep(tmp_path):
    """Catches: figures that depend on the number of worker processes or on run order, a PEFT method with another
    budget, a chosen learning rate that is not the sweep's best on the development phrasing, restarts at the wrong
    steps, forgetting measured against something other than the base."""
    out = tmp_path / "c.json"
    cpt_compare.main(CPT_TOY + ["--workers", "1", "--out", str(out)])
    first = _without_run(out)
    cpt_compare.main(CPT_TOY + ["--workers", "2", "--out", str(out)])
    assert _without_run(out) == first, "same seeds, same arguments: the JSON must not depend on --workers"
    assert list(first["results"]) == ["replay 0", "replay 0.2"]
    results = first["results"]["replay 0"]
    assert list(results) == cpt_compare.METHOD_ORDER
    budgets = [results[m]["adapter_params"] for m in ("lora", "mora1", "mora6", "relora", "remora")]
    assert max(budgets) / min(budgets) < 1.15 and results["full"]["trainable_params"] > 2 * max(budgets)
    assert results["remora"]["restarts"] == [2] and results["mora1"]["restarts"] == []
    for name, grid in first["sweep"].items():
        tried = sorted(float(lr) for lr in grid)
        best = max(grid.values(), key=lambda v: (v["dev_char_acc"], -v["dev_loss"]))
        assert grid[f"{first['lr'][name]:g}"] == best
        assert results[name]["lr"] == first["lr"][name]
        if name == "full":
            assert tried == [1e-4], "a one-point grid has no end to grow past"
        else:  # both points of a two-point grid are ends: it grows once (--sweep-extend 1), on the best's side
            assert tried in ([3e-4, 1e-3, 3e-3], [1e-3, 3e-3, 1e-2])
    for name, res in results.items():
        assert res["steps"] == [0, 2, 4] and len(res["per_seed_final"]) == 2
        assert 0 <= res["final"]["test_choice"] <= 1 and "seen_choice_dose" in res["range"], "choice probe at the end"
        assert res["curve"]["old_loss"][0] == pytest.approx(first["base"]["old_loss"], rel=1e-5)
        mean_final = sum(f["old_loss"] for f in res["per_seed_final"]) / 2
        assert res["forgetting"] == pytest.approx(mean_final - first["base"]["old_loss"], abs=1e-5)
        assert first["sweep"][name][f"{res['lr']:g}"]["test_char_acc"] == res["per_seed_final"][0]["test_char_acc"]
    assert (tmp_path / "c_probe.png").stat().st_size > 1000 and (tmp_path / "c_tradeoff.png").exists()
