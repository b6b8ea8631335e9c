"""Training progress without stalling the GPU: asynchronous metrics, a progress bar, JSONL logs.

The step never reads a device value. It adds the loss to a device-side running sum and
counts non-finite losses (``AsyncMetrics.accumulate``, two tiny kernels). At a log interval
the sums are packed into a small buffer, all-reduced across ranks without waiting
(``async_op``), copied to pinned host memory with ``non_blocking`` and marked with an
event; the host reads that copy one interval later, when the GPU finished it long ago.
The same buffer carries one flag from rank 0 (a time-based checkpoint is due), so every
rank learns of it at the same iteration without an extra collective. On CPU the values
are simply read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from dino_fast import distributed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntervalStats:
    """What one log interval measured, across all ranks."""

    first_iteration: int
    last_iteration: int  # inclusive
    steps: int
    loss: float  # mean over the interval's steps and all ranks (nan if any was non-finite)
    nonfinite: int  # steps x ranks whose loss was inf/nan
    flag: bool  # the rank-0 flag passed with the snapshot
    seconds: float  # device time of the interval (wall time on CPU)
    images: int  # images processed by all ranks

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class _Pending:
    host: torch.Tensor
    work: Any
    event: torch.cuda.Event | None
    first_iteration: int
    last_iteration: int
    steps: int
    images: int
    wall_end: float


class AsyncMetrics:
    """Device-side loss/non-finite accumulators, snapshotted and read one interval later."""

    def __init__(self, device: torch.device, images_per_step: int) -> None:
        self.device = device
        self.images_per_step = images_per_step  # over all ranks
        self.is_cuda = device.type == "cuda"
        self._loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self._nonfinite = torch.zeros((), dtype=torch.float32, device=device)
        # Two buffers: the one in flight is never overwritten before it has been read.
        self._bufs = [torch.zeros(3, dtype=torch.float32, device=device) for _ in range(2)]
        self._hosts = [torch.zeros(3, dtype=torch.float32, pin_memory=self.is_cuda) for _ in range(2)]
        self._which = 0
        self._steps = 0
        self._first_iteration = 0
        self._pending: _Pending | None = None
        self._last_event: torch.cuda.Event | None = None
        self._last_wall = time.perf_counter()

    def start(self, iteration: int) -> None:
        """Mark the beginning of timing (call right before the first step)."""
        self._first_iteration = iteration
        self._last_wall = time.perf_counter()
        if self.is_cuda:
            self._last_event = torch.cuda.Event(enable_timing=True)
            self._last_event.record()

    def accumulate(self, loss: torch.Tensor) -> None:
        """Add one step's loss; no host sync."""
        value = loss.detach().float()
        self._loss_sum.add_(value)
        self._nonfinite.add_((~torch.isfinite(value)).float())
        self._steps += 1

    @property
    def steps_since_snapshot(self) -> int:
        return self._steps

    def snapshot(self, last_iteration: int, flag: bool = False) -> None:
        """Start the asynchronous read of the sums since the previous snapshot (collect it first)."""
        if self._pending is not None:
            raise RuntimeError("AsyncMetrics.snapshot: collect() the previous snapshot first")
        buf, host = self._bufs[self._which], self._hosts[self._which]
        self._which ^= 1
        buf[0].copy_(self._loss_sum)
        buf[1].copy_(self._nonfinite)
        buf[2].fill_(1.0 if flag else 0.0)
        self._loss_sum.zero_()
        self._nonfinite.zero_()
        work = distributed.all_reduce_sum_async(buf)
        event = None
        if self.is_cuda:
            if work is not None:
                work.wait()  # NCCL: makes the current stream wait, not the host
                work = None
            host.copy_(buf, non_blocking=True)
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._pending = _Pending(
            host=host if self.is_cuda else buf,
            work=work,
            event=event,
            first_iteration=self._first_iteration,
            last_iteration=last_iteration,
            steps=self._steps,
            images=self._steps * self.images_per_step,
            wall_end=time.perf_counter(),
        )
        self._steps = 0
        self._first_iteration = last_iteration + 1

    def collect(self) -> IntervalStats | None:
        """The previous snapshot's values (waits for them if the device is still busy), or None."""
        pending = self._pending
        if pending is None:
            return None
        self._pending = None
        if pending.work is not None:
            pending.work.wait()
        if pending.event is not None:
            pending.event.synchronize()
            seconds = self._last_event.elapsed_time(pending.event) / 1000.0 if self._last_event else 0.0
            self._last_event = pending.event
        else:
            seconds = pending.wall_end - self._last_wall
            self._last_wall = pending.wall_end
        loss_sum, nonfinite, flag = (float(x) for x in pending.host.tolist())
        world = distributed.get_world_size()
        steps = max(pending.steps, 1)
        return IntervalStats(
            first_iteration=pending.first_iteration,
            last_iteration=pending.last_iteration,
            steps=pending.steps,
            loss=loss_sum / (steps * world),
            nonfinite=round(nonfinite),
            flag=flag > 0,
            seconds=seconds,
            images=pending.images,
        )

    def flush(self, last_iteration: int, flag: bool = False) -> list[IntervalStats]:
        """Collect what is pending and the sums since then, synchronously (epoch ends, checkpoints)."""
        out = []
        first = self.collect()
        if first is not None:
            out.append(first)
        if self._steps > 0:
            self.snapshot(last_iteration, flag)
            second = self.collect()
            assert second is not None
            out.append(second)
        return out


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressReporter:
    """Rank 0: a one-line progress bar on a terminal, ``logging`` lines otherwise; JSONL on disk."""

    def __init__(
        self,
        *,
        total_iterations: int,
        start_iteration: int,
        niter_per_ep: int,
        jsonl_path: Path | None,
        enabled: bool,
        stream: IO[str] | None = None,
        use_bar: bool | None = None,
    ) -> None:
        self.total = total_iterations
        self.start_iteration = start_iteration
        self.niter_per_ep = niter_per_ep
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        if use_bar is None:
            use_bar = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.use_bar = use_bar
        self._start_wall = time.perf_counter()
        self._jsonl: IO[str] | None = None
        if enabled and jsonl_path is not None:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(jsonl_path, "a", buffering=1)  # noqa: SIM115 (kept open for the run)
        self._bar_shown = False

    def eta_seconds(self, iteration: int) -> float:
        done = iteration + 1 - self.start_iteration
        if done <= 0:
            return float("nan")
        rate = done / (time.perf_counter() - self._start_wall)
        return (self.total - iteration - 1) / rate

    def report(self, stats: IntervalStats, schedule: dict[str, float], gpu_mem_gib: float | None) -> None:
        if not self.enabled:
            return
        it = stats.last_iteration
        epoch = it // self.niter_per_ep
        record: dict[str, Any] = {
            "iteration": it,
            "epoch": epoch,
            "steps": stats.steps,
            "loss": stats.loss if math.isfinite(stats.loss) else str(stats.loss),
            "nonfinite": stats.nonfinite,
            **schedule,
            "images_per_s": stats.images_per_s,
            "gpu_mem_gib": gpu_mem_gib,
            "time": time.time(),
        }
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        eta = _format_seconds(self.eta_seconds(it))
        mem = f" mem {gpu_mem_gib:.1f}GiB" if gpu_mem_gib is not None else ""
        if self.use_bar:
            frac = (it + 1) / self.total
            width = 24
            filled = int(width * frac)
            bar = "#" * filled + "-" * (width - filled)
            line = (
                f"\repoch {epoch} [{bar}] {it + 1}/{self.total} {100 * frac:5.1f}% loss {stats.loss:.4f} "
                f"{stats.images_per_s:,.0f} im/s lr {schedule['lr']:.2e}{mem} ETA {eta}"
            )
            self.stream.write(line.ljust(120))
            self.stream.flush()
            self._bar_shown = True
        else:
            logger.info(
                "epoch %d it %d/%d loss %.4f | %.1f im/s | lr %.3e wd %.4f m %.5f T %.4f%s | ETA %s",
                epoch,
                it + 1,
                self.total,
                stats.loss,
                stats.images_per_s,
                schedule["lr"],
                schedule["wd"],
                schedule["momentum"],
                schedule["teacher_temp"],
                mem,
                eta,
            )

    def message(self, text: str, *args: Any) -> None:
        """A log line that does not garble the bar."""
        if not self.enabled:
            return
        if self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False
        logger.info(text, *args)

    def close(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    """One JSON object per line, flushed (the official log.txt format)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
