"""Docs a user can follow from the clone alone: every ``Spec: §N`` cited in the code is a section of
``docs/spec.md``, and the README's config reference names every field the shipped configs use."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_spec_citation_points_to_a_section_of_docs_spec():
    """Catches a citation to a section that does not exist, or a pointer to a file a clone does not have."""
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs/spec.md").read_text(), re.MULTILINE))
    assert {"1", "2", "2.1", "2.5", "3", "3.1", "4", "5", "6"} <= headings, headings
    files = [*ROOT.glob("mora_dist/**/*.py"), *ROOT.glob("launch/*.py"), *ROOT.glob("examples/*.py"),
             *ROOT.glob("benchmarks/*.py"), ROOT / "README.md"]
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
    """Catches a field a shipped config relies on (e.g. ``format``, ``log_interval``) missing from the README."""
    readme = (ROOT / "README.md").read_text()
    reference = readme[readme.index("### Config reference"):]
    reference = reference[: reference.index("\n## ")]
    used = set()
    for path in ROOT.glob("configs/*.json"):
        for key in _keys(json.loads(path.read_text())):
            if not key.startswith("deepspeed."):  # DeepSpeed's own section, documented by DeepSpeed
                used.add(key.rsplit(".", 1)[-1])
    absent = sorted(k for k in used if f"`{k}`" not in reference)
    assert not absent, f"fields used by configs/ but not in the README's config reference: {absent}"
