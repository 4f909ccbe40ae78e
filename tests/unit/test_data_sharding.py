"""Data-parallel sharding: after n steps exactly the first n * global_batch samples are consumed, once each."""

import json

import datasets
import pytest
import torch

from mora_dist.data import MapReader, Mixture, ShardedBatches, eval_shard


def _readers():
    # Block j of source s is [s, j, j, ...]: the batch says which sample it holds.
    return [MapReader(datasets.Dataset.from_dict({"input_ids": [[s, j, j] for j in range(50)]}), seed=s,
                      shuffle=False) for s in range(2)]


def _take(dp_rank, dp_size, micro, n, start=0):
    it = ShardedBatches(Mixture([0.5, 0.5], seed=7), _readers(), micro_batch_size=micro, dp_rank=dp_rank,
                        dp_size=dp_size, start_sample=start)
    return [next(it) for _ in range(n)]


def test_ranks_split_the_global_stream_without_overlap_or_gap():
    """Catches ranks reading the same samples (or skipping some) under data parallelism."""
    mix = Mixture([0.5, 0.5], seed=7)
    src, idx = mix.assign(0, 24)
    expected = [(int(s), int(i)) for s, i in zip(src, idx)]
    got = {}
    for rank in range(2):
        for k, (batch, sources) in enumerate(_take(rank, 2, 3, 4)):
            for e, row in enumerate(batch.tolist()):
                got[(k * 2 + rank) * 3 + e] = (row[0], row[1])
                assert sources[e] == row[0]
    assert [got[i] for i in range(24)] == expected


def test_resume_continues_at_the_exact_next_sample():
    """Catches a resumed run repeating or skipping samples: batches after a restart at sample 12 equal the
    batches an uninterrupted run reads from there."""
    full = _take(1, 2, 3, 5)
    resumed = _take(1, 2, 3, 3, start=12)
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a[0], b[0])


def test_misaligned_resume_point_is_rejected():
    with pytest.raises(ValueError, match="multiple of dp_size x micro_batch_size"):
        _take(0, 2, 3, 1, start=5)


def test_eval_shard_splits_blocks_over_ranks_and_pads_to_equal_batch_counts():
    """Catches ranks running different numbers of eval forwards (a deadlock under ZeRO-3) and padding that
    would be counted in the loss."""
    blocks = [[i] * 4 for i in range(7)]
    r0 = eval_shard(blocks, dp_rank=0, dp_size=2, micro_batch_size=3)
    r1 = eval_shard(blocks, dp_rank=1, dp_size=2, micro_batch_size=3)
    seen = sorted(int(x) for b, real in r0 + r1 if real for x in b[:, 0])
    assert seen == list(range(7)) and [b.shape[0] for b, _ in r0] == [3, 1]
    assert [real for _, real in r1] == [True, False] and r1[1][0].tolist() == [[0] * 4]
    for size in (3, 4, 5):  # fewer blocks than ranks too
        shares = [eval_shard(blocks[:2], dp_rank=r, dp_size=size, micro_batch_size=1) for r in range(size)]
        assert {len(s) for s in shares} == {1} and sum(real for s in shares for _, real in s) == 2


# --- streaming sources split over data-parallel ranks -------------------------------------------

def _stream_cfg(tmp_path, **source):
    from mora_dist.run.config import validate_run_config
    from tests.helpers.data import run_config, word_tokenizer, write_jsonl

    write_jsonl(tmp_path / "stream.jsonl", range(400), 5)
    tok = word_tokenizer(tmp_path / "tok" / "tokenizer.json")
    src = {"name": "s", "path": str(tmp_path / "stream.jsonl"), "eval_blocks": 4, **source}
    return validate_run_config(run_config(tmp_path, [src], tok, streaming=True, shuffle_buffer=16))


