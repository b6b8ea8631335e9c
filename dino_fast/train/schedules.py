"""Per-iteration training schedules, precomputed once on the host (official semantics).

The training step reads plain Python floats from these arrays, so setting the learning
rate, weight decay and EMA momentum never touches the device (no host sync), and a resumed
run continues at exactly the value of its global iteration index.

- ``cosine_scheduler`` is the official ``utils.cosine_scheduler``: ``warmup_epochs *
  steps_per_epoch`` iterations of ``np.linspace(start_warmup_value, base_value, n)`` (both
  ends included), then ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for the
  remaining n iterations.
- the learning rate peaks at ``lr * total_batch / 256`` (the linear scaling rule), warms up
  from 0 and decays to ``min_lr``; weight decay goes 0.04 -> 0.4 and the teacher momentum
  ``momentum_teacher`` -> 1 by cosines without warmup;
- the teacher temperature is per *epoch*, DINOLoss's own schedule
  (``dino_fast.ops.loss.teacher_temp_schedule``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dino_fast.ops.loss import teacher_temp_schedule

if TYPE_CHECKING:
    from dino_fast.train.config import TrainConfig


# The official function's ``niter_per_ep`` is ``steps_per_epoch`` here, as everywhere in dino_fast.
def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per iteration: linear warmup to ``base_value``, then a cosine to ``final_value``."""
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(
            f"cosine_scheduler needs epochs >= 1 and steps_per_epoch >= 1 (got {epochs}, {steps_per_epoch})"
        )
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}] (got {warmup_epochs})")
    warmup_iters = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * steps_per_epoch - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine)).astype(np.float64)


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
    steps_per_epoch: int

    @property
    def total_iterations(self) -> int:
        return len(self.lr)

    def at(self, iteration: int) -> ScheduleValues:
        if not 0 <= iteration < self.total_iterations:
            raise IndexError(f"iteration {iteration} is outside the schedule [0, {self.total_iterations})")
        epoch = iteration // self.steps_per_epoch
        return ScheduleValues(
            epoch=epoch,
            lr=float(self.lr[iteration]),
            weight_decay=float(self.weight_decay[iteration]),
            momentum=float(self.momentum[iteration]),
            teacher_temp=float(self.teacher_temp[epoch]),
        )


def build_schedules(config: TrainConfig, steps_per_epoch: int, world_size: int) -> Schedules:
    """The official main_dino.py schedules for ``config``, ``steps_per_epoch`` steps per epoch."""
    total_batch = config.batch_size_per_gpu * world_size
    return Schedules(
        lr=cosine_scheduler(
            config.lr * total_batch / 256.0,  # linear scaling rule
            config.min_lr,
            config.epochs,
            steps_per_epoch,
            warmup_epochs=config.warmup_epochs,
        ),
        weight_decay=cosine_scheduler(
            config.weight_decay, config.weight_decay_end, config.epochs, steps_per_epoch
        ),
        momentum=cosine_scheduler(config.momentum_teacher, 1.0, config.epochs, steps_per_epoch),
        teacher_temp=teacher_temp_schedule(
            config.warmup_teacher_temp, config.teacher_temp, config.warmup_teacher_temp_epochs, config.epochs
        ),
        steps_per_epoch=steps_per_epoch,
    )
