"""Training progress on rank 0: a progress bar on a terminal, log lines otherwise, JSONL logs."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from dino_fast.train.metrics import IntervalStats

logger = logging.getLogger(__name__)


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
        steps_per_epoch: int,
        jsonl_path: Path | None,
        enabled: bool,
        stream: IO[str] | None = None,
        use_bar: bool | None = None,
    ) -> None:
        self.total = total_iterations
        self.start_iteration = start_iteration
        self.steps_per_epoch = steps_per_epoch
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
        epoch = it // self.steps_per_epoch
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
