"""The official DINO training code (facebookresearch/dino ``main_dino.py`` and the ``utils.py``
functions it calls): the construction of student and teacher in ``train_dino``, the schedules and
one iteration of ``train_one_epoch``, transcribed as the official code runs them.

It imports nothing from the rest of dino_fast, so that comparing dino_fast with it tests something.
What one process without a process group cannot run is left out where it stands: the DDP
wrappers (a world of one all-reduces nothing; the teacher's DDP only broadcasts its batch-norm
buffers) and ``.cuda()`` (the caller places the models).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from dino_fast.official import vision_transformer as vits
from dino_fast.official.loss import DINOLoss

__all__ = [
    "LARS",
    "OfficialArgs",
    "build_optimizer",
    "build_student_teacher",
    "cancel_gradients_last_layer",
    "clip_gradients",
    "cosine_scheduler",
    "fix_random_seeds",
    "get_params_groups",
    "has_batchnorms",
    "train_one_iteration",
    "update_teacher",
]


class OfficialArgs(Protocol):
    """The ``main_dino.py`` arguments these functions read (dino_fast's training config has them)."""

    arch: str
    patch_size: int
    drop_path_rate: float
    out_dim: int
    use_bn_in_head: bool
    norm_last_layer: bool
    optimizer: str
    clip_grad: float
    freeze_last_layer: int


# ----------------------------------------------------------------------------------------------
# utils.py
# ----------------------------------------------------------------------------------------------


def fix_random_seeds(seed: int = 31) -> None:
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)


def has_batchnorms(model: nn.Module) -> bool:
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(module, bn_types) for _, module in model.named_modules())


def get_params_groups(model: nn.Module) -> list[dict[str, Any]]:
    regularized = []
    not_regularized = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # we do not regularize biases nor Norm parameters
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """Each gradient on its own scaled to norm ``clip`` where it is larger. Every parameter costs
    two host syncs (``.item()`` and the Python ``<`` on a device tensor)."""
    norms = []
    for _name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


class LARS(torch.optim.Optimizer):
    """``utils.LARS``: SGD with momentum, each multi-dimensional parameter's update rescaled by
    ``eta * |p| / |dp|`` (biases and norms get neither weight decay nor the adaptation)."""

    def __init__(
        self,
        params: Any,
        lr: float = 0,
        weight_decay: float = 0,
        momentum: float = 0.9,
        eta: float = 0.001,
        weight_decay_filter: Any = None,
        lars_adaptation_filter: Any = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            eta=eta,
            weight_decay_filter=weight_decay_filter,
            lars_adaptation_filter=lars_adaptation_filter,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad

                if dp is None:
                    continue

                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])

                if p.ndim != 1:
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one),
                        one,
                    )
                    dp = dp.mul(q)

                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)

                p.add_(mu, alpha=-g["lr"])


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)

    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = np.array(
        [
            final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / len(iters)))
            for i in iters
        ]
    )

    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# ----------------------------------------------------------------------------------------------
# main_dino.py
# ----------------------------------------------------------------------------------------------


def build_student_teacher(args: OfficialArgs) -> tuple[nn.Module, nn.Module]:
    """``train_dino``'s student and teacher, built in its order. Call it after
    ``fix_random_seeds(args.seed)`` for the official initial weights."""
    if args.arch in vits.__dict__:
        student = vits.__dict__[args.arch](patch_size=args.patch_size, drop_path_rate=args.drop_path_rate)
        teacher = vits.__dict__[args.arch](patch_size=args.patch_size)
        embed_dim = student.embed_dim
    else:
        # main_dino.py imports torchvision at the top; only convnets need it here, so that a
        # machine without torchvision still runs the ViT comparisons.
        from torchvision import models as torchvision_models

        if args.arch not in torchvision_models.__dict__:
            raise ValueError(f"Unknow architecture: {args.arch}")
        student = torchvision_models.__dict__[args.arch]()
        teacher = torchvision_models.__dict__[args.arch]()
        embed_dim = student.fc.weight.shape[1]
    student = vits.MultiCropWrapper(
        student,
        vits.DINOHead(
            embed_dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer
        ),
    )
    teacher = vits.MultiCropWrapper(teacher, vits.DINOHead(embed_dim, args.out_dim, args.use_bn_in_head))
    if has_batchnorms(student):
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def build_optimizer(args: OfficialArgs, params_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """``train_dino``'s ``--optimizer`` choice over ``get_params_groups(student)``."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params_groups)  # to use with ViTs
    if args.optimizer == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9)  # lr is set by scheduler
    if args.optimizer == "lars":
        return LARS(params_groups)  # to use with convnet and large batches
    raise ValueError(f"unknown optimizer {args.optimizer}")


def train_one_iteration(
    student: nn.Module,
    teacher: nn.Module,
    dino_loss: DINOLoss,
    images: Sequence[Tensor],
    optimizer: torch.optim.Optimizer,
    lr_schedule: np.ndarray,
    wd_schedule: np.ndarray,
    momentum_schedule: np.ndarray,
    it: int,
    epoch: int,
    fp16_scaler: torch.amp.GradScaler | None,
    args: OfficialArgs,
) -> tuple[float, list[float] | None]:
    """The body of ``train_one_epoch``'s loop at global iteration ``it`` of ``epoch``. Returns the
    loss (read with ``.item()``, as the official logging does) and the gradient norms
    ``clip_gradients`` measured (None without clipping)."""
    for i, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = lr_schedule[it]
        if i == 0:  # only the first group is regularized
            param_group["weight_decay"] = wd_schedule[it]

    with torch.autocast(images[0].device.type, dtype=torch.float16, enabled=fp16_scaler is not None):
        teacher_output = teacher(list(images[:2]))  # only the 2 global views pass through the teacher
        student_output = student(list(images))
        loss = dino_loss(student_output, teacher_output, epoch)

    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"Loss is {loss.item()}, stopping training")  # official: sys.exit(1)

    optimizer.zero_grad()
    param_norms = None
    if fp16_scaler is None:
        loss.backward()
        if args.clip_grad:
            param_norms = clip_gradients(student, args.clip_grad)
        cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        optimizer.step()
    else:
        fp16_scaler.scale(loss).backward()
        if args.clip_grad:
            fp16_scaler.unscale_(optimizer)  # unscale the gradients of optimizer's assigned params in-place
            param_norms = clip_gradients(student, args.clip_grad)
        cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        fp16_scaler.step(optimizer)
        fp16_scaler.update()

    # EMA update for the teacher (official: student.module and teacher_without_ddp, the bare modules)
    update_teacher(student.parameters(), teacher.parameters(), momentum_schedule[it])
    return loss.item(), param_norms


@torch.no_grad()
def update_teacher(student_params: Iterable[Tensor], teacher_params: Iterable[Tensor], m: float) -> None:
    """``train_one_epoch``'s EMA update for the teacher: ``teacher = m * teacher + (1 - m) * student``."""
    for param_q, param_k in zip(student_params, teacher_params, strict=True):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
