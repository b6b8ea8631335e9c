"""DINO training: ``python -m dino_fast.train`` or ``torchrun --nproc_per_node=N -m dino_fast.train``.

The algorithm is the official ``main_dino.py`` one, iteration for iteration:

- student and teacher built in the official order from ``--seed`` (student backbone, teacher
  backbone, student head, teacher head), so a seed gives the official initial weights; the
  teacher (no drop path, no gradients) starts as the student's copy; with batch norms in the
  head both become SyncBatchNorm and the teacher runs under DDP, as official;
- teacher on the 2 global crops; student on all crops through one multi-crop backbone call,
  then the head;
- DINOLoss (centering + sharpening + multi-crop cross-entropy, fused kernels inside), with
  the teacher temperature of the current epoch;
- backward; under fp16 the gradients unscaled; each parameter's gradient clipped on its own
  (``utils.clip_gradients``); the head's last layer gradient dropped during the first
  ``freeze_last_layer`` epochs; AdamW with the official parameter groups (no weight decay on
  biases and 1-D parameters); the teacher updated by EMA;
- learning rate, weight decay and EMA momentum read from per-iteration schedules
  precomputed on the host (dino_fast.schedules).

What differs from the official loop, and why:

- the step never syncs with the host: the clip computes every norm and coefficient on the
  device (the official code reads each norm with ``.item()``); the loss and a non-finite flag
  are read one log interval later (dino_fast.progress); a non-finite loss stops the run there,
  and no checkpoint is written after it, so the last good one stays.
- bf16 autocast by default (fp16 + GradScaler with ``--use_fp16 true`` or ``--precision
  fp16``), fused AdamW, DINOLoss/TeacherEMA from dino_fast's fused kernels, SDPA attention.
- ``--clip_grad_mode global`` clips the global norm instead (not the default).
- checkpoints are also written every ``--ckpt_minutes`` minutes, atomically, with the
  iteration, data position and RNG states, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dino_fast import distributed
from dino_fast.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointWriteError,
    atomic_copy,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from dino_fast.models import attention
from dino_fast.train.config import ConfigError, TrainConfig, parse_args
from dino_fast.train.progress import AsyncMetrics, IntervalStats, ProgressReporter, append_json_line
from dino_fast.train.schedules import Schedules, build_schedules

logger = logging.getLogger("dino_fast.train")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
DATA_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became inf or nan."""


# ----------------------------------------------------------------------------------------
# Optimizer pieces (official semantics)
# ----------------------------------------------------------------------------------------


