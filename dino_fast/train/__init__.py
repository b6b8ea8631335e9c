"""DINO training: ``python -m dino_fast.train`` or ``torchrun --nproc_per_node=N -m dino_fast.train``."""

from dino_fast.train.config import ConfigError, TrainConfig, parse_args
from dino_fast.train.trainer import (
    DATA_DTYPES,
    NonFiniteLossError,
    Trainer,
    TrainResult,
    build_augmentation,
    build_dino_model,
    build_loader,
    clip_gradients_,
    get_params_groups,
    main,
    train,
)

__all__ = [
    "DATA_DTYPES",
    "ConfigError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_augmentation",
    "build_dino_model",
    "build_loader",
    "clip_gradients_",
    "get_params_groups",
    "main",
    "parse_args",
    "train",
]
