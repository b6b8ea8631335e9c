"""Plain-PyTorch DINO ops: the readable spec, the tests' oracle, and the "torch" backend.

Everything here follows docs/design.md ("The algorithm, precisely") and the official
DINO code line by line in meaning, with one difference of form: the official loss loops
over (teacher view, student view) pairs, while ``reference_dino_loss`` computes all pair terms with
one einsum and then drops the pairs where a view would be compared with itself.

Tensors are crop-major as in the official code: ``student_output`` is ``(ncrops * B, K)``
with rows ``[crop 0 of all B samples, crop 1 of all B samples, ...]`` and
``teacher_output`` is ``(n_global * B, K)``; teacher view t is the same image crop as
student view t for t < n_global.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 when any input is fp64 (the tests' oracle)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def teacher_probabilities(teacher_output: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Centered and sharpened teacher distribution q = softmax((t - c) / tau_t), no grad."""
    dtype = _compute_dtype(teacher_output, center)
    logits = (teacher_output.detach().to(dtype) - center.detach().to(dtype)) / teacher_temp
    return torch.softmax(logits, dim=-1)


def pair_mask(n_global: int, ncrops: int, device: torch.device | None = None) -> Tensor:
    """(n_global, ncrops) bool: True where teacher view t is paired with student view v (v != t)."""
    t = torch.arange(n_global, device=device).unsqueeze(1)
    v = torch.arange(ncrops, device=device).unsqueeze(0)
    return t != v


def reference_dino_loss(
    student_output: Tensor,
    teacher_output: Tensor,
    center: Tensor,
    *,
    ncrops: int,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
) -> Tensor:
    """DINO cross-entropy between teacher and student views; differentiable in the student.

    loss = mean over pairs (t, v), v != t, of mean_b( -sum_k q_t[b, k] * log_softmax(s_v[b] / tau_s)[k] )
    """
    rows, K = student_output.shape
    batch = rows // ncrops
    dtype = _compute_dtype(student_output, teacher_output, center)
    q = teacher_probabilities(teacher_output, center, teacher_temp).view(n_global, batch, K)
    log_p = torch.log_softmax(student_output.to(dtype) / student_temp, dim=-1).view(ncrops, batch, K)
    # cross[t, v] = mean_b -<q_t[b], log_p_v[b]>
    cross = -torch.einsum("tbk,vbk->tv", q, log_p) / batch
    return cross[pair_mask(n_global, ncrops, cross.device)].mean()


def reference_dino_loss_grad(
    student_output: Tensor,
    teacher_output: Tensor,
    center: Tensor,
    *,
    ncrops: int,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
) -> Tensor:
    """Closed-form d(loss)/d(student_output), the formula every fused backward implements.

    d/ds_v = (n_v * softmax(s_v / tau_s) - sum_{t != v} q_t) / (tau_s * n_pairs * B),
    where n_v is the number of teacher views paired with student view v.
    """
    rows, K = student_output.shape
    batch = rows // ncrops
    dtype = _compute_dtype(student_output, teacher_output, center)
    mask = pair_mask(n_global, ncrops, student_output.device).to(dtype)
    q = teacher_probabilities(teacher_output, center, teacher_temp).view(n_global, batch, K)
    p = torch.softmax(student_output.to(dtype) / student_temp, dim=-1).view(ncrops, batch, K)
    n_v = mask.sum(0).view(ncrops, 1, 1)
    paired_q = torch.einsum("tv,tbk->vbk", mask, q)
    grad = (n_v * p - paired_q) / (student_temp * mask.sum() * batch)
    return grad.reshape(rows, K)


def teacher_column_mean(teacher_output: Tensor) -> Tensor:
    """(1, K) mean over all teacher rows: this process's contribution to the new center."""
    return teacher_output.detach().to(_compute_dtype(teacher_output)).mean(dim=0, keepdim=True)


def center_update(center: Tensor, batch_center: Tensor, momentum: float) -> Tensor:
    """center <- m * center + (1 - m) * batch_center, where batch_center is the mean over all
    teacher rows of all ranks (DINOLoss all-reduces before calling this)."""
    return center * momentum + batch_center.to(center.dtype) * (1 - momentum)


@torch.no_grad()
def reference_ema_update_(
    teacher_params: Sequence[Tensor], student_params: Sequence[Tensor], momentum: float | Tensor
) -> None:
    """teacher <- m * teacher + (1 - m) * student for every pair, in place, computed in fp32
    (fp64 for fp64 teachers) whatever the storage dtypes."""
    for teacher, student in zip(teacher_params, student_params, strict=True):
        dtype = _compute_dtype(teacher)
        m = momentum.to(dtype) if isinstance(momentum, Tensor) else momentum
        teacher.copy_(teacher.to(dtype) * m + student.detach().to(dtype) * (1 - m))


