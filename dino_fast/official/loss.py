"""The official DINO loss (facebookresearch/dino ``main_dino.py``: ``DINOLoss``), in the official
loop form: one cross-entropy term per (teacher view, student view) pair. ``dino_loss`` and
``update_center`` are the two halves of ``DINOLoss.forward`` as functions, so that fp64 checks of
dino_fast's spec and the loss benchmark run the same code as the module."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOLoss", "dino_loss", "update_center"]


def dino_loss(
    student_output: Tensor,
    teacher_output: Tensor,
    center: Tensor,
    *,
    ncrops: int,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
) -> Tensor:
    """``DINOLoss.forward`` before the center update, at one teacher temperature. ``n_global`` is
    the number of teacher views (2 in the official code)."""
    student_out = student_output / student_temp
    student_out = student_out.chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1)
    teacher_out = teacher_out.detach().chunk(n_global)

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
    return total_loss


@torch.no_grad()
def update_center(center: Tensor, teacher_output: Tensor, momentum: float) -> Tensor:
    """``DINOLoss.update_center``: the new center, an EMA of the mean teacher output of every rank."""
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
    world_size = 1  # official: always all-reduced; here only under a process group
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_center)
        world_size = dist.get_world_size()
    batch_center = batch_center / (len(teacher_output) * world_size)
    return center * momentum + batch_center * (1 - momentum)


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
        # a lower teacher temperature at first, because a high one makes training unstable early
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        """Cross-entropy between softmax outputs of the teacher and student networks."""
        temp = self.teacher_temp_schedule[epoch]
        total_loss = dino_loss(
            student_output,
            teacher_output,
            self.center,
            ncrops=self.ncrops,
            teacher_temp=temp,
            student_temp=self.student_temp,
        )
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        self.center = update_center(self.center, teacher_output, self.center_momentum)
