"""Side by side: ``Trainer.step`` and the official step (dino_fast.official) from the same
weights on the same crops, compared after every iteration.

Models are compared as whole vectors, ``|theta_ours - theta_official| <= 1e-4 |theta_official|``
(L2), not element by element: Adam's first step divides each gradient element by its own
magnitude plus 1e-8, so an element whose gradient is rounding noise (the attention key bias,
whose true gradient is exactly zero; a few near-zero entries of the last layer on its first
unfrozen step) moves by a random fraction of the learning rate in either implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dino_fast.data import MultiCropBatch
from dino_fast.official import training as official
from dino_fast.official.loss import DINOLoss as OfficialDINOLoss
from dino_fast.train import TrainConfig, Trainer

STEPS = 10
STEPS_PER_EPOCH = 4
TOLERANCE = 1e-4


def batch(iteration: int) -> MultiCropBatch:
    g = torch.Generator().manual_seed(iteration)
    return MultiCropBatch(torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 16, 16, generator=g))


@dataclass(frozen=True)
class StepComparison:
    tolerance: float
    iteration: int
    loss_ours: float
    loss_official: float
    student_rel_diff: float  # |theta_ours - theta_official| / |theta_official|, L2 over all parameters
    teacher_rel_diff: float
    largest_grad_norm: float  # the largest per-parameter gradient norm the official clip measured
    clipped: int  # how many of the gradients it scaled down
    gradients: int  # how many gradients it measured

    @property
    def loss_rel_diff(self) -> float:
        return abs(self.loss_ours - self.loss_official) / abs(self.loss_official)

    @property
    def agrees(self) -> bool:
        return max(self.loss_rel_diff, self.student_rel_diff, self.teacher_rel_diff) <= self.tolerance


def relative_distance(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    """L2 distance over every floating-point tensor of the state dicts (batch-norm running
    statistics too), relative to the official model's norm."""
    mine = ours.state_dict()
    tensors = {n: t for n, t in theirs.state_dict().items() if t.is_floating_point()}
    diff = sum(float((mine[n] - t).double().square().sum()) for n, t in tensors.items())
    norm = sum(float(t.double().square().sum()) for t in tensors.values())
    return (diff / norm) ** 0.5


def side_by_side(
    config: TrainConfig,
    *,
    trainer: Trainer | None = None,
    sync_drop_path: bool = True,
    stop_at_disagreement: bool = False,
    official_loss: Callable[..., torch.nn.Module] = OfficialDINOLoss,
    tolerance: float = TOLERANCE,
) -> list[StepComparison]:
    """``STEPS`` iterations of ``trainer`` (default: built from ``config``) and of the official step
    with ``config``, from the trainer's initial weights and on the same crops. ``official_loss``
    builds the official step's loss from ``DINOLoss``'s arguments (the official one by default)."""
    trainer = trainer or Trainer(config, "cpu", steps_per_epoch=STEPS_PER_EPOCH)
    student, teacher = official.build_student_teacher(config)
    student.load_state_dict(trainer.student.state_dict())
    teacher.load_state_dict(trainer.teacher.state_dict())
    # train_dino's loss, optimizer and schedules, in its words (one process, len(data_loader) = 4)
    args, niter_per_ep, world_size = config, STEPS_PER_EPOCH, 1
    dino_loss = official_loss(
        args.out_dim,
        args.local_crops_number + 2,  # total number of crops = 2 global crops + local_crops_number
        args.warmup_teacher_temp,
        args.teacher_temp,
        args.warmup_teacher_temp_epochs,
        args.epochs,
    )
    optimizer = official.build_optimizer(args, official.get_params_groups(student))
    lr_schedule = official.cosine_scheduler(
        args.lr * (args.batch_size_per_gpu * world_size) / 256.0,  # linear scaling rule
        args.min_lr,
        args.epochs,
        niter_per_ep,
        warmup_epochs=args.warmup_epochs,
    )
    wd_schedule = official.cosine_scheduler(
        args.weight_decay, args.weight_decay_end, args.epochs, niter_per_ep
    )
    momentum_schedule = official.cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter_per_ep)

    comparisons = []
    for it in range(STEPS):
        crops = batch(it)
        # Both sides draw their drop-path masks from the global generator in the official order
        # (dino_fast's one draw is laid out as the official per-resolution, per-block draws), so the
        # same generator state before each side's step gives both the same masks.
        torch.manual_seed(1000 + it)
        loss_ours = float(trainer.step(crops, it))
        if sync_drop_path:
            torch.manual_seed(1000 + it)
        loss_official, norms = official.train_one_iteration(
            student,
            teacher,
            dino_loss,
            crops.crops(),
            optimizer,
            lr_schedule,
            wd_schedule,
            momentum_schedule,
            it,
            it // niter_per_ep,
            None,  # fp32: no fp16_scaler
            args,
        )
        comparison = StepComparison(
            tolerance=tolerance,
            iteration=it,
            loss_ours=loss_ours,
            loss_official=loss_official,
            student_rel_diff=relative_distance(trainer.student, student),
            teacher_rel_diff=relative_distance(trainer.teacher, teacher),
            largest_grad_norm=max(norms or [0.0]),
            clipped=sum(config.clip_grad / (n + 1e-6) < 1 for n in norms) if config.clip_grad else 0,
            gradients=len(norms),
        )
        comparisons.append(comparison)
        if stop_at_disagreement and not comparison.agrees:
            break
    return comparisons


def report(comparisons: list[StepComparison]) -> str:
    return "\n".join(
        f"step {c.iteration}: loss {c.loss_ours:.6f} vs {c.loss_official:.6f} (rel {c.loss_rel_diff:.1e}), "
        f"student {c.student_rel_diff:.1e}, teacher {c.teacher_rel_diff:.1e}, largest gradient norm "
        f"{c.largest_grad_norm:.2f}, {c.clipped} clipped"
        for c in comparisons
    )


class SchedulesReadOneLate:
    """A planted bug: every step reads the next iteration's learning rate, weight decay, momentum."""

    def __init__(self, schedules: object) -> None:
        self.schedules = schedules

    def at(self, iteration: int) -> object:
        return self.schedules.at(iteration + 1)


def trainer_reading_schedules_one_late(config: TrainConfig) -> Trainer:
    trainer = Trainer(config, "cpu", steps_per_epoch=STEPS_PER_EPOCH)
    trainer.schedules = SchedulesReadOneLate(trainer.schedules)
    return trainer
