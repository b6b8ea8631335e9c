"""DINO training: ``python -m dino_fast.train`` or ``torchrun --nproc_per_node=N -m dino_fast.train``.

    from dino_fast.train import TrainConfig, train

    result = train(TrainConfig.from_preset("demo", output_dir="runs/demo"))

One concept per module: config (TrainConfig, every flag), presets, command_line (the parser
generated from TrainConfig), schedules, model (student and teacher), optim (parameter groups,
LARS, clipping), precision, trainer (the step), loader (the data), metrics and progress (logging
without host syncs), loop (the training loop), summary, run (``train``), knn_hook, cli (``main``).
"""

from dino_fast.train.cli import main
from dino_fast.train.command_line import parse_args
from dino_fast.train.config import ConfigError, TrainConfig
from dino_fast.train.loader import build_augmentation, build_loader
from dino_fast.train.loop import NonFiniteLossError
from dino_fast.train.model import build_dino_model
from dino_fast.train.optim import clip_gradients_, get_params_groups
from dino_fast.train.precision import DATA_DTYPES
from dino_fast.train.run import TrainResult, train
from dino_fast.train.trainer import Trainer

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
