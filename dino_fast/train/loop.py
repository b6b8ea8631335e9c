"""The training loop: steps, interval logging, the checkpoint cadence and the stop conditions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dino_fast import distributed
from dino_fast.checkpoint import CHECKPOINT_NAME, atomic_copy, atomic_save, capture_rng_state
from dino_fast.errors import UserError
from dino_fast.train.config import TrainConfig
from dino_fast.train.loader import iterate_epoch
from dino_fast.train.metrics import AsyncMetrics, IntervalStats
from dino_fast.train.progress import ProgressReporter, append_json_line
from dino_fast.train.trainer import Trainer


class NonFiniteLossError(UserError, RuntimeError):
    """Training stopped because the loss became inf or nan; the message says how to go on."""


def _gpu_mem_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class TrainingLoop:
    """Runs a trainer's steps over the loader, reports each log interval, writes the checkpoints,
    and stops at the end, at ``--max_steps`` or at a non-finite loss."""

    def __init__(
        self,
        config: TrainConfig,
        info: distributed.DistInfo,
        trainer: Trainer,
        reporter: ProgressReporter,
        metrics: AsyncMetrics,
        out_dir: Path,
        loader: Any,
    ) -> None:
        self.config = config
        self.info = info
        self.trainer = trainer
        self.reporter = reporter
        self.metrics = metrics
        self.out_dir = out_dir
        self.loader = loader
        self.iteration = 0
        self.last_loss: float | None = None
        self.last_save_wall = time.monotonic()
        self.ckpt_flag_sent = False
        self.epoch_loss_sum = 0.0
        self.epoch_steps = 0
        self._measured_images = 0
        self._measured_seconds = 0.0
        self._intervals = 0

    def images_per_s(self) -> float | None:
        if self._measured_seconds <= 0:
            return None
        return self._measured_images / self._measured_seconds

    # -- stats --------------------------------------------------------------------------
    def _schedule_record(self, iteration: int) -> dict[str, float]:
        s = self.trainer.schedules.at(iteration)
        return {"lr": s.lr, "wd": s.weight_decay, "momentum": s.momentum, "teacher_temp": s.teacher_temp}

    def _handle(self, stats: IntervalStats) -> bool:
        """Report one interval; returns True when a time-based checkpoint is due."""
        if stats.nonfinite:
            self.reporter.message("")
            msg = (
                f"loss became non-finite ({stats.loss}) in iterations {stats.first_iteration}-"
                f"{stats.last_iteration} ({stats.nonfinite} step(s) x rank(s)); stopping. The last good "
                f"checkpoint, {self.out_dir / CHECKPOINT_NAME}, was not overwritten. Lower --lr, raise "
                "--clip_grad strictness (smaller value), use --precision fp32 or --teacher_temp 0.04, "
                "then resume"
            )
            raise NonFiniteLossError(msg)
        self.last_loss = stats.loss
        # The run's images/s leaves out the first interval (lazy initialization, autotuning,
        # compilation) unless it is the only one.
        self._intervals += 1
        if self._intervals == 2:
            self._measured_images, self._measured_seconds = 0, 0.0
        self._measured_images += stats.images
        self._measured_seconds += stats.seconds
        self.epoch_loss_sum += stats.loss * stats.steps
        self.epoch_steps += stats.steps
        self.reporter.report(
            stats, self._schedule_record(stats.last_iteration), _gpu_mem_gib(self.info.device)
        )
        return stats.flag

    def _time_flag(self) -> bool:
        if not self.info.is_main or self.ckpt_flag_sent:
            return False
        due = time.monotonic() - self.last_save_wall >= self.config.ckpt_minutes * 60.0
        self.ckpt_flag_sent = due
        return due

    def _flush(self, last_iteration: int) -> bool:
        due = False
        for stats in self.metrics.flush(last_iteration):
            due |= self._handle(stats)
        return due

    # -- checkpoints --------------------------------------------------------------------
    def _save(self, iteration: int) -> None:
        """All ranks: gather RNG states; rank 0 writes checkpoint.pth atomically."""
        rng = distributed.all_gather_object(capture_rng_state(self.info.device))
        if self.info.is_main:
            state = self.trainer.state_dict(iteration)
            state["rng"] = rng
            epoch = iteration // self.trainer.steps_per_epoch
            state["sampler"] = {
                "epoch": epoch,
                "batch_in_epoch": iteration - epoch * self.trainer.steps_per_epoch,
                "batch_size_per_gpu": self.config.batch_size_per_gpu,
                "world_size": self.info.world_size,
                "seed": self.config.seed,
            }
            path = atomic_save(state, self.out_dir / CHECKPOINT_NAME)
            finished_epoch = epoch - 1
            if (
                self.config.saveckp_freq
                and iteration % self.trainer.steps_per_epoch == 0
                and finished_epoch % self.config.saveckp_freq == 0
            ):
                atomic_copy(path, self.out_dir / f"checkpoint{finished_epoch:04}.pth")
            self.reporter.message("checkpoint written: %s (iteration %d)", path, iteration)
        distributed.barrier()
        self.last_save_wall = time.monotonic()
        self.ckpt_flag_sent = False

    def _end_epoch(self, epoch: int) -> None:
        if not self.info.is_main:
            return
        s = self.trainer.schedules
        lo, hi = epoch * s.steps_per_epoch, (epoch + 1) * s.steps_per_epoch
        record = {
            "train_loss": self.epoch_loss_sum / max(self.epoch_steps, 1),
            "train_lr": float(s.lr[lo:hi].mean()),
            "train_wd": float(s.weight_decay[lo:hi].mean()),
            "epoch": epoch,
        }
        append_json_line(self.out_dir / "log.txt", record)  # the official per-epoch log format
        self.epoch_loss_sum = 0.0
        self.epoch_steps = 0

    # -- loop ---------------------------------------------------------------------------
    def run(self, start: int, end: int) -> None:
        """Iterations ``start`` to ``end`` (exclusive), from the loader's position at ``start``."""
        trainer, metrics = self.trainer, self.metrics
        steps_per_epoch = trainer.steps_per_epoch
        it = start
        self.iteration = it
        metrics.start(it)
        while it < end:
            epoch = it // steps_per_epoch
            for batch in iterate_epoch(self.loader, epoch, it - epoch * steps_per_epoch):
                loss = trainer.step(batch, it)
                metrics.accumulate(loss)
                it += 1
                self.iteration = it
                epoch_done = it % steps_per_epoch == 0
                last = it >= end
                save = epoch_done or last
                if epoch_done or last:
                    # Synchronous point: every loss up to here is checked before anything is saved.
                    save |= self._flush(it - 1)
                elif metrics.steps_since_snapshot >= self.config.log_interval:
                    stats = metrics.collect()
                    due = self._handle(stats) if stats is not None else False
                    metrics.snapshot(it - 1, flag=self._time_flag())
                    if due:
                        save = True
                        self._flush(it - 1)
                if save:
                    self._save(it)
                if epoch_done:
                    self._end_epoch(epoch)
                if save or epoch_done:
                    metrics.start(it)  # the checkpoint's time is not training throughput
                if last or epoch_done:
                    break
            else:
                raise RuntimeError(
                    f"the data loader ended after iteration {it} of epoch {epoch}, before its "
                    f"len() of {steps_per_epoch} batches"
                )
