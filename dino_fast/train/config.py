"""TrainConfig: every option of a training run, its flag's help, and the checks of its values.

Every flag of the official ``main_dino.py`` is a field here under its official name and with its
official default, so an existing DINO command line runs unchanged; dino_fast's own options (data
pipeline, precision, compile, fused-op backend, step limits, logging and checkpoint cadence) sit
on top. A field's name is its flag, and its metadata holds the flag's help and choices:
dino_fast.train.command_line generates the parser from them. README and docs/flags.md say how to
choose the values; dino_fast.train.presets holds the presets.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dino_fast.data import KINDS as DATA_KINDS
from dino_fast.errors import UserError
from dino_fast.models import BACKBONE_ARCHS, is_convnet
from dino_fast.models.attention import BACKENDS as ATTENTION_BACKENDS
from dino_fast.ops.backends import BACKENDS as OP_BACKENDS
from dino_fast.ops.loss import TEACHER_CENTERINGS
from dino_fast.train.precision import PRECISIONS
from dino_fast.train.presets import PRESETS

OFFICIAL = "official main_dino.py flags"
OURS = "dino_fast options"
# main_dino.py renames DeiT to ViT ("we changed the name DeiT-S for ViT-S to avoid confusions").
ARCH_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small", "deit_base": "vit_base"}
CLIP_GRAD_MODES = ("per_param", "global")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the option and how to fix it."""


