"""A bad record met after training started (past what the early check samples) stops every rank promptly; the
rank that met it names the file and line, last; nothing is left behind."""

from __future__ import annotations

import gzip
import json
import re
import subprocess

from mora_dist.data.validate import SAMPLE_LINES
from tests.helpers.launch import RUN_TIMEOUT_S, TINY, env, launch_cmd


def _is_launcher_line(line: str) -> bool:
    return "[launch.py:" in line or "[runner.py:" in line


def test_bad_record_deep_in_a_streamed_file_stops_all_ranks_naming_file_and_line(tmp_path):
    """Catches: a rank that fails while the others wait in a collective (a hang, or their 'Connection closed by
    peer' as the last words), a message without the file and line, and an output folder left behind."""
    verses = [line.strip() for line in gzip.open("data/shakespeare/poems.txt.gz", "rt") if line.strip()]
    bad_line = SAMPLE_LINES + 1  # past the early check's sample; met by the streaming reader at about step 8
    records = [{"text": v} for v in verses[: bad_line - 1]] + [{"text": None}] + [{"text": v} for v in verses[:200]]
    corpus = tmp_path / "verses.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "run"
    sets = [f"data.sources.1.path={corpus}", "data.sources.1.weight=1.0", "data.streaming=true",
            "data.shuffle_buffer=8", "training.eval_interval=0", "training.save_interval=0", "training.max_steps=40",
            f"training.output_dir={out}"]
    proc = subprocess.run(launch_cmd(2, TINY, sets), capture_output=True, text=True, env=env(),
                          timeout=RUN_TIMEOUT_S)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-4000:]
    assert "step 1/40" in log, log[-4000:]  # training had started
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip() and not _is_launcher_line(line)]
    # stdout and stderr are captured apart: the message must be the last word of the ranks on stderr
    last_err = [line for line in proc.stderr.splitlines() if line.strip() and not _is_launcher_line(line)][-1]
    # streaming sources are split over the ranks: whichever rank read the bad record reports it
    assert re.match(r"error \(rank [01]\): data source 'poems'", last_err), last_err
    assert f"{corpus}, line {bad_line}" in last_err and "'text' is NoneType" in last_err, last_err
    assert sum("error (rank" in line for line in ours) == 1
    assert "Connection closed" not in log and "Traceback" not in log, log[-4000:]
    assert not out.exists()
