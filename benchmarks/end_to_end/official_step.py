"""The official DINO training step with replaceable parts: the baseline benchmarks/throughput.py
times, and the "tuned" variants it builds from the same code.

``StepOptions()`` runs the official step as ``train_one_epoch`` does, on the official models, loss
and helpers of dino_fast.official: explicit attention (a ViT) or torchvision's ResNet with
SyncBatchNorm, fp16 autocast + GradScaler, per-parameter clipping with two host syncs per
parameter, the ``--optimizer`` the run names in its default (foreach) form, the per-parameter EMA
loop, ``loss.item()`` every step and the logging block's ``cuda.synchronize()``. Each option replaces
one of those costs. docs/benchmarks.md says what each variant is and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_fast.models import RESNET_ARCHS, is_convnet
from dino_fast.official import vision_transformer
from dino_fast.official.loss import DINOLoss
from dino_fast.official.training import (
    build_optimizer,
    build_student_teacher,
    cancel_gradients_last_layer,
    clip_gradients,
    get_params_groups,
    update_teacher,
)
from dino_fast.train import clip_gradients_

__all__ = [
    "OFFICIAL",
    "OFFICIAL_FP32",
    "TUNED",
    "Hyper",
    "LossSpec",
    "ModelSpec",
    "SDPAAttention",
    "StepOptions",
    "TrainStep",
    "official_state_dict",
]


@dataclass(frozen=True)
class ModelSpec:
    """What both networks are (the ``main_dino.py`` arguments ``build_student_teacher`` reads):
    the same for every variant of a benchmark run. ``arch`` names a constructor of
    dino_fast.official.vision_transformer or a torchvision ResNet (``patch_size`` and
    ``drop_path_rate`` then shape nothing, as in the official code)."""

    arch: str = "vit_small"
    patch_size: int = 16
    out_dim: int = 65536
    drop_path_rate: float = 0.1
    norm_last_layer: bool = True
    use_bn_in_head: bool = False

    def __post_init__(self) -> None:
        is_vit = self.arch.startswith("vit_") and callable(getattr(vision_transformer, self.arch, None))
        if not is_vit and not self.is_convnet:
            raise ValueError(
                f"unknown arch {self.arch!r}: neither a dino_fast.official.vision_transformer model "
                f"nor a torchvision ResNet ({', '.join(RESNET_ARCHS)})"
            )

    @property
    def is_convnet(self) -> bool:
        return is_convnet(self.arch)


@dataclass(frozen=True)
class StepOptions:
    """Which implementation of each part of the step runs. The defaults are the official ones."""

    attn_impl: str = "explicit"  # "explicit" | "sdpa"
    amp_dtype: torch.dtype | None = torch.float16  # None: fp32
    grad_scaler: bool = True  # official: a GradScaler whenever fp16 autocast is on
    optimizer_impl: str = "default"  # "default" (foreach on CUDA) | "fused" (AdamW and SGD; LARS has none)
    clip_impl: str = "per_param_sync"  # "per_param_sync" | "foreach"
    ema_impl: str = "loop"  # "loop" | "foreach"
    compile_backbones: bool = False
    channels_last: bool = False  # convnets only: NHWC weights and crops (cuDNN's tensor-core layout)
    logging_sync: bool = True  # the official logging block: cuda.synchronize() + loss.item()

    def validate(self) -> None:
        choices = {
            "attn_impl": ("explicit", "sdpa"),
            "optimizer_impl": ("default", "fused"),
            "clip_impl": ("per_param_sync", "foreach"),
            "ema_impl": ("loop", "foreach"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.grad_scaler and self.amp_dtype != torch.float16:
            raise ValueError("a GradScaler only makes sense with fp16 autocast (amp_dtype=torch.float16)")


OFFICIAL = StepOptions()
OFFICIAL_FP32 = StepOptions(amp_dtype=None, grad_scaler=False)
TUNED = StepOptions(
    attn_impl="sdpa",
    amp_dtype=torch.bfloat16,
    grad_scaler=False,
    optimizer_impl="fused",
    clip_impl="foreach",
    ema_impl="foreach",
    channels_last=True,
)


@dataclass(frozen=True)
class LossSpec:
    """DINOLoss's teacher temperature schedule, per epoch (main_dino.py's defaults)."""

    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    epochs: int = 100


@dataclass(frozen=True)
class Hyper:
    """Schedule values of one iteration (the official loop reads them from its schedules)."""

    lr: float
    weight_decay: float
    momentum: float
    epoch: int = 1  # >= freeze_last_layer: the steady state, in which the last layer trains
    clip_grad: float = 3.0
    freeze_last_layer: int = 1


class SDPAAttention(vision_transformer.Attention):
    """The official attention through the fused SDPA kernel: the same weights and math, without
    materializing the ``(B, heads, N, N)`` scores."""

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x)), None


def use_sdpa(model: nn.Module) -> None:
    """Every official attention module of ``model`` becomes an ``SDPAAttention`` (no new state)."""
    for module in model.modules():
        if type(module) is vision_transformer.Attention:
            module.__class__ = SDPAAttention


class TrainStep:
    """One DINO iteration as the official ``train_one_epoch`` body runs it (``OFFICIAL``), or
    with some of its parts replaced (``StepOptions``). Both networks start from ``state_dict``
    (official student names: ``backbone.*``, ``head.*``)."""

    def __init__(
        self,
        spec: ModelSpec,
        options: StepOptions,
        state_dict: dict[str, Tensor],
        device: torch.device,
        ncrops: int,
        dtype: torch.dtype = torch.float32,
        loss: LossSpec = LossSpec(),
        optimizer: str = "adamw",
    ) -> None:
        """``dtype`` is that of the weights (fp32, as official; fp64 lets tests compare variants
        without Adam amplifying rounding noise in near-zero gradients); ``optimizer`` is the
        official ``--optimizer`` (adamw, sgd or lars)."""
        options.validate()
        self.options = options
        self.device = device
        student, teacher = build_student_teacher(spec)
        student.load_state_dict(state_dict)
        teacher.load_state_dict(state_dict)
        if options.attn_impl == "sdpa":
            use_sdpa(student)
            use_sdpa(teacher)
        self.student = student.to(device, dtype)
        self.teacher = teacher.to(device, dtype)
        self.channels_last = options.channels_last and spec.is_convnet
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        if options.compile_backbones:
            # dynamic=False: one static graph per crop resolution instead of a dynamic-shape
            # recompile when the second resolution arrives.
            self.student.backbone.compile(dynamic=False)
            self.teacher.backbone.compile(dynamic=False)
        self.dino_loss = DINOLoss(
            spec.out_dim,
            ncrops,
            loss.warmup_teacher_temp,
            loss.teacher_temp,
            loss.warmup_teacher_temp_epochs,
            loss.epochs,
        ).to(device, dtype)
        self.optimizer = _optimizer(optimizer, options.optimizer_impl, get_params_groups(self.student))
        self.scaler = torch.amp.GradScaler(device.type) if options.grad_scaler else None
        self._student_params = list(self.student.parameters())
        self._teacher_params = list(self.teacher.parameters())
        # Detached views share storage with the parameters, so they stay current across steps.
        self._student_detached = [p.detach() for p in self._student_params]

    def step(self, crops: Sequence[Tensor], hp: Hyper) -> float:
        """One iteration on ``crops`` (2 global crops first, then the local ones, each ``(B, 3, H, W)``);
        returns the loss as a Python float."""
        opts = self.options
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = hp.lr
            if i == 0:  # only the first group is regularized
                group["weight_decay"] = hp.weight_decay
        if self.channels_last:  # a no-op for crops already in NHWC
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        with torch.autocast(self.device.type, dtype=opts.amp_dtype, enabled=opts.amp_dtype is not None):
            teacher_output = self.teacher(list(crops[:2]))  # only the 2 global views pass through the teacher
            student_output = self.student(list(crops))
            loss = self.dino_loss(student_output, teacher_output, hp.epoch)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value}; the official loop stops training here")

        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            self._clip(hp.clip_grad)
            cancel_gradients_last_layer(hp.epoch, self.student, hp.freeze_last_layer)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            self._clip(hp.clip_grad)
            cancel_gradients_last_layer(hp.epoch, self.student, hp.freeze_last_layer)
            self.scaler.step(self.optimizer)
            self.scaler.update()

        if opts.ema_impl == "loop":
            update_teacher(self._student_params, self._teacher_params, hp.momentum)
        else:
            with torch.no_grad():
                torch._foreach_lerp_(self._teacher_params, self._student_detached, 1 - hp.momentum)

        if opts.logging_sync:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return loss.item()
        return loss_value

    def _clip(self, clip: float) -> None:
        if not clip:
            return
        if self.options.clip_impl == "per_param_sync":
            clip_gradients(self.student, clip)
        else:
            clip_gradients_(self.student.parameters(), clip)


def _optimizer(name: str, impl: str, groups: list[dict]) -> torch.optim.Optimizer:
    """The official ``--optimizer name`` over ``groups``; ``impl="fused"``: torch's single-kernel
    form where it has one (AdamW, SGD), the official per-parameter loop for LARS, which has none.
    The learning rate and weight decay are overwritten every step, as in the official loop."""
    if impl == "fused" and name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, fused=True)
    if impl == "fused" and name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, fused=True)
    return build_optimizer(SimpleNamespace(optimizer=name), groups)


def official_state_dict(spec: ModelSpec, seed: int = 0) -> dict[str, Tensor]:
    """The shared initial weights: an officially initialized student's state dict (CPU, fp32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student, _ = build_student_teacher(spec)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}
