"""Per-iteration training schedules, precomputed once on the host (official semantics).

The training step reads plain Python floats from these arrays, so setting the learning
rate, weight decay and EMA momentum never touches the device (no host sync), and a resumed
run continues at exactly the value of its global iteration index.

- ``cosine_scheduler`` is the official ``utils.cosine_scheduler``: ``warmup_epochs *
  niter_per_ep`` iterations of ``np.linspace(start_warmup_value, base_value, n)`` (both
  ends included), then ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for the
  remaining n iterations.
- the learning rate peaks at ``lr * total_batch / 256`` (the linear scaling rule), warms up
  from 0 and decays to ``min_lr``; weight decay goes 0.04 -> 0.4 and the teacher momentum
  ``momentum_teacher`` -> 1 by cosines without warmup;
- the teacher temperature is per *epoch*, as in the official DINOLoss: a linear warmup over
  ``warmup_teacher_temp_epochs`` epochs, then constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dino_fast.train.config import TrainConfig


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per iteration: linear warmup to ``base_value``, then a cosine to ``final_value``."""
    if epochs < 1 or niter_per_ep < 1:
        raise ValueError(
            f"cosine_scheduler needs epochs >= 1 and niter_per_ep >= 1 (got {epochs}, {niter_per_ep})"
        )
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}] (got {warmup_epochs})")
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine)).astype(np.float64)


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature, exactly the official DINOLoss ``teacher_temp_schedule``."""
    if not 0 <= warmup_teacher_temp_epochs <= nepochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs must be in [0, nepochs={nepochs}] (got {warmup_teacher_temp_epochs})"
        )
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        )
    )


@dataclass(frozen=True)
class ScheduleValues:
    epoch: int
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


@dataclass(frozen=True)
class Schedules:
    """Every schedule of a run, indexed by global iteration (``teacher_temp`` by epoch)."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    niter_per_ep: int

    @property
    def total_iterations(self) -> int:
        return len(self.lr)

    def at(self, iteration: int) -> ScheduleValues:
        if not 0 <= iteration < self.total_iterations:
            raise IndexError(f"iteration {iteration} is outside the schedule [0, {self.total_iterations})")
        epoch = iteration // self.niter_per_ep
        return ScheduleValues(
            epoch=epoch,
            lr=float(self.lr[iteration]),
            weight_decay=float(self.weight_decay[iteration]),
            momentum=float(self.momentum[iteration]),
            teacher_temp=float(self.teacher_temp[epoch]),
        )


def build_schedules(config: TrainConfig, niter_per_ep: int, world_size: int) -> Schedules:
    """The official main_dino.py schedules for ``config``, ``niter_per_ep`` steps per epoch."""
    total_batch = config.batch_size_per_gpu * world_size
    return Schedules(
        lr=cosine_scheduler(
            config.lr * total_batch / 256.0,  # linear scaling rule
            config.min_lr,
            config.epochs,
            niter_per_ep,
            warmup_epochs=config.warmup_epochs,
        ),
        weight_decay=cosine_scheduler(
            config.weight_decay, config.weight_decay_end, config.epochs, niter_per_ep
        ),
        momentum=cosine_scheduler(config.momentum_teacher, 1.0, config.epochs, niter_per_ep),
        teacher_temp=teacher_temp_schedule(
            config.warmup_teacher_temp, config.teacher_temp, config.warmup_teacher_temp_epochs, config.epochs
        ),
        niter_per_ep=niter_per_ep,
    )
