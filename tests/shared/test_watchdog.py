"""A stalled rank is named by the others before the collective timeout ends the run."""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_fast.watchdog import StallWatchdog


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    log = logging.getLogger("dino_fast.watchdog")
    log.addHandler(logging.FileHandler(Path(out_dir) / f"rank{rank}.log"))
    watchdog = StallWatchdog.for_process_group(stall_s=1.0)
    watchdog.poll_s = 0.1
    with watchdog:
        reached = 4 if rank == 0 else 2
        for iteration in range(reached + 1):
            watchdog.progress(iteration)
        if rank == 1:
            time.sleep(3.0)  # stopped: rank 0 waits for it in the all-reduce below
        dist.all_reduce(torch.ones(1))
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_waiting_rank_names_the_stalled_one_and_its_last_iteration(tmp_path: Path) -> None:
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    waiting = (tmp_path / "rank0.log").read_text()
    assert "rank 1 last reached iteration 2" in waiting and "the others reached iteration 4" in waiting
    assert waiting.startswith("rank 0 has waited") and "--dist_timeout_minutes" in waiting
    assert waiting.count("has waited") == 1  # once per stall, not at every poll


def test_laggards_without_a_stall_says_nobody_is_behind() -> None:
    store = dist.HashStore()
    watchdog = StallWatchdog(store, rank=0, world_size=3, stall_s=60)
    assert watchdog.laggards() == "rank 0 never reported; rank 1 never reported; rank 2 never reported"
    for rank in range(3):
        StallWatchdog(store, rank=rank, world_size=3, stall_s=60).progress(7)
    assert watchdog.laggards() == "every rank reported the same iteration (none is behind)"
