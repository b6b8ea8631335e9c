"""A drop-in for ``lightly.loss.DINOLoss`` with dino_fast's fused DINO loss inside.

Swap one import in a lightly training script::

    from dino_fast.lightly_adapter import DINOLoss   # was: from lightly.loss import DINOLoss

Same constructor (``output_dim, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
student_temp, center_momentum, center_mode``), same ``forward(teacher_out, student_out,
teacher_temp=None, epoch=None)`` on lists of (B, output_dim) views, same ``center`` buffer
(1, 1, output_dim) and state dict, same center update after every forward (the mean over all
teacher views and samples, averaged over ranks when torch.distributed is initialized). The loss is
lightly's: the mean over (teacher view t, student view s), s != t, of the cross-entropy between
softmax((t - center) / teacher_temp) and log_softmax(s / student_temp), computed by
``dino_fast.ops.dino_loss`` (fused, no (views, B, K) fp32 temporaries) with the teacher column sum
of the center update taken from the same pass. Needs at least as many student views as teacher
views (lightly's usual global + local crops); the keyword-only ``backend`` picks the kernels.
lightly itself is not imported here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dino_fast.ops.loss import dino_loss_with_stats

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """``lightly.loss.DINOLoss`` on the fused op; see the module docstring."""

    def __init__(
        self,
        output_dim: int = 65536,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_mode: str = "mean",
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are ['mean'].")
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.backend = backend
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(
            start=warmup_teacher_temp, end=teacher_temp, steps=warmup_teacher_temp_epochs
        )

    def _teacher_temperature(self, teacher_temp: float | None, epoch: int | None) -> float:
        if teacher_temp is not None:
            return float(teacher_temp)
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return float(self.teacher_temp)

    def forward(
        self,
        teacher_out: list[Tensor],
        student_out: list[Tensor],
        teacher_temp: float | None = None,
        epoch: int | None = None,
    ) -> Tensor:
        """Mean cross-entropy over the (teacher view, other student view) pairs; updates the center."""
        n_teacher, n_student = len(teacher_out), len(student_out)
        if n_student < 2 or not 1 <= n_teacher <= n_student:
            raise ValueError(
                f"DINOLoss needs at least two student views and no more teacher views than student views; "
                f"got {n_teacher} teacher and {n_student} student view(s)"
            )
        teacher = torch.cat(list(teacher_out))
        student = torch.cat(list(student_out))
        dtype = torch.promote_types(teacher.dtype, student.dtype)  # the fused op takes one dtype
        teacher, student = teacher.to(dtype), student.to(dtype)
        loss, _, _, column_sum = dino_loss_with_stats(
            student,
            teacher,
            self.center.reshape(1, -1),
            ncrops=n_student,
            n_global=n_teacher,
            teacher_temp=self._teacher_temperature(teacher_temp, epoch),
            student_temp=self.student_temp,
            backend=self.backend,
        )
        self._update_center_from_sum(column_sum, teacher.shape[0])
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """Momentum update of the center from teacher outputs (views, B, output_dim), as lightly's."""
        flat = teacher_out.reshape(-1, teacher_out.shape[-1])
        self._update_center_from_sum(flat.float().sum(dim=0), flat.shape[0])

    @torch.no_grad()
    def _update_center_from_sum(self, column_sum: Tensor, rows: int) -> None:
        batch_center = (column_sum.reshape(1, 1, -1) / rows).to(self.center.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            batch_center = batch_center / dist.get_world_size()
        self.center.data = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
