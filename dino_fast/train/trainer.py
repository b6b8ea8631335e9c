"""The DINO training step: student, teacher, loss, optimizer, EMA and schedules of one run.

The step is the official ``train_one_epoch`` body: teacher on the 2 global crops, student on all
crops through one packed ViT call (a convnet runs once per crop resolution: batch-norm statistics
cannot mix resolutions), DINOLoss with the epoch's teacher temperature; backward, under fp16 the
gradients unscaled, each parameter's gradient clipped on its own, the head's last layer gradient
dropped during the first ``freeze_last_layer`` epochs; AdamW, SGD or LARS with the official
parameter groups; the teacher EMA. It never reads a device value on the host: the
learning rate, weight decay and momentum come from schedules precomputed on the host, the clip
stays on the device, and the loss is returned unread. How it differs from the official step, and
why, is in the README ("What still differs").
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from dino_fast import distributed, models
from dino_fast.models import attention
from dino_fast.ops.ema import TeacherEMA
from dino_fast.ops.loss import DINOLoss
from dino_fast.train.config import TrainConfig
from dino_fast.train.model import build_student_teacher, has_batchnorms
from dino_fast.train.optim import build_optimizer, clip_gradients_, get_params_groups
from dino_fast.train.precision import autocast_dtype
from dino_fast.train.schedules import Schedules, build_schedules


class Trainer:
    """Student, teacher, loss, optimizer, EMA and schedules of one DINO run, and its step.

    ``Trainer(config, device, world_size=..., rank=..., steps_per_epoch=...)``. Under an initialized
    ``torch.distributed`` process group with ``world_size > 1`` the student is wrapped in DDP
    (``student_ddp``), and so is the teacher when the head has batch norms (``teacher_ddp``);
    ``student`` and ``teacher`` are always the bare modules. ``step(batch, iteration)`` runs one
    training iteration on a ``MultiCropBatch`` and returns the loss as a device tensor without
    reading it.
    """

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device | str,
        *,
        world_size: int = 1,
        rank: int = 0,
        steps_per_epoch: int,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 (got {steps_per_epoch})")
        self.config = config
        self.device = torch.device(device)
        self.world_size = world_size
        self.rank = rank
        self.steps_per_epoch = steps_per_epoch
        self.precision = config.resolved_precision()
        self.amp_dtype = autocast_dtype(self.precision)

        # The official fix_random_seeds(args.seed), the same on every rank, then the official
        # construction order: the same seed gives the official initial weights.
        torch.manual_seed(config.seed)
        student, teacher = build_student_teacher(config)
        teacher.load_state_dict(student.state_dict())
        student.to(self.device)
        teacher.to(self.device)
        self.channels_last = models.is_convnet(config.arch) and self.device.type == "cuda"
        if self.device.type == "cuda":
            # As official: cuDNN times its convolution algorithms once per input shape (a step has
            # two crop sizes) and keeps the fastest.
            torch.backends.cudnn.benchmark = True
            if self.channels_last:
                # NHWC lets cuDNN's bf16 tensor-core convolutions run without layout transposes.
                student.to(memory_format=torch.channels_last)
                teacher.to(memory_format=torch.channels_last)
        with_batchnorms = has_batchnorms(student)
        if with_batchnorms:
            # As official; on a CPU as a batch norm of ours that gloo can synchronize.
            student = models.convert_sync_batchnorm(student, self.device)
            teacher = models.convert_sync_batchnorm(teacher, self.device)
        # The teacher runs under DDP when it has batch norms, as official (DDP broadcasts their
        # statistics from rank 0); it is wrapped while its parameters still require gradients,
        # because DDP refuses a module without any.
        self.teacher_ddp: nn.Module = teacher
        if with_batchnorms and world_size > 1 and distributed.is_initialized():
            self.teacher_ddp = nn.parallel.DistributedDataParallel(teacher, device_ids=self._ddp_ids())
        teacher.requires_grad_(False)
        self.student = student
        self.teacher = teacher
        # The EMA packs both models' parameters into one flat buffer each (one streaming kernel
        # per step); it must see the bare student before the optimizer and DDP record its storage.
        self.ema = TeacherEMA(teacher, student, flat=True, pack_student=True, backend=config.backend)
        self.optimizer = build_optimizer(config.optimizer, get_params_groups(student), self.device)

        self.student_ddp: nn.Module = student
        if world_size > 1 and distributed.is_initialized():
            self.student_ddp = nn.parallel.DistributedDataParallel(student, device_ids=self._ddp_ids())
        if config.compile:
            # The attention probes cannot run inside a trace: settle them now, so that a compiled
            # run can still choose packed varlen attention or xformers.
            attention.prepare(self.device, self.amp_dtype or torch.float32)
            self.student_ddp.compile(mode=config.compile_mode)
            self.teacher.compile(mode=config.compile_mode)

        self.dino_loss = DINOLoss(
            config.out_dim,
            config.ncrops,
            config.warmup_teacher_temp,
            config.teacher_temp,
            config.warmup_teacher_temp_epochs,
            config.epochs,
            center_momentum=config.center_momentum,
            teacher_centering=config.teacher_centering,
            backend=config.backend,
        ).to(self.device)

        self.scaler: torch.amp.GradScaler | None = None
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.schedules: Schedules = build_schedules(config, steps_per_epoch, world_size)
        self._last_layer_params = [p for n, p in student.named_parameters() if "last_layer" in n]
        self._clip_params = [p for p in student.parameters() if p.requires_grad]

    def _ddp_ids(self) -> list[int] | None:
        return [self.device.index] if self.device.type == "cuda" else None

    # -- the step ------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def total_iterations(self) -> int:
        return self.schedules.total_iterations

    def step(self, batch: Any, iteration: int) -> torch.Tensor:
        """One DINO iteration at global index ``iteration``; returns the (unread) loss tensor."""
        s = self.schedules.at(iteration)
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = s.lr
            if i == 0:  # only the first group is regularized
                group["weight_decay"] = s.weight_decay
        global_crops, local_crops = batch.global_crops, batch.local_crops
        if self.channels_last:
            global_crops = global_crops.contiguous(memory_format=torch.channels_last)
            if local_crops is not None:
                local_crops = local_crops.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            with torch.no_grad():
                teacher_output = self.teacher_ddp(global_crops)  # only the 2 global views
            student_output = self.student_ddp(global_crops, local_crops)
            loss = self.dino_loss(student_output, teacher_output, s.epoch)

        # The official order: unscale, clip (the frozen last layer's gradient too), drop that
        # gradient, step.
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.config.clip_grad:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.config.clip_grad_mode == "global":
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self._clip_params if p.grad is not None],
                    self.config.clip_grad,
                    foreach=True,
                    error_if_nonfinite=False,
                )
            else:
                clip_gradients_(self._clip_params, self.config.clip_grad)
        if s.epoch < self.config.freeze_last_layer:
            for p in self._last_layer_params:
                p.grad = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.ema.update(s.momentum)
        return loss.detach()

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self, iteration: int) -> dict[str, Any]:
        """Official checkpoint keys plus ``iteration`` (the next one to run); RNG and data position
        are added by the run loop, which knows every rank's."""
        # The official student is DDP-wrapped, so its keys carry "module."; keep that for its tools.
        student_state = {f"module.{k}": v for k, v in self.student.state_dict().items()}
        state: dict[str, Any] = {
            "student": student_state,
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": iteration // self.steps_per_epoch,
            "args": self.config.to_dict(),
            "dino_loss": self.dino_loss.state_dict(),
            "iteration": iteration,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world_size,
        }
        if self.scaler is not None:
            state["fp16_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, ckpt: dict[str, Any]) -> int:
        """Restore models, optimizer, loss center and scaler; returns the iteration to continue at."""
        student_state = {k.removeprefix("module."): v for k, v in ckpt["student"].items()}
        self.student.load_state_dict(student_state)
        self.teacher.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["teacher"].items()})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.dino_loss.load_state_dict(ckpt["dino_loss"])
        if self.scaler is not None and "fp16_scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["fp16_scaler"])
        if ckpt.get("steps_per_epoch") == self.steps_per_epoch and "iteration" in ckpt:
            return int(ckpt["iteration"])
        # Another data set size / world size (or an official checkpoint): the official rule,
        # restart at the beginning of the stored epoch.
        return int(ckpt["epoch"]) * self.steps_per_epoch
