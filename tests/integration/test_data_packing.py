"""Packing: documents joined with EOS, full blocks only, nothing lost or reordered inside a map batch."""

import datasets

from mora_dist.data import load_tokenizer, pack_token_lists, tokenize_and_pack

TOKENIZER = "data/shakespeare/tokenizer.json"


def test_pack_joins_documents_with_eos_and_drops_the_short_tail():
    out = pack_token_lists([[1, 2, 3], [], [4, 5]], 3, eos_id=0)["input_ids"]
    assert out == [[1, 2, 3], [0, 4, 5]]  # the trailing EOS (a partial block) is dropped


def test_tokenize_and_pack_round_trips_text(tmp_path):
    tok = load_tokenizer(TOKENIZER)
    docs = ["To be, or not to be: that is the question.", "Now is the winter of our discontent."] * 20
    packed = tokenize_and_pack(datasets.Dataset.from_dict({"text": docs}), tok, 16)
    assert packed.column_names == ["input_ids"] and all(len(r) == 16 for r in packed["input_ids"])
    flat = [t for r in packed["input_ids"] for t in r]
    assert tok.decode(flat).startswith(docs[0] + "<|endoftext|>" + docs[1])


def test_streaming_packing_matches_map_style():
    tok = load_tokenizer(TOKENIZER)
    ds = datasets.Dataset.from_dict({"text": [f"line {i} of the play" for i in range(300)]})
    a = list(tokenize_and_pack(ds, tok, 8)["input_ids"])
    b = [r["input_ids"] for r in tokenize_and_pack(ds.to_iterable_dataset(num_shards=1), tok, 8)]
    assert a == b


def test_tokenised_corpus_is_cached_across_loads(tmp_path):
    """Catches a tokenise function whose fingerprint changes per process (datasets would re-tokenise the whole
    corpus on every start and on every rank)."""
    from mora_dist.data import load_text_source

    tok = load_tokenizer(TOKENIZER)
    first = tokenize_and_pack(load_text_source(path="data/shakespeare/poems.txt.gz", cache_dir=str(tmp_path)), tok, 64)
    again = tokenize_and_pack(load_text_source(path="data/shakespeare/poems.txt.gz", cache_dir=str(tmp_path)), tok, 64)
    assert first.cache_files and first.cache_files == again.cache_files


def test_sources_are_tokenised_once_in_parallel_and_reloaded_from_the_cache(tmp_path, caplog):
    """Catches a second run tokenising again (a cache key that differs between processes): a second
    ``build_data`` in a fresh process over the same corpus writes no cache file and rewrites none, and reads the
    same blocks; each source's token count is logged."""
    import logging
    import os
    import subprocess
    import sys

    from mora_dist.run.build import build_data
    from mora_dist.run.config import load_run_config

    cache = tmp_path / "cache"
    sets = [f"data.cache_dir={cache}", "data.num_proc=2", f"training.output_dir={tmp_path / 'run'}"]
    cfg = load_run_config("configs/remora_tiny.json", sets)
    tok = load_tokenizer(TOKENIZER)

    def packed_files():
        return {p: p.stat().st_mtime_ns for p in cache.rglob("cache-*.arrow")}

    with caplog.at_level(logging.INFO, logger="mora_dist.run.build"):
        first = build_data(cfg, tok, dp_rank=0, dp_size=1, start_sample=0)
    after_first = packed_files()
    assert len(after_first) >= 4  # two sources x two worker shards
    second_run = (
        "from mora_dist.data import load_tokenizer\n"
        "from mora_dist.run.build import build_data\n"
        "from mora_dist.run.config import load_run_config\n"
        f"cfg = load_run_config('configs/remora_tiny.json', {sets!r})\n"
        f"data = build_data(cfg, load_tokenizer({TOKENIZER!r}), dp_rank=0, dp_size=1, start_sample=0)\n"
        "print(next(data.train)[0].sum().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", second_run], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert packed_files() == after_first
    assert int(out.stdout.split()[-1]) == int(next(first.train)[0].sum())
    counts = [r.getMessage() for r in caplog.records if "train blocks" in r.getMessage()]
    assert len(counts) == 2 and all(f"({n} tokens)" in m for m, n in zip(counts, [
        len(first.train.readers[i].ds) * 128 for i in range(2)]))
