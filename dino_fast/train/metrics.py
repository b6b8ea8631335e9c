"""Training metrics read without stalling the GPU: loss and non-finite counts, one interval late.

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

import time
from dataclasses import dataclass
from typing import Any

import torch

from dino_fast import distributed


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
