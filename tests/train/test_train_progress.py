"""Asynchronous metrics (read one interval late, all-reduced, non-finite counted) and the progress
reporter (a bar on a terminal, log lines otherwise, one JSONL record per interval)."""

from __future__ import annotations

import io
import json
import logging
import math

import pytest
import torch

from dino_fast.train.metrics import AsyncMetrics, IntervalStats
from dino_fast.train.progress import ProgressReporter


def test_async_metrics_intervals():
    m = AsyncMetrics(torch.device("cpu"), images_per_step=8)
    m.start(0)
    assert m.collect() is None  # nothing snapshotted yet
    for value in (1.0, 2.0, 6.0):
        m.accumulate(torch.tensor(value))
    m.snapshot(2, flag=True)
    with pytest.raises(RuntimeError, match="collect"):
        m.snapshot(2)
    s = m.collect()
    assert (s.first_iteration, s.last_iteration, s.steps, s.images) == (0, 2, 3, 24)
    assert s.loss == pytest.approx(3.0) and s.nonfinite == 0 and s.flag
    assert s.seconds >= 0
    # The next interval starts after the snapshot, and a non-finite loss is counted, not hidden.
    m.accumulate(torch.tensor(float("inf")))
    m.accumulate(torch.tensor(1.0))
    m.snapshot(4)
    s = m.collect()
    assert (s.first_iteration, s.last_iteration, s.nonfinite, s.flag) == (3, 4, 1, False)
    assert not math.isfinite(s.loss)


def test_async_metrics_flush_returns_pending_and_current():
    m = AsyncMetrics(torch.device("cpu"), images_per_step=1)
    m.start(10)
    m.accumulate(torch.tensor(2.0))
    m.snapshot(10)
    m.accumulate(torch.tensor(4.0, dtype=torch.bfloat16))  # any dtype: accumulated in fp32
    m.accumulate(torch.tensor(8.0))
    flushed = m.flush(12)
    assert [(s.first_iteration, s.last_iteration, s.loss) for s in flushed] == [(10, 10, 2.0), (11, 12, 6.0)]
    assert m.flush(12) == []


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _stats(it: int, loss: float = 3.5) -> IntervalStats:
    return IntervalStats(it - 1, it, 2, loss, 0, False, seconds=0.5, images=64)


SCHEDULE = {"lr": 1e-4, "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.04}


def test_progress_bar_on_a_terminal(tmp_path):
    stream = _Tty()
    rep = ProgressReporter(
        total_iterations=10, start_iteration=0, steps_per_epoch=5, jsonl_path=tmp_path / "log.jsonl",
        enabled=True, stream=stream,
    )  # fmt: skip
    assert rep.use_bar
    rep.report(_stats(5), SCHEDULE, gpu_mem_gib=1.25)
    rep.close()
    line = stream.getvalue()
    assert line.startswith("\r") and "epoch 1" in line and "6/10" in line
    for piece in ("loss 3.5000", "128 im/s", "ETA", "mem 1.2GiB"):
        assert piece in line
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert record["iteration"] == 5 and record["epoch"] == 1 and record["images_per_s"] == 128.0
    assert record["gpu_mem_gib"] == 1.25 and record["lr"] == 1e-4 and record["teacher_temp"] == 0.04


def test_plain_log_lines_without_a_terminal(tmp_path, caplog):
    stream = io.StringIO()
    rep = ProgressReporter(
        total_iterations=4, start_iteration=0, steps_per_epoch=4, jsonl_path=None, enabled=True, stream=stream
    )
    assert not rep.use_bar
    with caplog.at_level(logging.INFO, logger="dino_fast.train.progress"):
        rep.report(_stats(1, loss=float("nan")), SCHEDULE, gpu_mem_gib=None)
    rep.close()
    assert stream.getvalue() == ""
    assert "it 2/4 loss nan" in caplog.text and "128.0 im/s" in caplog.text


def test_disabled_reporter_writes_nothing(tmp_path):
    rep = ProgressReporter(
        total_iterations=4,
        start_iteration=0,
        steps_per_epoch=4,
        jsonl_path=tmp_path / "x.jsonl",
        enabled=False,
    )
    rep.report(_stats(1), SCHEDULE, gpu_mem_gib=None)
    rep.close()
    assert not (tmp_path / "x.jsonl").exists()
