"""Docs a user can follow from the clone alone: every ``Spec: §N`` cited in the code is a section of
``docs/spec.md``, the config reference (``docs/config.md``) names every field the shipped configs use, links and
shown commands point at files that exist, the README stays a front door, and no text describes how the project
was developed."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "spec.md")
PAGES = [ROOT / "README.md", *DOCS, ROOT / "benchmarks/README.md"]


def test_every_spec_citation_points_to_a_section_of_docs_spec():
    """Catches a citation to a section that does not exist, or a pointer to a file a clone does not have."""
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs/spec.md").read_text(), re.MULTILINE))
    assert {"1", "2", "2.1", "2.5", "3", "3.1", "4", "5", "6"} <= headings, headings
    files = [*ROOT.glob("mora_dist/**/*.py"), *ROOT.glob("launch/*.py"), *ROOT.glob("examples/*.py"),
             *ROOT.glob("benchmarks/*.py"), ROOT / "README.md", *DOCS]
    missing = {}
    for path in files:
        text = path.read_text()
        assert "MORA_SPEC" not in text and "../shared" not in text, path
        for cited in re.findall(r"§(\d+(?:\.\d+)?)", text):
            if cited not in headings:
                missing.setdefault(str(path.relative_to(ROOT)), []).append(cited)
    assert not missing, missing


def _keys(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _keys(value, f"{prefix}{key}.")
            yield prefix + key
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, dict):
                yield from _keys(item, prefix)


def test_config_reference_lists_every_field_the_shipped_configs_use():
    """Catches a field a shipped config relies on (e.g. ``format``, ``log_interval``) missing from the reference."""
    reference = (ROOT / "docs/config.md").read_text()
    used = set()
    for path in ROOT.glob("configs/*.json"):
        for key in _keys(json.loads(path.read_text())):
            if not key.startswith("deepspeed."):  # DeepSpeed's own section, documented by DeepSpeed
                used.add(key.rsplit(".", 1)[-1])
    absent = sorted(k for k in used if f"`{k}`" not in reference)
    assert not absent, f"fields used by configs/ but not in docs/config.md: {absent}"


def test_readme_is_a_front_door():
    """Catches reference material growing back into the README (it links to docs/ instead)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    main_command = re.compile(r"deepspeed .*launch/pretrain\.py --config configs/remora_250m\.json")
    assert any(main_command.search(line) for line in lines)


HISTORY = re.compile(r"this session|earlier session|\bissue \d|was lent|no GPU was|\bstop \d", re.IGNORECASE)


def test_no_text_describes_how_the_project_was_developed():
    """Docs and code describe the software and its measured results, not the work that produced them."""
    files = [*PAGES, *ROOT.glob("mora_dist/**/*.py"), *ROOT.glob("launch/*.py"), *ROOT.glob("benchmarks/*.py"),
             *ROOT.glob("examples/*.py"), *ROOT.glob("tests/**/*.py")]
    found = {str(p.relative_to(ROOT)): m.group(0) for p in files if p != Path(__file__).resolve()
             for m in [HISTORY.search(p.read_text())] if m}
    assert not found, found


def test_relative_links_resolve():
    """Catches a link to a page or figure that moved (docs/ links are relative to docs/)."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_shown_commands_name_files_that_exist():
    """Every script and config named in a shell block of the README or docs exists in the clone."""
    missing = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", page.read_text(), re.DOTALL):
            for path in re.findall(r"\b((?:launch|examples|benchmarks)/[\w/]+\.(?:py|sh)|configs/[\w]+\.json)", block):
                if not (ROOT / path).exists():
                    missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing
