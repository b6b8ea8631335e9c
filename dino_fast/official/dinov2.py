"""dinov2's loss formulas (dinov2/loss/*.py) transcribed in dinov2's own form (materialized
Q = exp(t / tau)^T, in-place normalizations, explicit loops): the tests' reference for
dino_fast's streaming ops and drop-in modules, run in float64, and the eager baseline the
benchmarks time. Inputs keep their dtype (dinov2 casts the teacher to fp32 first; callers do).
Single process: the all-reduces are identities, the world size 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dinov2_sinkhorn_knopp(teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """DINOLoss.sinkhorn_knopp_teacher (and iBOT's: its B is the masked-patch count, which cancels)."""
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def dinov2_dino_loss(
    student_output_list: list[Tensor], teacher_list: list[Tensor], student_temp: float
) -> Tensor:
    """DINOLoss.forward."""
    total_loss = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_list:
            total_loss -= torch.sum(t * lsm, dim=-1).mean()
    return total_loss


def dinov2_ibot_forward(s: Tensor, t: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """iBOTPatchLoss.forward: tokens (B, N, K), masks (B, N)."""
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    loss = torch.sum(loss * masks.to(loss.dtype), dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
    return -loss.mean()


def dinov2_ibot_forward_masked(
    s: Tensor, t: Tensor, masks: Tensor, student_temp: float, n_masked_patches=None, masks_weight=None
) -> Tensor:
    """iBOTPatchLoss.forward_masked (the plain-PyTorch lossfunc)."""
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    if masks_weight is None:
        masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    loss = loss * masks_weight
    return -loss.sum() / masks.shape[0]


def dinov2_koleo(student_output: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeoLoss.forward."""
    x = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    n = x.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, nearest = torch.max(dots, dim=1)
    distances = torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[nearest])
    return -torch.log(distances + eps).mean()


def dinov2_center_step(center: Tensor, teacher_sum: Tensor, rows: int, momentum: float) -> Tensor:
    """reduce_center_update + apply_center_update, world size 1."""
    return center * momentum + teacher_sum / rows * (1 - momentum)
