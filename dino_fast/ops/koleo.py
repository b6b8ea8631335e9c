"""KoLeo regularizer (dinov2's ``KoLeoLoss``): -mean_i log(distance from x_i to its nearest neighbour),
on L2-normalized rows.

Plain PyTorch on every backend: the nearest-neighbour search is one (n, n) matrix product over the
per-rank batch (n in the hundreds), which the BLAS / cuBLAS matmul already runs at full speed, and
the loss reads only n rows after it. The neighbour indices are found without gradient, as in dinov2
(argmax is piecewise constant); the gradient flows through the normalization and the distances.
"""

from __future__ import annotations

from torch import Tensor

from dino_fast.ops.reference import reference_koleo_loss

__all__ = ["koleo_loss"]


def koleo_loss(student_output: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo loss of ``student_output`` (n, D), n >= 2: fp32 (fp64 for fp64 input) whatever the input
    dtype, as dinov2 computes it with autocast off. ``eps`` guards the normalization and the log;
    the distance adds dinov2's fixed 1e-8 (``nn.PairwiseDistance(2, eps=1e-8)``)."""
    if student_output.dim() != 2 or student_output.shape[0] < 2:
        raise ValueError(
            f"student_output must be (n, D) with n >= 2 rows (each row needs a neighbour), got "
            f"{tuple(student_output.shape)}"
        )
    return reference_koleo_loss(student_output, eps=eps)
