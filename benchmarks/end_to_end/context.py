"""What every variant of a throughput run shares: the settings (a dino_fast TrainConfig), the
initial weights, and the schedules the timed iterations read."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from benchmarks.end_to_end.official_step import Hyper, LossSpec, ModelSpec
from dino_fast.models import is_convnet
from dino_fast.train import TrainConfig
from dino_fast.train.schedules import build_schedules

# Schedules need an epoch length; synthetic data has none. Steps are timed in epoch 1, past the
# official freeze_last_layer epoch, so the head's last layer trains as in the steady state.
STEPS_PER_EPOCH = 1000


@dataclass
class Context:
    """What every variant shares: the configuration, the initial weights, the schedules."""

    args: argparse.Namespace
    device: torch.device
    config: TrainConfig
    state_dict: dict[str, torch.Tensor]
    first_iteration: int

    def __post_init__(self) -> None:
        self._schedules = build_schedules(self.config, STEPS_PER_EPOCH, world_size=1)

    def hyper(self, iteration: int) -> Hyper:
        s = self._schedules.at(iteration)
        return Hyper(
            lr=s.lr,
            weight_decay=s.weight_decay,
            momentum=s.momentum,
            epoch=s.epoch,
            clip_grad=self.config.clip_grad,
            freeze_last_layer=self.config.freeze_last_layer,
        )

    def loss_spec(self) -> LossSpec:
        c = self.config
        return LossSpec(c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs, c.epochs)

    def model_spec(self, drop_path_rate: float) -> ModelSpec:
        c = self.config
        return ModelSpec(
            arch=c.arch,
            patch_size=c.patch_size,
            out_dim=c.out_dim,
            drop_path_rate=drop_path_rate,
            norm_last_layer=c.norm_last_layer,
        )


def bench_config(args: argparse.Namespace) -> TrainConfig:
    """The run's settings as a dino_fast TrainConfig: the official ViT-S recipe (the
    vit_small_imagenet preset) or, for a convnet, the official README's RN50 one (resnet50_imagenet),
    with this benchmark's shapes and ``--optimizer``."""
    preset = "resnet50_imagenet" if is_convnet(args.arch) else "vit_small_imagenet"
    overrides = {} if args.optimizer is None else {"optimizer": args.optimizer}
    config = TrainConfig.from_preset(
        preset,
        **overrides,
        arch=args.arch,
        patch_size=args.patch_size,
        batch_size_per_gpu=args.batch_size_per_gpu,
        local_crops_number=args.local_crops_number,
        global_crops_size=args.global_crops_size,
        local_crops_size=args.local_crops_size,
        out_dim=args.out_dim,
        data="synthetic",
        synthetic_size=STEPS_PER_EPOCH * args.batch_size_per_gpu,
        seed=args.seed,
        device=args.device,
    )
    config.validate()
    return config
