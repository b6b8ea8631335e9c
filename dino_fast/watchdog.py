"""Naming the rank that went silent, before a collective timeout ends the run.

A stopped or hung rank otherwise shows up on the others only as a collective that never
returns, then as a timeout error that does not say who was missing. Every rank records its
progress (iteration, wall-clock time) in the process group's key-value store where the step
synchronizes anyway (each log interval); a daemon thread on each rank wakes every few seconds,
and once its own rank has made no progress for ``stall_s`` it reads every rank's record and
logs, once per stall, which ranks are behind and since when.
"""

from __future__ import annotations

import logging
import threading
import time

import torch.distributed as dist

logger = logging.getLogger(__name__)

_KEY = "dino_fast/progress/{rank}"


class StallWatchdog:
    """Progress records in ``store`` and a thread that names stalled ranks (module doc)."""

    def __init__(
        self, store: dist.Store, rank: int, world_size: int, stall_s: float, poll_s: float = 5.0
    ) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.stall_s, self.poll_s = stall_s, poll_s
        self._last_progress = time.monotonic()
        self._reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dino_fast-stall-watchdog", daemon=True)

    @classmethod
    def for_process_group(cls, stall_s: float) -> StallWatchdog | None:
        """A watchdog on the default process group's store; None for a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        store = dist.distributed_c10d._get_default_store()
        return cls(store, dist.get_rank(), dist.get_world_size(), stall_s)

    def __enter__(self) -> StallWatchdog:
        self.progress(-1)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def progress(self, iteration: int) -> None:
        """This rank has reached ``iteration`` (called where the step synchronizes)."""
        self._last_progress = time.monotonic()
        self._reported = False
        self.store.set(_KEY.format(rank=self.rank), f"{iteration} {time.time()}")

    def laggards(self) -> str:
        """Who is behind: the ranks at the lowest recorded iteration, and how long ago they spoke."""
        now, records = time.time(), {}
        for rank in range(self.world_size):
            key = _KEY.format(rank=rank)
            if self.store.check([key]):
                iteration, stamp = self.store.get(key).decode().split()
                records[rank] = (int(iteration), float(stamp))
        silent = sorted(set(range(self.world_size)) - set(records))
        if records:
            lowest = min(iteration for iteration, _ in records.values())
            behind = [r for r, (iteration, _) in sorted(records.items()) if iteration == lowest]
            ahead = max(iteration for iteration, _ in records.values())
        parts = [f"rank {r} never reported" for r in silent]
        if records and ahead > lowest:
            parts += [
                f"rank {r} last reached iteration {lowest} {now - records[r][1]:.0f} s ago" for r in behind
            ]
            parts.append(f"the others reached iteration {ahead}")
        return "; ".join(parts) or "every rank reported the same iteration (none is behind)"

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            stalled_for = time.monotonic() - self._last_progress
            if stalled_for >= self.stall_s and not self._reported:
                self._reported = True
                try:
                    who = self.laggards()
                except Exception as err:  # the store's host may be the rank that died
                    who = f"the progress records cannot be read ({err})"
                logger.error(
                    "rank %d has waited %.0f s without progress: %s. A stopped or dead rank stalls the "
                    "others until the collective timeout (--dist_timeout_minutes) ends the run",
                    self.rank,
                    stalled_for,
                    who,
                )