def official(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field that is a main_dino.py flag, with its official default."""
    return dataclasses.field(default=default, metadata=dict(section=OFFICIAL, help=help, choices=choices))


def ours(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field that is one of dino_fast's own flags."""
    return dataclasses.field(default=default, metadata=dict(section=OURS, help=help, choices=choices))


@dataclass
class TrainConfig:
    arch: str = official(
        "vit_small",
        "ViT size or torchvision ResNet; deit_* are the official aliases",
        (*BACKBONE_ARCHS, *ARCH_ALIASES),
    )
    patch_size: int = official(16, "patch side in pixels")
    out_dim: int = official(65536, "output size K of the DINO head")
    norm_last_layer: bool = official(True, "weight-normalize the head's last layer")
    momentum_teacher: float = official(0.996, "teacher EMA momentum, raised to 1 by a cosine")
    use_bn_in_head: bool = official(False, "batch norm in the projection head")
    warmup_teacher_temp: float = official(0.04, "teacher temperature at the start of its warmup")
    teacher_temp: float = official(0.04, "teacher temperature after the warmup")
    warmup_teacher_temp_epochs: int = official(0, "epochs of linear teacher-temperature warmup")
    # None: not given; the precision field decides. True/False mean fp16/fp32.
    use_fp16: bool | None = official(None, "true: fp16 autocast + GradScaler, false: fp32")
    weight_decay: float = official(0.04, "weight decay at the start of its cosine")
    weight_decay_end: float = official(0.4, "weight decay at the end of its cosine")
    clip_grad: float = official(3.0, "clip each parameter's gradient norm to this (0: off)")
    batch_size_per_gpu: int = official(64, "images per process per step")
    epochs: int = official(100, "training epochs")
    freeze_last_layer: int = official(1, "epochs during which the head's last layer is not trained")
    lr: float = official(0.0005, "peak learning rate per 256 images of total batch")
    warmup_epochs: int = official(10, "epochs of linear learning-rate warmup")
    min_lr: float = official(1e-6, "learning rate at the end of the cosine")
    optimizer: str = official("adamw", "adamw for ViTs; sgd and lars for convnets", ("adamw", "sgd", "lars"))
    drop_path_rate: float = official(0.1, "stochastic depth rate of the student")
    global_crops_scale: tuple[float, float] = official((0.4, 1.0), "area fraction range of the global crops")
    local_crops_number: int = official(8, "number of local crops (0: no multi-crop)")
    local_crops_scale: tuple[float, float] = official((0.05, 0.4), "area fraction range of the local crops")
    data_path: str = official("/path/to/imagenet/train/", "ImageFolder root of the training images")
    output_dir: str = official(".", "where checkpoint.pth, log.txt and log.jsonl go")
    saveckp_freq: int = official(20, "also keep checkpointNNNN.pth every this many epochs (0: never)")
    seed: int = official(0, "random seed")
    num_workers: int = official(10, "data loading workers per process")
    dist_url: str = official("env://", "accepted for compatibility; torchrun's env:// is used")
    local_rank: int = official(0, "ignored: torchrun sets LOCAL_RANK")

    data: str = ours("auto", "input pipeline; auto: dali on a GPU when installed", ("auto", *DATA_KINDS))
    precision: str | None = ours(None, "autocast precision; unset: bf16 unless --use_fp16 says", PRECISIONS)
    compile: bool = ours(False, "torch.compile the student and teacher")
    compile_mode: str = ours("default", "torch.compile mode", COMPILE_MODES)
    backend: str | None = ours(None, "fused DINO loss and EMA backend; unset: the fastest", OP_BACKENDS)
    attn_backend: str = ours("auto", "attention implementation of the ViT", ATTENTION_BACKENDS)
    max_steps: int | None = ours(None, "stop at this global iteration (the schedules span --epochs)")
    global_crops_size: int = ours(224, "global crop side in pixels")
    local_crops_size: int = ours(96, "local crop side in pixels")
    blur_sigma: tuple[float, float] = ours((0.1, 2.0), "Gaussian blur sigma range in pixels")
    dali_color_ops: str = ours(
        "pil", "DALI colour jitter: pil (exact, PIL's 8-bit ops) or affine (faster)", ("pil", "affine")
    )
    clip_grad_mode: str = ours("per_param", "clip each gradient (official) or their norm", CLIP_GRAD_MODES)
    center_momentum: float = ours(0.9, "momentum of the teacher-output center (DINOLoss's)")
    teacher_centering: str = ours(
        "center",
        "teacher targets: center (DINO v1: softmax of t - EMA center) or sinkhorn_knopp (DINOv2; no center)",
        TEACHER_CENTERINGS,
    )
    log_interval: int = ours(10, "steps between log lines and log.jsonl records")
    ckpt_minutes: float = ours(20.0, "also write checkpoint.pth every this many minutes")
    resume: bool = ours(True, "continue from output_dir/checkpoint.pth when it exists")
    allow_pickle: bool = ours(False, "resume from a checkpoint holding Python objects (runs its code)")
    dist_timeout_minutes: float = ours(10.0, "how long ranks wait for a silent peer before the run ends")
    device: str = ours("auto", "auto (cuda if present), cuda or cpu")
    synthetic_size: int = ours(1281167, "images per epoch per process of --data synthetic")
    demo_max_per_class: int = ours(0, "Fashion-MNIST images per class in the demo (0: all)")
    eval_knn: bool = ours(False, "after training, k-NN of the teacher vs its random init")
    preset: str | None = ours(None, "start from these settings; flags given override them", tuple(PRESETS))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The preset's config with ``overrides`` applied (field names as keyword arguments)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose {_one_of(tuple(PRESETS))}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; see `python -m dino_fast.train --help`")
        on_gpu = resolve_device(overrides.get("device", "auto")).type == "cuda"
        return cls(**{**PRESETS[name](on_gpu=on_gpu), **overrides, "preset": name})

    def __post_init__(self) -> None:
        self.global_crops_scale = tuple(float(x) for x in self.global_crops_scale)  # type: ignore[assignment]
        self.local_crops_scale = tuple(float(x) for x in self.local_crops_scale)  # type: ignore[assignment]
        self.blur_sigma = tuple(float(x) for x in self.blur_sigma)  # type: ignore[assignment]
        self.arch = ARCH_ALIASES.get(self.arch, self.arch)

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops_number

    def resolved_precision(self) -> str:
        """The precision that runs: ``precision`` if given, else from ``use_fp16``, else bf16."""
        if self.precision is not None and self.use_fp16 is not None:
            implied = "fp16" if self.use_fp16 else "fp32"
            if self.precision != implied:
                raise ConfigError(
                    f"--precision {self.precision} contradicts --use_fp16 {str(self.use_fp16).lower()} "
                    f"(which means {implied}); pass only one of them"
                )
        if self.precision is not None:
            return self.precision
        if self.use_fp16 is not None:
            return "fp16" if self.use_fp16 else "fp32"
        return "bf16"

    def resolved_data(self) -> str:
        """``data``, with ``auto`` resolved: DALI on a CUDA device when it is installed, else torchvision."""
        if self.data != "auto":
            return self.data
        on_gpu = self.resolved_device().type == "cuda"
        return "dali" if on_gpu and importlib.util.find_spec("nvidia.dali") is not None else "torchvision"

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid option and the fix (every check of a value is here)."""
        for field in dataclasses.fields(self):
            choices, value = field.metadata["choices"], getattr(self, field.name)
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f"--{field.name} {value!r}: choose {_one_of(choices)}")
            numbers = value if isinstance(value, tuple) else (value,)
            if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):
                raise ConfigError(f"--{field.name} {value}: give a finite number")
        for name in ("patch_size", "out_dim", "batch_size_per_gpu", "epochs", "log_interval"):
            _at_least(name, getattr(self, name), 1)
        for name in (
            *("local_crops_number", "warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer"),
            *("saveckp_freq", "num_workers", "lr", "min_lr", "weight_decay", "weight_decay_end"),
            *("clip_grad", "drop_path_rate"),
        ):
            _at_least(name, getattr(self, name), 0)
        if self.max_steps is not None:
            _at_least("max_steps", self.max_steps, 1)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(
                f"--warmup_epochs {self.warmup_epochs} is longer than --epochs {self.epochs}; "
                "the cosine schedule needs at least one iteration after the warmup"
            )
        if self.warmup_teacher_temp_epochs > self.epochs:
            raise ConfigError(
                f"--warmup_teacher_temp_epochs {self.warmup_teacher_temp_epochs} exceeds "
                f"--epochs {self.epochs}"
            )
        for name in ("momentum_teacher", "center_momentum"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} must be in [0, 1] (got {getattr(self, name)})")
        for name in ("warmup_teacher_temp", "teacher_temp", "ckpt_minutes", "dist_timeout_minutes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be > 0 (got {getattr(self, name)})")
        for name in ("global_crops_scale", "local_crops_scale"):
            scale = getattr(self, name)
            if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise ConfigError(
                    f"--{name} takes two numbers 0 < min <= max <= 1, the area fraction of the source "
                    f"image a crop covers (got {' '.join(map(str, scale))})"
                )
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(
                "--blur_sigma takes two numbers 0 < min <= max (pixels), got "
                f"{' '.join(map(str, self.blur_sigma))}"
            )
        if is_convnet(self.arch) and self.local_crops_number * self.batch_size_per_gpu == 1:
            raise ConfigError(
                f"--arch {self.arch} with one local crop of one image per process: its batch norms "
                "would normalize a single sample; raise --batch_size_per_gpu or --local_crops_number "
                "(or use --local_crops_number 0)"
            )
        for name in ("global_crops_size", "local_crops_size"):
            if getattr(self, name) < self.patch_size and not is_convnet(self.arch):
                raise ConfigError(
                    f"--{name} {getattr(self, name)} is smaller than --patch_size {self.patch_size}: "
                    "a crop must hold at least one patch"
                )
        self.resolved_precision()
        if self.data == "synthetic":
            _at_least("synthetic_size", self.synthetic_size, 1)
        elif not (self.preset == "demo" and not self.data_path) and not Path(self.data_path).is_dir():
            raise ConfigError(
                f"--data_path {self.data_path!r} is not a directory. Point it at an ImageFolder root "
                "(one sub-folder per class of JPEG/PNG files, e.g. imagenet/train), or use --data "
                "synthetic to measure speed without images, or --preset demo for Fashion-MNIST"
            )
        self.resolved_device()


def _one_of(choices: tuple[str, ...]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


def _at_least(name: str, value: float, low: int) -> None:
    if value < low:
        raise ConfigError(f"--{name} must be >= {low} (got {value})")


def resolve_device(device: str) -> torch.device:
    """``device`` as a torch.device, ``auto`` meaning CUDA when a GPU is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a torch device: {exc}") from exc