# --- DINOv2-family ops (dino_fast.ops.sinkhorn, .cross_entropy, .koleo) ---------------------------


def sinkhorn_scalings(exp_logits: Tensor, n_iterations: int) -> tuple[Tensor, Tensor]:
    """The row and column scalings (r (K,), c (B,)) that Sinkhorn-Knopp puts on E (B, K), one process.

    dinov2 normalizes Q = E^T to total mass 1, then alternates: each prototype's row to 1/K, each
    sample's column to 1/B. Every step only rescales whole rows or columns, so
    Q = diag(r) E^T diag(c) / B, with r_k = 1 / (K sum_b E_bk c_b) and c_b = 1 / (sum_k E_bk r_k) from
    the previous c (starting at 1; the first normalization is a global factor the first row step
    cancels). Returned as (r, c); the assignment is E_bk r_k c_b.
    """
    rows, K = exp_logits.shape
    c = exp_logits.new_ones(rows)
    r = exp_logits.new_ones(K)
    for _ in range(n_iterations):
        r = 1.0 / (K * (exp_logits * c[:, None]).sum(dim=0))
        c = 1.0 / (exp_logits * r[None, :]).sum(dim=1)
    return r, c


def reference_sinkhorn_knopp(teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """dinov2's ``sinkhorn_knopp_teacher`` on one process, (B, K) -> (B, K) assignments (rows sum to 1).

    Computed from E = exp(t / tau - m_k), m_k the column max: scaling a prototype's column cancels in
    the first row normalization, so this equals dinov2 wherever dinov2's exp(t / tau) is finite, and
    stays finite where that overflows. fp32 (fp64 for fp64 input), as dinov2 returns fp32.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    logits = teacher_output.detach().to(_compute_dtype(teacher_output)) / teacher_temp
    exp_logits = torch.exp(logits - logits.amax(dim=0, keepdim=True))
    r, c = sinkhorn_scalings(exp_logits, n_iterations)
    return exp_logits * r[None, :] * c[:, None]


def reference_weighted_cross_entropy(
    student: Tensor, target: Tensor, weights: Tensor, *, student_temp: float
) -> Tensor:
    """sum_r w_r * ( -sum_k q_{r mod T, k} log_softmax(s_r / tau_s)_k ) over the R student rows, where
    the target q has T rows and R is a multiple of T; differentiable in ``student``."""
    dtype = _compute_dtype(student, target, weights)
    repeats = student.shape[0] // target.shape[0]
    q = target.detach().to(dtype).repeat(repeats, 1)
    log_p = torch.log_softmax(student.to(dtype) / student_temp, dim=-1)
    return -(weights.detach().to(dtype) * (q * log_p).sum(dim=-1)).sum()


def reference_weighted_cross_entropy_grad(
    student: Tensor, target: Tensor, weights: Tensor, *, student_temp: float
) -> Tensor:
    """Closed form of d(loss)/d(student): w_r / tau_s * (sum_k q_rk * p_r - q_r), p_r = softmax(s_r / tau_s)
    (the target rows need not sum to 1: a Sinkhorn assignment sums to 1 only up to rounding)."""
    dtype = _compute_dtype(student, target, weights)
    repeats = student.shape[0] // target.shape[0]
    q = target.detach().to(dtype).repeat(repeats, 1)
    p = torch.softmax(student.detach().to(dtype) / student_temp, dim=-1)
    w = weights.detach().to(dtype)[:, None] / student_temp
    return w * (q.sum(dim=-1, keepdim=True) * p - q)


def reference_koleo_loss(student_output: Tensor, eps: float = 1e-8, pdist_eps: float = 1e-8) -> Tensor:
    """KoLeo: -mean_i log(|| x_i - x_nn(i) + pdist_eps || + eps) on L2-normalized rows x, where nn(i) is the
    row of largest dot product with x_i other than i (dinov2's ``KoLeoLoss``). fp32 (fp64 for fp64)."""
    x = torch.nn.functional.normalize(student_output.to(_compute_dtype(student_output)), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-1)
        neighbour = dots.argmax(dim=1)
    distances = torch.nn.functional.pairwise_distance(x, x[neighbour], p=2, eps=pdist_eps)
    return -torch.log(distances + eps).mean()
