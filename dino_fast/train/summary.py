"""The summary a run logs before its first step: world, model, data, schedules, kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dino_fast import distributed, models
from dino_fast.ops import cross_entropy, sinkhorn
from dino_fast.ops import loss as loss_op
from dino_fast.ops.backends import available_backends, select_backend
from dino_fast.train.config import TrainConfig
from dino_fast.train.trainer import Trainer


def kernel_choices(config: TrainConfig, trainer: Trainer) -> str:
    """Which implementation runs each fused part, as dino_fast.ops.backends resolves it for this device."""

    def backend(op: str, native_op: str) -> str:
        return select_backend(config.backend, trainer.device, op=op, native_op=native_op)

    if config.teacher_centering == "sinkhorn_knopp":
        loss = (
            f"sinkhorn_knopp {backend('sinkhorn_knopp', sinkhorn.NATIVE_OP)}, weighted_cross_entropy "
            f"{backend('weighted_cross_entropy', cross_entropy.NATIVE_FORWARD_OP)}"
        )
    else:
        loss = f"dino_loss {backend('dino_loss', loss_op.NATIVE_FORWARD_OP)}"
    attention = ""
    if not models.is_convnet(config.arch):
        attention = f", attention {getattr(trainer.student.backbone, 'attn_backend', config.attn_backend)}"
    usable = [name for name, reason in available_backends(trainer.device).items() if reason is None]
    return (
        f"{loss}, teacher EMA {trainer.ema.backend} (flat buffers){attention} "
        f"(usable op backends here: {', '.join(usable)})"
    )


def backbone_description(config: TrainConfig, trainer: Trainer, world_size: int) -> str:
    if not models.is_convnet(config.arch):
        return f"{config.arch}/{config.patch_size}, drop_path={config.drop_path_rate}"
    norms = "synchronized across processes" if world_size > 1 else "over this process's batch"
    layout = "channels_last" if trainer.channels_last else "NCHW"
    return f"{config.arch} (torchvision; batch norms {norms}, {layout}, one call per crop size)"


def run_summary(
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
    centering = f"center momentum {config.center_momentum:g}"
    if config.teacher_centering == "sinkhorn_knopp":
        centering = "Sinkhorn-Knopp teacher targets (no center)"
    s = trainer.schedules
    lines = [
        "dino_fast.train",
        f"  world: {info.world_size} process(es) x {info.device} ({info.backend or 'single process'})",
        f"  model: {backbone_description(config, trainer, info.world_size)}, head K={config.out_dim}, "
        f"{n_student / 1e6:.1f}M student params, norm_last_layer={config.norm_last_layer}",
        f"  crops: 2x{config.global_crops_size}px {tuple(config.global_crops_scale)} + "
        f"{config.local_crops_number}x{config.local_crops_size}px {tuple(config.local_crops_scale)}",
        f"  data: {config.data} from {data_root if data_root is not None else '(synthetic)'}: "
        f"{getattr(loader, 'dataset_size', '?')} images, {trainer.steps_per_epoch} steps/epoch of "
        f"{total_batch} images",
        f"  schedule: {config.epochs} epochs = {trainer.total_iterations} steps; lr peak {s.lr.max():.3e} "
        f"(warmup {config.warmup_epochs} ep) -> {config.min_lr:g}; wd {config.weight_decay:g}->"
        f"{config.weight_decay_end:g}; momentum {config.momentum_teacher:g}->1; teacher temp "
        f"{config.warmup_teacher_temp:g}->{config.teacher_temp:g} over "
        f"{config.warmup_teacher_temp_epochs} ep; {centering}",
        f"  optim: {type(trainer.optimizer).__name__}"
        f"{' (fused)' if trainer.optimizer.defaults.get('fused') else ''}, clip {config.clip_grad:g} "
        f"({'global norm' if config.clip_grad_mode == 'global' else 'per parameter'}), "
        f"freeze last layer {config.freeze_last_layer} ep, precision {trainer.precision}, "
        f"compile {config.compile_mode if config.compile else 'off'}",
        f"  kernels: {kernel_choices(config, trainer)}",
        f"  run: iterations {start_iteration} -> {end_iteration}"
        f"{' (resumed)' if start_iteration else ''}; output {Path(config.output_dir).resolve()}",
    ]
    return "\n".join(lines)
