"""Hub sources (``hf://`` datasets and tokenizer) and their local copies: the shipped 250M/1B/CPT configs read
C4 and the T5 tokenizer from the hub, fail at once with one clear message when it is out of reach, and read a
local copy in the hub's layout through the very same ``datasets.load_dataset`` path, one ``--set`` away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mora_dist.data import load_text_source, load_tokenizer
from mora_dist.data.hub import HubUnavailableError, check_hub, hub_refs
from mora_dist.run.config import load_run_config, validate_run_config
from tests.helpers.data import doc_of, hub_layout, word_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "launch/pretrain.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, timeout=120)


def _assert_names_everything(message: str, source_key: str = "data.sources.0.path") -> None:
    for part in ("allenai/c4", "google-t5/t5-base", f"--set {source_key}=", "--set data.tokenizer=",
                 "configs/remora_tiny.json"):
        assert part in message, (part, message)


def test_the_main_command_offline_fails_before_any_process_group_naming_hub_repos_overrides_and_tiny(tmp_path):
    """Catches a hang, a traceback per rank, or a half-created run when HF_HUB_OFFLINE=1: the real command
    exits 2 with one message and writes nothing."""
    out = tmp_path / "run"
    proc = _launch("--config", "configs/remora_250m.json", "--set", f"training.output_dir={out}",
                   HF_HUB_OFFLINE="1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("error:") == 1 and "HF_HUB_OFFLINE=1" in proc.stderr
    _assert_names_everything(proc.stderr)
    assert not out.exists()


def test_an_unreachable_hub_is_detected_at_once(tmp_path):
    """Not offline by setting, but no hub answering (a closed local port as the endpoint): same message."""
    proc = _launch("--config", "configs/remora_1b.json", "--check", HF_HUB_OFFLINE="0",
                   HF_ENDPOINT="http://127.0.0.1:9")
    assert proc.returncode == 2 and "not reachable" in proc.stderr, proc.stderr[-3000:]
    _assert_names_everything(proc.stderr)


@pytest.mark.parametrize("stem", ["mora_cpt_biomed", "mora_cpt_finance"])
def test_cpt_replay_source_is_the_hub_c4_with_its_own_override(stem):
    raw = json.loads((ROOT / "configs" / f"{stem}.json").read_text())
    cfg = validate_run_config(raw, check_paths=False)
    assert [(r.kind, r.repo, r.key) for r in hub_refs(cfg)] == [("dataset", "allenai/c4", "data.sources.1.path")]
    with pytest.raises(HubUnavailableError, match=r"--set data\.sources\.1\.path=.*configs/remora_tiny\.json"):
        check_hub(cfg)  # this test process runs with HF_HUB_OFFLINE=1


def test_a_local_copy_is_one_set_away_and_reads_like_the_hub(tmp_path):
    """The shipped 250M config with ``--set data.sources.0.path=<copy>`` (and a local tokenizer) validates
    offline, and the copy is read as the hub would be: streaming, only the ``text`` field (C4 rows also carry
    ``url`` and ``timestamp``), eval blocks from the validation split, each of 2 ranks on its own files."""
    from mora_dist.run.build import build_data

    root = hub_layout(tmp_path / "c4", train_files=2, docs_per_file=40, val_docs=8, seq_len=5)
    tok = word_tokenizer(tmp_path / "tok" / "tokenizer.json")
    cfg = load_run_config(ROOT / "configs" / "remora_250m.json", [
        f"data.sources.0.path={root}", f"data.tokenizer={tok}", "data.seq_len=5", "data.sources.0.eval_blocks=4",
        "training.micro_batch_size=2", "training.global_batch_size=4", f"training.output_dir={tmp_path / 'run'}"])
    check_hub(cfg)  # nothing left on the hub: no error even offline
    assert cfg.data.streaming and cfg.data.sources[0].hub_config == "en"
    seen = []
    for rank in range(2):
        data = build_data(cfg, load_tokenizer(tok), dp_rank=rank, dp_size=2, start_sample=0)
        assert [doc_of(b) for b in data.eval_sets["c4"]] == [3000, 3001, 3002, 3003]
        docs = [doc_of(row) for _ in range(10) for row in next(data.train)[0].tolist()]
        assert len({d // 40 for d in docs}) == 1  # one train file per rank
        seen.append(set(docs))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40


def test_local_copies_without_the_readme_config_table(tmp_path):
    """``hf download --include 'en/*'`` leaves no README: the config folder and the split names in the file
    names still give the same rows, pointing at the repo root or at ``en/``."""
    root = hub_layout(tmp_path / "c4", train_files=2, docs_per_file=3, val_docs=2, seq_len=4, readme=False)
    for path in (str(root), str(root / "en")):
        train = load_text_source(path, hub_config="en", eval_split="validation", streaming=True)
        val = load_text_source(path, hub_config="en", split="validation", eval_split="validation", streaming=True)
        assert sorted(r["text"].split()[0] for r in train) == [f"d{i}" for i in range(6)]
        assert [r["text"].split()[0] for r in val] == ["d3000", "d3001"]
        assert set(next(iter(train))) == {"text"}
    urls = load_text_source(str(root), hub_config="en", text_field="url", eval_split="validation", streaming=True)
    assert sorted(r["text"] for r in urls) == sorted(f"u{i}" for i in range(6))  # text_field picks the column


def test_source_kinds_are_validated_before_anything_runs(tmp_path):
    base = json.loads((ROOT / "configs" / "remora_tiny.json").read_text())

    def problems(**source):
        raw = json.loads(json.dumps(base))
        raw["data"]["sources"] = [{"name": "s", **source}]
        with pytest.raises(Exception) as info:
            validate_run_config(raw)
        return str(info.value)

    assert "format='jsonl': a hub dataset" in problems(path="hf://allenai/c4", hub_config="en", format="jsonl")
    assert f"{tmp_path / 'nope'}" in problems(path=str(tmp_path / "nope"), hub_config="en")
    assert "eval_split='train' equals split" in problems(path="hf://allenai/c4", eval_split="train")
    assert "corpus_text_document.bin does not exist" in problems(path=str(tmp_path / "corpus_text_document"),
                                                                  format="megatron")
