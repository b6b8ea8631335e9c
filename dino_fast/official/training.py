"""The official DINO training code (facebookresearch/dino ``main_dino.py`` and the ``utils.py``
functions it calls): the construction of student and teacher in ``train_dino``, one iteration of
``train_one_epoch``, and ``DINOLoss``, transcribed as the official code runs them.

It imports nothing from the rest of dino_fast, so that comparing dino_fast with it tests something.
What one process without a process group cannot run is left out where it stands: the DDP
wrappers (a world of one all-reduces nothing; the teacher's DDP only broadcasts its batch-norm
buffers) and ``.cuda()`` (the caller places the models).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DINOLoss",
    "OfficialArgs",
    "build_student_teacher",
    "cancel_gradients_last_layer",
    "clip_gradients",
    "fix_random_seeds",
    "get_params_groups",
    "has_batchnorms",
    "train_one_iteration",
    "trunc_normal_",
]


class OfficialArgs(Protocol):
    """The ``main_dino.py`` arguments these functions read (``dino_fast.config.TrainConfig`` has them)."""

    arch: str
    patch_size: int
    drop_path_rate: float
    out_dim: int
    use_bn_in_head: bool
    norm_last_layer: bool
    clip_grad: float
    freeze_last_layer: int


# ----------------------------------------------------------------------------------------------
# utils.py
# ----------------------------------------------------------------------------------------------


def fix_random_seeds(seed: int = 31) -> None:
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)


def trunc_normal_(
    tensor: Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> Tensor:
    """``utils._no_grad_trunc_normal_``: inverse-CDF sampling, one uniform draw per element (the
    official ViT and head initialize with this one, not with ``torch.nn.init.trunc_normal_``)."""

    def norm_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    if (mean < a - 2 * std) or (mean > b + 2 * std):
        warnings.warn(
            "mean is more than 2 std from [a, b] in nn.init.trunc_normal_. "
            "The distribution of values may be incorrect.",
            stacklevel=2,
        )
    with torch.no_grad():
        l = norm_cdf((a - mean) / std)  # noqa: E741 - the official name
        u = norm_cdf((b - mean) / std)
        tensor.uniform_(2 * l - 1, 2 * u - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        tensor.add_(mean)
        tensor.clamp_(min=a, max=b)
        return tensor


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


# ----------------------------------------------------------------------------------------------
# main_dino.py
# ----------------------------------------------------------------------------------------------


class DINOLoss(nn.Module):
    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)

        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)

        total_loss: Any = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue  # a view is never compared with itself
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world_size = 1  # official: always all-reduced; here only under a process group
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world_size = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world_size)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def build_student_teacher(vits: ModuleType, args: OfficialArgs) -> tuple[nn.Module, nn.Module]:
    """``train_dino``'s student and teacher, built in its order from ``vits`` (what the official
    ``vision_transformer.py`` provides: the ``vit_*`` constructors, ``DINOHead``, and
    ``MultiCropWrapper`` from ``utils.py``). Call it after ``fix_random_seeds(args.seed)``."""
    student = getattr(vits, args.arch)(patch_size=args.patch_size, drop_path_rate=args.drop_path_rate)
    teacher = getattr(vits, args.arch)(patch_size=args.patch_size)
    embed_dim = student.embed_dim
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
    with torch.no_grad():
        m = momentum_schedule[it]
        for param_q, param_k in zip(student.parameters(), teacher.parameters(), strict=True):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    return loss.item(), param_norms