def get_params_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Official ``utils.get_params_groups``: biases and 1-D parameters (norms) get no weight decay.

    The first group is the regularized one; the schedule sets its weight decay every step.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """The official DINO ``utils.LARS`` (for convnets and very large batches): SGD with momentum
    whose update of each multi-dimensional parameter is rescaled by ``eta * |p| / |dp|``; biases and
    norms get neither weight decay nor the adaptation."""

    def __init__(
        self, params: Any, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9, eta: float = 0.001
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("LARS.step does not take a closure")
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


@torch.no_grad()
def clip_gradients_(parameters: Iterable[Tensor], clip: float) -> None:
    """The official ``utils.clip_gradients`` computed on the device, without host syncs: each
    gradient on its own is multiplied by ``clip / (norm + 1e-6)`` where that is below 1."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    coefs = torch._foreach_norm(grads)
    torch._foreach_add_(coefs, 1e-6)
    # clip * (1 / x) is how torch computes the official ``clip / tensor``: the same rounding.
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    stacked = torch.stack(coefs)
    # A NaN coefficient fails ``< 1`` and leaves its gradient alone, as the official ``if`` does.
    stacked = torch.where(stacked < 1, stacked, 1.0)
    torch._foreach_mul_(grads, list(stacked.unbind()))


def build_optimizer(name: str, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    if name == "adamw":
        # Fused AdamW (one kernel for all parameters) where torch has it; foreach otherwise.
        try:
            return torch.optim.AdamW(groups, fused=True)
        except (RuntimeError, ValueError) as exc:
            logger.debug("fused AdamW unavailable on %s (%s); using foreach", device, exc)
            return torch.optim.AdamW(groups, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)  # lr is set by the schedule
    if name == "lars":
        return LARS(groups)
    raise ConfigError(f"--optimizer {name!r}: choose adamw, sgd or lars")


# ----------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------


def build_backbone(config: TrainConfig, *, drop_path_rate: float) -> nn.Module:
    """A freshly initialized ``config.arch`` ViT (the official ``vits.__dict__[arch]`` call)."""
    from dino_fast import models

    factory = getattr(models, config.arch, None)
    if factory is None:
        raise ConfigError(f"--arch {config.arch!r} is not provided by dino_fast.models")
    return factory(
        patch_size=config.patch_size, drop_path_rate=drop_path_rate, attn_backend=config.attn_backend
    )


def build_head(config: TrainConfig, embed_dim: int, *, norm_last_layer: bool) -> nn.Module:
    """A freshly initialized DINOHead on ``embed_dim`` features (the official ``DINOHead(...)``)."""
    from dino_fast import models

    return models.DINOHead(
        embed_dim, config.out_dim, use_bn=config.use_bn_in_head, norm_last_layer=norm_last_layer
    )


def build_dino_model(config: TrainConfig, *, drop_path_rate: float) -> nn.Module:
    """One backbone + head (to load a checkpoint into, say); a run builds two with
    :func:`build_student_teacher`."""
    from dino_fast import models

    backbone = build_backbone(config, drop_path_rate=drop_path_rate)
    return models.DINOModel(
        backbone, build_head(config, backbone.embed_dim, norm_last_layer=config.norm_last_layer)
    )


def build_student_teacher(config: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """Student and teacher drawn in ``train_dino``'s order (both backbones, then both heads), so that
    after ``torch.manual_seed(seed)`` the weights are the official ones bitwise. The teacher has no
    drop path and still holds its own initialization: load the student's weights into it."""
    from dino_fast import models

    student_backbone = build_backbone(config, drop_path_rate=config.drop_path_rate)
    teacher_backbone = build_backbone(config, drop_path_rate=0.0)
    embed_dim = student_backbone.embed_dim
    student = models.DINOModel(
        student_backbone, build_head(config, embed_dim, norm_last_layer=config.norm_last_layer)
    )
    # The official teacher head keeps DINOHead's default norm_last_layer (it has no gradients anyway).
    teacher = models.DINOModel(teacher_backbone, build_head(config, embed_dim, norm_last_layer=True))
    return student, teacher


def has_batchnorms(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
        from dino_fast.ops.ema import TeacherEMA
        from dino_fast.ops.loss import DINOLoss

        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 (got {steps_per_epoch})")
        self.config = config
        self.device = torch.device(device)
        self.world_size = world_size
        self.rank = rank
        self.steps_per_epoch = steps_per_epoch
        self.precision = config.resolved_precision()
        self.amp_dtype = AMP_DTYPES[self.precision]

        # The official fix_random_seeds(args.seed), the same on every rank, then the official
        # construction order: the same seed gives the official initial weights.
        torch.manual_seed(config.seed)
        student, teacher = build_student_teacher(config)
        teacher.load_state_dict(student.state_dict())
        student.to(self.device)
        teacher.to(self.device)
        with_batchnorms = has_batchnorms(student)
        if with_batchnorms:
            if world_size > 1 and self.device.type == "cpu":
                raise ConfigError(
                    "--use_bn_in_head true with several CPU processes: the official code synchronizes the "
                    "head's batch norms with SyncBatchNorm, which runs on GPUs only; train on GPUs, in one "
                    "process, or with --use_bn_in_head false"
                )
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
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


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def resolve_data_path(config: TrainConfig) -> Path | None:
    """The ImageFolder to train on; the demo prepares Fashion-MNIST on first use."""
    if config.data == "synthetic":
        return None
    if config.preset == "demo" and not config.data_path:
        from dino_fast.data.demo import prepare_fashion_mnist

        return Path(prepare_fashion_mnist(max_per_class=config.demo_max_per_class or None)) / "train"
    return Path(config.data_path)


def build_augmentation(config: TrainConfig) -> Any:
    """The ``MultiCropAugmentation`` a run with ``config`` trains on."""
    from dino_fast.data import MultiCropAugmentation

    return MultiCropAugmentation(
        global_crop_size=config.global_crops_size,
        local_crop_size=config.local_crops_size,
        global_crops_scale=tuple(config.global_crops_scale),
        local_crops_scale=tuple(config.local_crops_scale),
        local_crops_number=config.local_crops_number,
        blur_sigma=tuple(config.blur_sigma),
    )


def build_loader(config: TrainConfig, info: distributed.DistInfo, data_root: Path | None) -> Any:
    from dino_fast.data import make_loader

    augment = build_augmentation(config)
    kwargs: dict[str, Any] = {}
    if config.data == "synthetic":
        kwargs["dataset_size"] = config.synthetic_size
    return make_loader(
        config.data,
        None if data_root is None else str(data_root),
        batch_size=config.batch_size_per_gpu,
        local_crops_number=config.local_crops_number,
        augment=augment,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        dtype=DATA_DTYPES[config.resolved_precision()],
        num_workers=config.num_workers,
        seed=config.seed,
        **kwargs,
    )


def iterate_epoch(loader: Any, epoch: int, start_batch: int) -> Iterator[Any]:
    """The batches of ``epoch`` from index ``start_batch`` on (resuming mid-epoch)."""
    loader.set_epoch(epoch)
    if start_batch == 0:
        yield from loader
        return
    if hasattr(loader, "iter_from"):
        yield from loader.iter_from(start_batch)
        return
    # The loader cannot seek: produce and drop the batches already trained on (same order, same RNG).
    logger.warning("data loader cannot seek; skipping %d batches to reach the resume position", start_batch)
    for index, batch in enumerate(loader):
        if index >= start_batch:
            yield batch


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    trainer: Trainer
    output_dir: Path
    checkpoint: Path | None
    iteration: int
    last_loss: float | None
    stopped_early: bool
    seconds: float
    images_per_s: float | None
    dataset_size: int
    data_root: Path | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _gpu_mem_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _kernel_choices(config: TrainConfig, trainer: Trainer) -> str:
    """Which implementation runs each fused part, as dino_fast.ops.backends resolves it for this device."""
    from dino_fast.ops import loss as loss_mod
    from dino_fast.ops.backends import available_backends, select_backend

    loss_backend = select_backend(
        config.backend, trainer.device, op="dino_loss", native_op=loss_mod.NATIVE_FORWARD_OP
    )
    attention = getattr(trainer.student.backbone, "attn_backend", config.attn_backend)
    usable = [name for name, reason in available_backends(trainer.device).items() if reason is None]
    return (
        f"dino_loss {loss_backend}, teacher EMA {trainer.ema.backend} (flat buffers), attention {attention} "
        f"(usable op backends here: {', '.join(usable)})"
    )


def _summary(
    config: TrainConfig,
    info: distributed.DistInfo,
    trainer: Trainer,
    loader: Any,
    data_root: Path | None,
    start_iteration: int,
    end_iteration: int,
) -> str:
    n_student = sum(p.numel() for p in trainer.student.parameters())
    total_batch = config.batch_size_per_gpu * info.world_size
    s = trainer.schedules
    lines = [
        "dino_fast.train",
        f"  world: {info.world_size} process(es) x {info.device} ({info.backend or 'single process'})",
        f"  model: {config.arch}/{config.patch_size}, head K={config.out_dim}, "
        f"{n_student / 1e6:.1f}M student params, norm_last_layer={config.norm_last_layer}, "
        f"drop_path={config.drop_path_rate}",
        f"  crops: 2x{config.global_crops_size}px {tuple(config.global_crops_scale)} + "
        f"{config.local_crops_number}x{config.local_crops_size}px {tuple(config.local_crops_scale)}",
        f"  data: {config.data} from {data_root if data_root is not None else '(synthetic)'}: "
        f"{getattr(loader, 'dataset_size', '?')} images, {trainer.steps_per_epoch} steps/epoch of "
        f"{total_batch} images",
        f"  schedule: {config.epochs} epochs = {trainer.total_iterations} steps; lr peak {s.lr.max():.3e} "
        f"(warmup {config.warmup_epochs} ep) -> {config.min_lr:g}; wd {config.weight_decay:g}->"
        f"{config.weight_decay_end:g}; momentum {config.momentum_teacher:g}->1; teacher temp "
        f"{config.warmup_teacher_temp:g}->{config.teacher_temp:g} over "
        f"{config.warmup_teacher_temp_epochs} ep; center momentum {config.center_momentum:g}",
        f"  optim: {type(trainer.optimizer).__name__}"
        f"{' (fused)' if trainer.optimizer.defaults.get('fused') else ''}, clip {config.clip_grad:g} "
        f"({'global norm' if config.clip_grad_mode == 'global' else 'per parameter'}), "
        f"freeze last layer {config.freeze_last_layer} ep, precision {trainer.precision}, "
        f"compile {config.compile_mode if config.compile else 'off'}",
        f"  kernels: {_kernel_choices(config, trainer)}",
        f"  run: iterations {start_iteration} -> {end_iteration}"
        f"{' (resumed)' if start_iteration else ''}; output {Path(config.output_dir).resolve()}",
    ]
    return "\n".join(lines)


def train(
    config: TrainConfig,
    *,
    on_finish: Callable[[TrainResult], None] | None = None,
) -> TrainResult:
    """Run (or resume) a DINO training as ``config`` says; returns where it ended.

    ``on_finish(result)`` runs on every rank after the last checkpoint is written and before the
    process group is torn down (e.g. the demo's k-NN evaluation of the teacher).
    """
    config.validate()
    config = dataclasses.replace(config, data=config.resolved_data())
    info = distributed.init_distributed(config.device)
    try:
        result = _train(config, info)
        if on_finish is not None:
            on_finish(result)
        return result
    finally:
        distributed.cleanup()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train(config: TrainConfig, info: distributed.DistInfo) -> TrainResult:
    out_dir = Path(config.output_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    ckpt_path = out_dir / CHECKPOINT_NAME

    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official code (the patch-embedding conv)
    _seed_everything(config.seed)
    # Rank 0 prepares the data (the demo builds its folder once); every rank learns the outcome,
    # so a failure stops all of them instead of leaving the others waiting in a collective.
    data_root, error = None, None
    if info.is_main:
        try:
            data_root = resolve_data_path(config)
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    data_root, error = distributed.broadcast_object((data_root, error))
    if error is not None:
        raise ConfigError(f"cannot prepare the training data: {error}")
    try:
        loader = build_loader(config, info, data_root)
    except (OSError, ValueError) as exc:
        where = "synthetic data" if data_root is None else str(data_root)
        raise ConfigError(f"--data {config.data} cannot read {where}: {exc}") from exc
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the data set has {getattr(loader, 'dataset_size', '?')} images, fewer than one step of "
            f"{config.batch_size_per_gpu} x {info.world_size} processes (the last partial batch is "
            "dropped, as in the official code): lower --batch_size_per_gpu or add images"
        )
    trainer = Trainer(
        config, info.device, world_size=info.world_size, rank=info.rank, steps_per_epoch=steps_per_epoch
    )

    start_iteration = 0
    if config.resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, map_location=info.device)
        start_iteration = trainer.load_state_dict(ckpt)
        rng = ckpt.get("rng")
        if isinstance(rng, list) and len(rng) == info.world_size and start_iteration == ckpt.get("iteration"):
            restore_rng_state(rng[info.rank], info.device)
        else:
            _seed_everything(config.seed + 1000 * info.rank + start_iteration)
            if info.is_main:
                logger.warning(
                    "checkpoint RNG state not usable here (other world size or epoch restart); reseeded"
                )
        if info.is_main:
            logger.info(
                "resumed from %s at iteration %d (epoch %d)", ckpt_path, start_iteration, ckpt["epoch"]
            )
        del ckpt
    else:
        if ckpt_path.is_file() and info.is_main:
            logger.warning("--no-resume: starting over; %s will be overwritten", ckpt_path)
        # Different drop-path draws on each rank from here on (the init above is shared).
        _seed_everything(config.seed + info.rank)

    total = trainer.total_iterations
    end_iteration = total if config.max_steps is None else min(total, config.max_steps)
    if info.is_main:
        logger.info("%s", _summary(config, info, trainer, loader, data_root, start_iteration, end_iteration))

    reporter = ProgressReporter(
        total_iterations=end_iteration,
        start_iteration=start_iteration,
        niter_per_ep=steps_per_epoch,
        jsonl_path=out_dir / "log.jsonl",
        enabled=info.is_main,
    )
    metrics = AsyncMetrics(info.device, config.batch_size_per_gpu * info.world_size)
    run = _RunState(config, info, trainer, reporter, metrics, out_dir, loader)
    start_wall = time.perf_counter()
    try:
        run.loop(start_iteration, end_iteration)
    finally:
        reporter.close()
    seconds = time.perf_counter() - start_wall
    return TrainResult(
        trainer=trainer,
        output_dir=out_dir,
        checkpoint=ckpt_path if ckpt_path.is_file() else None,
        iteration=run.iteration,
        last_loss=run.last_loss,
        stopped_early=run.iteration < end_iteration,
        seconds=seconds,
        images_per_s=run.images_per_s(),
        dataset_size=int(getattr(loader, "dataset_size", 0) or 0),
        data_root=data_root,
    )


class _RunState:
    """The training loop with its logging, checkpoint cadence and stop conditions."""

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
        lo, hi = epoch * s.niter_per_ep, (epoch + 1) * s.niter_per_ep
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
    def loop(self, start: int, end: int) -> None:
        trainer, metrics = self.trainer, self.metrics
        niter = trainer.steps_per_epoch
        it = start
        self.iteration = it
        metrics.start(it)
        while it < end:
            epoch = it // niter
            for batch in iterate_epoch(self.loader, epoch, it - epoch * niter):
                loss = trainer.step(batch, it)
                metrics.accumulate(loss)
                it += 1
                self.iteration = it
                epoch_done = it % niter == 0
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
                    f"len() of {niter} batches"
                )


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def _setup_logging(rank: int) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    _setup_logging(rank)
    try:
        result = train(config, on_finish=knn_evaluation if config.eval_knn else None)
    except NonFiniteLossError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        ckpt = Path(config.output_dir) / CHECKPOINT_NAME
        if ckpt.is_file():
            logger.error("interrupted; %s is intact: run the same command again to resume from it", ckpt)
        else:
            logger.error("interrupted before the first checkpoint; nothing to resume from")
        return 130
    except (ConfigError, distributed.DistributedSetupError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    except CheckpointWriteError as exc:
        logger.error("%s Then run the same command again: it resumes from the last checkpoint written.", exc)
        return 1
    if rank == 0:
        _print_final_summary(result)
    return 0


def knn_evaluation(result: TrainResult, *, k: int = 20) -> None:
    """k-NN top-1 of the trained teacher's backbone vs the same network at its random init.

    Runs when the training folder's parent also holds a ``test/`` or ``val/`` split (the demo's
    Fashion-MNIST, or an ImageNet-style ``.../train`` + ``.../val``); the accuracies go into
    ``result.extra``. Every rank takes part (feature extraction is sharded under torchrun).
    """
    from dino_fast.eval.knn import knn_accuracy

    if result.data_root is None:
        logger.warning("k-NN evaluation skipped: synthetic data has no labels")
        return
    root = result.data_root.parent
    test = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if test is None:
        logger.warning("k-NN evaluation skipped: %s has no test/ or val/ split beside train/", root)
        return
    trainer = result.trainer
    config = trainer.config
    torch.manual_seed(config.seed)  # the student backbone is the first thing a run draws
    random_init = build_backbone(config, drop_path_rate=0.0).to(trainer.device)
    kwargs: dict[str, Any] = {
        "device": trainer.device,
        "nb_knn": (k,),
        "image_size": config.global_crops_size,
        "resize_size": config.global_crops_size,
        "batch_size": 256,
        "num_workers": min(config.num_workers, 4),
    }
    started = time.perf_counter()
    trained = knn_accuracy(trainer.teacher.backbone, result.data_root, test, **kwargs)[k]
    baseline = knn_accuracy(random_init, result.data_root, test, **kwargs)[k]
    result.extra[f"k-NN top-1 (k={k}) on {test}"] = (
        f"teacher {trained:.2f}% vs random init {baseline:.2f}% ({time.perf_counter() - started:.0f}s)"
    )


def _print_final_summary(result: TrainResult) -> None:
    lines = [
        f"done: iteration {result.iteration} in {result.seconds:.1f}s"
        + (f", {result.images_per_s:.1f} images/s" if result.images_per_s else "")
        + (f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""),
        f"checkpoint: {result.checkpoint}",
        f"logs: {result.output_dir / 'log.jsonl'} (per interval), "
        f"{result.output_dir / 'log.txt'} (per epoch)",
    ]
    for key, value in result.extra.items():
        lines.append(f"{key}: {value}")
    print("\n".join(lines))  # the CLI's own summary on stdout
