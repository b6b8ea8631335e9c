"""The DINO v1 multi-crop cross-entropy against teacher targets given as probabilities (the
Sinkhorn-Knopp assignments of ``DINOLoss(teacher_centering="sinkhorn_knopp")``), and the shape
check of a crop-major DINO batch that dino_fast.ops.loss shares.

    loss = mean over pairs (t, v), v != t, of mean_b( -sum_k q_t[b, k] * log_softmax(s_v[b] / tau_s)[k] )

The cross-entropy is linear in q, so each student view meets one target, the sum of the teacher
views paired with it: the other global views for a global view, every global view for a local
one. That is two passes of the fused ``weighted_cross_entropy`` op (global views, local views),
each row weighted 1 / (n_pairs * B), with the same student side as the fused ``dino_loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dino_fast.ops.cross_entropy import weighted_cross_entropy

__all__ = ["dino_loss_from_targets", "validate_multicrop_shapes"]


def validate_multicrop_shapes(
    student_output: Tensor,
    teacher: Tensor,
    *,
    ncrops: int,
    n_global: int,
    teacher_name: str = "teacher_output",
) -> int:
    """Raise a ValueError/TypeError naming the problem and the fix unless ``student_output``
    (ncrops * B, K) and ``teacher`` (n_global * B, K) form a crop-major DINO batch; returns B."""
    if not isinstance(student_output, Tensor) or not isinstance(teacher, Tensor):
        raise TypeError(f"student_output and {teacher_name} must be torch.Tensors")
    if student_output.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"student_output and {teacher_name} must be 2-D (rows, K) head outputs; got shapes "
            f"{tuple(student_output.shape)} and {tuple(teacher.shape)}"
        )
    if ncrops < 2:
        raise ValueError(f"ncrops must be >= 2 (each teacher view needs another student view), got {ncrops}")
    if not 1 <= n_global <= ncrops:
        raise ValueError(f"n_global must be in [1, ncrops={ncrops}], got {n_global}")
    rows, dim = student_output.shape
    if rows == 0 or rows % ncrops:
        raise ValueError(
            f"student_output has {rows} rows, not a positive multiple of ncrops={ncrops}: it must be "
            "crop-major (ncrops * B, K), all B samples of crop 0 first"
        )
    batch = rows // ncrops
    if teacher.shape[1] != dim:
        raise ValueError(f"{teacher_name} has K={teacher.shape[1]} columns, student_output K={dim}")
    if teacher.shape[0] != n_global * batch:
        raise ValueError(
            f"{teacher_name} has {teacher.shape[0]} rows; with B={batch} samples (student rows "
            f"{rows} / ncrops {ncrops}) it needs n_global * B = {n_global * batch}"
        )
    return batch


def dino_loss_from_targets(
    student_output: Tensor,
    teacher_targets: Tensor,
    *,
    ncrops: int,
    student_temp: float = 0.1,
    n_global: int = 2,
    backend: str | None = None,
) -> Tensor:
    """DINO cross-entropy between the teacher targets and the student views.

    ``student_output`` is crop-major ``(ncrops * B, K)``, ``teacher_targets`` ``(n_global * B, K)``
    probabilities (teacher view t is student view t and the two are not paired). Returns a 0-dim fp32
    loss (fp64 for fp64 students), differentiable in ``student_output`` only. ``backend`` as for
    ``weighted_cross_entropy``.
    """
    batch = validate_multicrop_shapes(
        student_output, teacher_targets, ncrops=ncrops, n_global=n_global, teacher_name="teacher_targets"
    )
    q = teacher_targets.detach().reshape(n_global, batch, -1)
    global_students, local_students = student_output.split(
        [n_global * batch, (ncrops - n_global) * batch]
    )  # split, not two slices: its backward is one cat of the two gradients
    passes = []
    if n_global > 1:
        paired = [sum(q[t] for t in range(n_global) if t != v) for v in range(n_global)]
        passes.append((global_students, torch.cat(paired)))
    if ncrops > n_global:
        passes.append((local_students, q.sum(dim=0)))
    n_pairs = n_global * (ncrops - 1)
    weight_dtype = torch.float64 if student_output.dtype == torch.float64 else torch.float32
    loss = None
    for students, target in passes:
        weights = students.new_full((students.shape[0],), 1.0 / (n_pairs * batch), dtype=weight_dtype)
        term = weighted_cross_entropy(students, target, weights, student_temp=student_temp, backend=backend)
        loss = term if loss is None else loss + term
    return loss
