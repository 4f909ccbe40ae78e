"""Data validation before any process group: each kind of broken source is reported by ``launch/pretrain.py``
with exit code 2, naming the source, the file and the line, and without creating the output folder."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from mora_dist.data.validate import DataSourceError, check_sources, locate_problem
from mora_dist.run.config import load_run_config
from tests.helpers.launch import TINY, env

ROOT = Path(__file__).resolve().parents[2]


def _pretrain_main():
    spec = importlib.util.spec_from_file_location("mora_pretrain_cli", ROOT / "launch/pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


_GOOD = [json.dumps({"text": f"document number {i}", "id": i}) for i in range(5)]


def _write_parquet_without_text(path: Path) -> None:
    datasets.Dataset.from_dict({"body": ["one", "two"]}).to_parquet(str(path))


# (id, file name, writer(path), expected fragments of the message)
CASES = [
    ("empty_jsonl", "empty.jsonl", lambda p: p.write_bytes(b""), ["empty.jsonl", "is empty"]),
    ("blank_jsonl", "blank.jsonl", lambda p: p.write_bytes(b"\n\n  \n"), ["blank.jsonl", "no JSON records"]),
    ("malformed_line", "bad.jsonl", lambda p: p.write_bytes(_jsonl([*_GOOD[:2], '{"text": "cut', *_GOOD[2:]])),
     ["bad.jsonl, line 3", "not valid JSON"]),
    ("missing_field", "nofield.jsonl",
     lambda p: p.write_bytes(_jsonl([*_GOOD[:3], json.dumps({"body": "x"}), *_GOOD[3:]])),
     ["nofield.jsonl, line 4", "text_field='text'", "['body']"]),
    ("not_utf8_txt", "latin1.txt", lambda p: p.write_bytes("fine\nstill fine\ncaf\xe9 au lait\n".encode("latin-1")),
     ["latin1.txt, line 3", "not UTF-8", "0xe9"]),
    ("not_utf8_gz", "latin1.txt.gz", lambda p: p.write_bytes(gzip.compress("ok\n\xff\n".encode("latin-1"))),
     ["latin1.txt.gz, line 2", "not UTF-8"]),
    ("parquet_no_column", "nocol.parquet", _write_parquet_without_text,
     ["nocol.parquet", "no column text_field='text'", "['body']"]),
]


@pytest.mark.parametrize("name,writer,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_source_stops_the_launcher_before_anything_with_file_and_line(tmp_path, capsys, name, writer,
                                                                               expected):
    """Catches: a broken corpus found only after the process group started (a bare StopIteration, a pyarrow
    row number, a UnicodeDecodeError without the file), and an output folder left behind."""
    bad = tmp_path / name
    writer(bad)
    out = tmp_path / "run"
    rc = _pretrain_main()(["--config", TINY, "--set", f"data.sources.1.path={bad}",
                           "--set", f"training.output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "data source 'poems'" in err and all(e in err for e in expected), err
    assert not out.exists()


def test_sample_limit_and_full_scan(tmp_path):
    """The early check reads a sample; a bad line past it is found by the full scan (as after a failed read)."""
    path = tmp_path / "deep.jsonl"
    path.write_bytes(_jsonl([*_GOOD * 10, "not json", *_GOOD]))
    cfg = load_run_config(TINY, [f"data.sources.0.path={path}"])
    check_sources(cfg.data.sources, sample_lines=50)
    with pytest.raises(DataSourceError, match="deep.jsonl, line 51"):
        check_sources(cfg.data.sources, sample_lines=51)
    problem = locate_problem(cfg.data.sources[0])
    assert (problem.source, Path(problem.file).name, problem.line) == ("plays", "deep.jsonl", 51)
    assert locate_problem(cfg.data.sources[1]) is None


def test_megatron_prefix_files_are_checked_like_any_other(tmp_path):
    """A Megatron indexed source whose .idx is empty is refused up front, naming that file."""
    (tmp_path / "corpus_text_document.bin").write_bytes(b"\0" * 8)
    (tmp_path / "corpus_text_document.idx").write_bytes(b"")
    cfg = load_run_config(TINY, [f"data.sources.0.path={tmp_path / 'corpus_text_document'}",
                                 "data.sources.0.format=megatron"])
    with pytest.raises(DataSourceError, match=r"corpus_text_document\.idx: is empty"):
        check_sources(cfg.data.sources)


def test_launcher_cli_exits_2_on_bad_data(tmp_path):
    """The real command line: exit status 2 and the message on stderr, no output folder."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_jsonl([_GOOD[0], "{"]))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--config", TINY, "--set",
                           f"data.sources.0.path={bad}", "--set", f"training.output_dir={out}"],
                          capture_output=True, text=True, env=env(), timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "bad.jsonl, line 2" in proc.stderr.strip().splitlines()[-1]
    assert not out.exists()
