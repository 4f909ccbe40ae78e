"""Megatron indexed datasets as sources: built here with megatron-core's own writer from the shipped corpus,
read in place, they give exactly the token blocks of the same text read from .txt, and mix like any source."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mora_dist.data import load_text_source, load_tokenizer, tokenize_and_pack
from mora_dist.data.indexed import IndexedBlocks

TOKENIZER = "data/shakespeare/tokenizer.json"
PLAYS = "data/shakespeare/plays.txt.gz"


def _write_indexed(prefix: str, texts, tok) -> None:
    """What Megatron-LM's ``preprocess_data.py --append-eod`` writes: one document per text, EOS appended."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = ids + [tok.eos_token_id] if ids else []
        builder.add_document(torch.tensor(ids, dtype=torch.long), [len(ids)])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def plays_indexed(tmp_path_factory):
    tok = load_tokenizer(TOKENIZER)
    prefix = str(tmp_path_factory.mktemp("megatron") / "plays_text_document")
    _write_indexed(prefix, load_text_source(PLAYS)["text"], tok)
    return prefix, tok


def test_indexed_blocks_equal_the_text_sources_blocks(plays_indexed):
    """Catches an off-by-one at a block, sequence or 1,000-document group boundary (the .txt path drops each
    group's tail), a lost EOS, or reading the wrong dtype: every block of the indexed copy equals the block the
    .txt path packs, over more than one group."""
    prefix, tok = plays_indexed
    for seq_len in (37,):  # the tiny config's 128 is compared through build_data below
        text_blocks = tokenize_and_pack(load_text_source(PLAYS), tok, seq_len)["input_ids"]
        blocks = IndexedBlocks(prefix, seq_len)
        assert len(blocks) == len(text_blocks) > 100
        assert blocks[list(range(len(blocks)))]["input_ids"] == list(text_blocks)
        view = blocks.select(range(5, len(blocks)))
        assert view[[0, 3]]["input_ids"] == [text_blocks[5], text_blocks[8]]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert len(IndexedDataset(prefix).document_indices) - 1 > 1000  # more than one packing group


def test_a_megatron_source_mixes_by_weight_with_per_source_eval(plays_indexed, tmp_path):
    """The tiny config with its plays source swapped for the indexed copy: same eval blocks as from .txt, and the
    training stream takes plays and poems blocks in the configured proportion."""
    from mora_dist.run.build import build_data
    from mora_dist.run.config import load_run_config

    prefix, tok = plays_indexed
    base = load_run_config("configs/remora_tiny.json", [f"training.output_dir={tmp_path}"])
    cfg = load_run_config("configs/remora_tiny.json", [
        f"training.output_dir={tmp_path}", f"data.sources.0.path={prefix}", 'data.sources.0.format="megatron"'])
    data = build_data(cfg, tok, dp_rank=0, dp_size=1, start_sample=0)
    ref = build_data(base, tok, dp_rank=0, dp_size=1, start_sample=0)
    assert data.eval_sets["poems"] == ref.eval_sets["poems"] and data.eval_sets["plays"] == ref.eval_sets["plays"]
    for _ in range(3):
        (a, src_a), (b, src_b) = next(data.train), next(ref.train)
        assert torch.equal(a, b) and torch.equal(src_a, src_b)  # same blocks, same order as the .txt source
    sources = torch.cat([next(data.train)[1] for _ in range(60)])
    assert 0.7 < float((sources == 0).float().mean()) < 0.9  # plays weight 0.8


def test_megatron_source_config_errors(tmp_path):
    from mora_dist.run.config import RunConfigError, load_run_config

    raw = json.loads(open("configs/remora_tiny.json").read())
    with pytest.raises(RunConfigError, match="corpus_text_document.bin does not exist"):
        load_run_config("configs/remora_tiny.json", [f"data.sources.1.path={tmp_path}/corpus_text_document",
                                                     'data.sources.1.format="megatron"'])
    assert raw["data"]["sources"][1]["name"] == "poems"
    from mora_dist.data import list_files

    assert list_files("/c/web_text_document", "megatron") == ("megatron", ["/c/web_text_document.bin",
                                                                         "/c/web_text_document.idx"])