def _docs(cfg, *, dp_rank, dp_size, steps, start_step=0, stream_states=None):
    """Documents rank ``dp_rank`` of ``dp_size`` consumes in ``steps`` optimizer steps from ``start_step``."""
    from mora_dist.data import load_tokenizer
    from mora_dist.run.build import build_data
    from tests.helpers.data import doc_of

    t = cfg.training
    accum = t.global_batch_size // (t.micro_batch_size * dp_size)
    data = build_data(cfg, load_tokenizer(cfg.data.tokenizer), dp_rank=dp_rank, dp_size=dp_size,
                      start_sample=start_step * t.global_batch_size, stream_states=stream_states)
    return [doc_of(row) for _ in range(steps * accum) for row in next(data.train)[0].tolist()], data


def test_four_ranks_read_disjoint_parts_whose_union_is_the_stream_prefix_also_after_a_resume(tmp_path):
    """Catches every rank reading the whole stream (duplicates), a rank skipping samples, and a resume that
    restarts a rank's part or repeats samples: over 4 ranks, 3 steps then a fresh start at step 3 (all state
    rebuilt from the global resume point, as after a kill) for 4 more, the samples consumed are exactly the
    first 7 x 8 samples of the (shuffled) stream one rank would read, each once."""
    cfg = _stream_cfg(tmp_path)
    stream, data = _docs(cfg, dp_rank=0, dp_size=1, steps=7)
    from tests.helpers.data import doc_of

    assert [doc_of(b) for b in data.eval_sets["s"]] == [0, 1, 2, 3]  # the stream's first blocks, held out
    assert not set(stream) & {0, 1, 2, 3}  # and never trained on
    assert sorted(stream[:8]) != stream[:8]  # the stream is shuffled
    consumed = []
    for rank in range(4):
        before, _ = _docs(cfg, dp_rank=rank, dp_size=4, steps=3)
        after, _ = _docs(cfg, dp_rank=rank, dp_size=4, steps=4, start_step=3)
        consumed += before + after
    assert len(consumed) == 7 * 8 and sorted(consumed) == sorted(stream)


def test_each_rank_resumes_a_stream_from_its_saved_position_as_an_uninterrupted_run_reads_on(tmp_path):
    """Catches a saved reader position that is not exact (the resumed rank repeats or skips blocks), one taken
    from another rank, and one that is not JSON (the checkpoint's rank_state file): over 2 ranks, 3 steps, the
    readers' states through JSON, then 4 more steps from them give each rank what its uninterrupted 7 steps gave."""
    cfg = _stream_cfg(tmp_path)
    for rank in range(2):
        whole, _ = _docs(cfg, dp_rank=rank, dp_size=2, steps=7)
        before, data = _docs(cfg, dp_rank=rank, dp_size=2, steps=3)
        states = json.loads(json.dumps(data.train.reader_states()))
        assert states[0]["cursor"] == len(before)
        after, _ = _docs(cfg, dp_rank=rank, dp_size=2, steps=4, start_step=3, stream_states=states)
        assert before + after == whole, rank


def test_a_source_with_enough_files_gives_each_rank_its_own_files_and_resumes_per_rank(tmp_path):
    """File sharding (a hub-layout source with 4 train files, 4 ranks): a rank reads only its files, never
    another rank's, and its samples after a resume are the ones an uninterrupted run reads next."""
    from mora_dist.run.config import validate_run_config
    from tests.helpers.data import hub_layout, run_config, word_tokenizer

    root = hub_layout(tmp_path / "c4", train_files=4, docs_per_file=50, val_docs=10, seq_len=5)
    tok = word_tokenizer(tmp_path / "tok" / "tokenizer.json")
    src = {"name": "c4", "path": str(root), "hub_config": "en", "eval_split": "validation", "eval_blocks": 6}
    cfg = validate_run_config(run_config(tmp_path, [src], tok, streaming=True, shuffle_buffer=8))
    files = []
    for rank in range(4):
        full, data = _docs(cfg, dp_rank=rank, dp_size=4, steps=5)
        resumed, _ = _docs(cfg, dp_rank=rank, dp_size=4, steps=3, start_step=2)
        assert resumed == full[2 * 2:]
        assert {d // 50 for d in full} == {files_of := full[0] // 50} and len(set(full)) == len(full)
        files.append(files_of)
        assert [d[0] - 2 for d in data.eval_sets["c4"]] == list(range(3000, 3006))  # validation split, in order
    assert sorted(files) == [0, 1, 2, 3]
