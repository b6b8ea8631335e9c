"""Timing and environment helpers shared by the benchmark scripts.

Timings follow one rule: warm-up first, then the median of many runs, with CUDA events on a
GPU and perf_counter on a CPU. Ratios are meaningful only between numbers measured in the
same run on the same device.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def measure(
    fn: Callable[[], object], *, device: torch.device, warmup: int = 5, iters: int = 30
) -> dict[str, float | None]:
    """Median/p10/p90 milliseconds of ``fn()`` and, on CUDA, its peak memory beyond what was
    allocated before the first call (MiB)."""
    for _ in range(warmup):
        fn()
    times_ms: list[float] = []
    peak_extra_mib = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        peak_extra_mib = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    else:
        for _ in range(iters):
            start_s = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - start_s) * 1e3)
    times_ms.sort()
    return {
        "median_ms": statistics.median(times_ms),
        "p10_ms": times_ms[len(times_ms) // 10],
        "p90_ms": times_ms[(len(times_ms) * 9) // 10],
        "peak_extra_mib": peak_extra_mib,
        "iters": iters,
    }


@contextmanager
def cudnn_autotuner() -> Iterator[None]:
    """``cudnn.benchmark = True`` for the block, as main_dino.py sets it for its whole run (cuDNN
    times its convolution algorithms once per input shape); the previous setting after."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def rate_fields(stats: dict[str, Any], images: int, per: str) -> dict[str, float]:
    """What a result reports of ``measure``'s stats over calls of ``images`` images each: the
    median milliseconds per ``per`` (step, batch), its p10/p90 spread, and images/s."""
    return {
        f"ms_per_{per}": stats["median_ms"],
        "p10_ms": stats["p10_ms"],
        "p90_ms": stats["p90_ms"],
        "images_per_s": images / (stats["median_ms"] / 1e3),
    }


def environment(device: torch.device) -> dict[str, Any]:
    """What a result needs to be compared with another: device, versions, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def release_memory(device: torch.device, compiled: bool) -> None:
    """Free what the last measured thing held, so that the next one's peak memory is its own."""
    if compiled:
        torch._dynamo.reset()  # compiled graphs (and CUDA-graph pools) hold their own memory
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
