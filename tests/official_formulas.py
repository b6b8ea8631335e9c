"""Direct float64 transcriptions of the official DINO code's formulas (main_dino.py), kept
in the official loop form so that dino_fast.ops.reference is checked against something written
independently of it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def official_dino_loss(
    student_output: Tensor,
    teacher_output: Tensor,
    center: Tensor,
    *,
    ncrops: int,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
) -> Tensor:
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def official_center_update(
    center: Tensor, teacher_output: Tensor, momentum: float, world_size: int = 1
) -> Tensor:
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
    batch_center = batch_center / (len(teacher_output) * world_size)
    return center * momentum + batch_center * (1 - momentum)


@torch.no_grad()
def official_ema(teacher_params: list[Tensor], student_params: list[Tensor], m: float) -> None:
    for param_q, param_k in zip(student_params, teacher_params, strict=True):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
