"""Metrics: TensorBoard scalars on rank 0 only, readable back; the progress line carries step, loss, tok/s, ETA."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mora_dist.training.metrics import MetricLogger, NullLogger, ProgressLine, make_metric_logger, perplexity


def test_rank0_writes_scalars_that_tensorboard_reads_back(tmp_path):
    logger = make_metric_logger(rank=0, enabled=True, log_dir=str(tmp_path))
    assert isinstance(logger, MetricLogger)
    logger.log_dict({"train/loss": 2.5, "remora/merges": 1.0}, 10)
    logger.log("eval/plays/loss", 3.0, 10)
    logger.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(10, 2.5)]
    assert ea.Scalars("eval/plays/loss")[0].value == 3.0
    assert isinstance(make_metric_logger(rank=1, enabled=True, log_dir=str(tmp_path / "r1")), NullLogger)
    assert not (tmp_path / "r1").exists()


def test_progress_line_and_perplexity():
    line = ProgressLine(total_steps=100, start_step=40, enabled=False).update(
        50, loss=3.25, lr=1e-3, tokens_per_second=12_345.0, extra="eval 3.1")
    assert line.startswith("step 50/100 | loss 3.2500 | lr 1.00e-03 | 12.3k tok/s | ETA ")
    assert line.endswith("eval 3.1")
    assert perplexity(0.0) == 1.0 and perplexity(1e6) < float("inf")
