"""Small corpora whose token blocks say where they came from, for the data tests.

A word-level tokenizer over ``d0 .. d{N-1}`` and ``x``: the document ``"d{i} x x ..."`` of ``seq_len - 1`` words
packs (with its EOS) into exactly one block whose first token names the document, so a test can tell which
documents a rank consumed. ``hub_layout`` writes a folder the way the Hugging Face hub stores C4
(``en/c4-train.0000k-of-0000n.json.gz`` + validation files + the README's config table).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

NUM_WORDS = 4096
EOS = "<|endoftext|>"


def word_tokenizer(path: Path) -> str:
    """Write a word-level ``tokenizer.json``: ``EOS`` = 0, ``x`` = 1, ``d{i}`` = i + 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOS: 0, "x": 1, **{f"d{i}": i + 2 for i in range(NUM_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="x"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return str(path)


def doc(i: int, seq_len: int) -> str:
    return " ".join([f"d{i}"] + ["x"] * (seq_len - 2))


def doc_of(block: list[int]) -> int:
    """The document a block packs (see ``doc``)."""
    return block[0] - 2


def write_jsonl(path: Path, ids: range, seq_len: int, *, compress: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": doc(i, seq_len), "url": f"u{i}", "timestamp": "t"}) + "\n" for i in ids)
    if compress:
        with gzip.open(path, "wt") as fh:
            fh.write(lines)
    else:
        path.write_text(lines)


HUB_README = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/c4-train.*.json.gz
  - split: validation
    path: en/c4-validation.*.json.gz
---
"""


def hub_layout(root: Path, *, train_files: int, docs_per_file: int, val_docs: int, seq_len: int,
               readme: bool = True) -> Path:
    """C4's hub layout: train docs ``0 ..``, validation docs from ``3000`` on."""
    for k in range(train_files):
        write_jsonl(root / "en" / f"c4-train.{k:05d}-of-{train_files:05d}.json.gz",
                    range(k * docs_per_file, (k + 1) * docs_per_file), seq_len, compress=True)
    write_jsonl(root / "en" / "c4-validation.00000-of-00001.json.gz", range(3000, 3000 + val_docs), seq_len,
                compress=True)
    if readme:
        (root / "README.md").write_text(HUB_README)
    return root


def run_config(tmp_path: Path, sources: list[dict], tokenizer: str, **data) -> dict:
    """A minimal valid raw run config around ``sources``."""
    return {
        "optimizer": {"lr": 1e-3},
        "data": {"sources": sources, "tokenizer": tokenizer, "seq_len": data.pop("seq_len", 5), **data},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 10, "micro_batch_size": 2,
                     "global_batch_size": 8, "seed": 5},
    }
