"""Drop-ins for dinov2's loss modules (``dinov2.loss``), with dino_fast's fused ops inside.

A dinov2 training script swaps one import::

    from dino_fast.dinov2 import DINOLoss, iBOTPatchLoss, KoLeoLoss   # was: from dinov2.loss import ...

Class names, constructors, methods, buffers and the asynchronous center update are dinov2's:
``update_center`` sums the teacher rows and starts their all-reduce without waiting,
``apply_center_update`` (called by ``softmax_center_teacher``) waits and applies the momentum step.
``sinkhorn_knopp_teacher`` all-reduces its sums across ranks when torch.distributed is initialized,
so each rank's targets equal Sinkhorn-Knopp on the whole global batch. What differs: every module
takes a keyword-only ``backend`` (dino_fast.ops.backends); Sinkhorn-Knopp stays finite where
exp(t / tau) overflows fp32 (dinov2 returns inf/NaN there) and needs n_iterations >= 1; the
teacher sums of the center update are accumulated and kept in fp32 whatever the teacher dtype;
without torch.distributed, iBOT's ``sinkhorn_knopp_teacher`` runs (dinov2's all-reduces its
``n_masked_patches_tensor`` unconditionally, so it needs a process group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dino_fast.ops.cross_entropy import weighted_cross_entropy
from dino_fast.ops.koleo import koleo_loss
from dino_fast.ops.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class _AsyncCenter(nn.Module):
    """The center buffer and dinov2's asynchronous momentum update, shared by both heads."""

    def __init__(self, center_shape: tuple[int, ...], student_temp: float, center_momentum: float) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*center_shape))
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center: Tensor | None = None
        self._rows_in_batch_center = 0

    @torch.no_grad()
    def _start_center_update(self, batch_sum: Tensor, rows: int) -> None:
        self.updated = False
        self._rows_in_batch_center = rows
        self.async_batch_center = batch_sum
        self.reduce_handle = dist.all_reduce(batch_sum, async_op=True) if _distributed() else None

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Wait for the pending all-reduce and apply center <- m * center + (1 - m) * mean; no-op when
        no update is pending."""
        if self.updated:
            return
        world_size = dist.get_world_size() if _distributed() else 1
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
            self.reduce_handle = None
        batch_center = self.async_batch_center / (self._rows_in_batch_center * world_size)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.updated = True


class DINOLoss(_AsyncCenter):
    """dinov2's class-token ``DINOLoss``: ``DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)``."""

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__((1, out_dim), student_temp, center_momentum)
        self.backend = backend

    @property
    def len_teacher_output(self) -> int:
        return self._rows_in_batch_center

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """softmax((t - center) / teacher_temp) after applying any pending center update."""
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> Tensor:
        """Sinkhorn-Knopp targets (B, K), fp32, sums all-reduced across ranks (ops.sinkhorn_knopp)."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations, backend=self.backend)

    def forward(
        self, student_output_list: list[Tensor], teacher_out_softmaxed_centered_list: list[Tensor]
    ) -> Tensor:
        """sum over (student s, teacher target t) pairs of -mean_b <t_b, log_softmax(s_b / student_temp)>.

        The targets are summed once (the cross-entropy is linear in them), then every student crop
        is one fused pass."""
        targets = list(teacher_out_softmaxed_centered_list)
        target = targets[0]
        for other in targets[1:]:  # one (B, K) sum, no stacked copy
            target = target.float() + other
        total = None
        for student in student_output_list:
            weights = torch.full((student.shape[0],), 1.0 / student.shape[0], device=student.device)
            loss = weighted_cross_entropy(
                student, target, weights, student_temp=self.student_temp, backend=self.backend
            )
            total = loss if total is None else total + loss
        if total is None:
            raise ValueError("student_output_list is empty")
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """Start the center update from this batch's teacher outputs (rows, K); applied by the next
        ``softmax_center_teacher`` / ``apply_center_update``."""
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output: Tensor) -> None:
        self._start_center_update(teacher_output.float().sum(dim=0, keepdim=True), len(teacher_output))


class iBOTPatchLoss(_AsyncCenter):
    """dinov2's ``iBOTPatchLoss(patch_out_dim, student_temp=0.1, center_momentum=0.9)``."""

    def __init__(
        self,
        patch_out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum)
        self.backend = backend

    @property
    def len_teacher_patch_tokens(self) -> int:
        return self._rows_in_batch_center

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        self.apply_center_update()
        self.center = self.center.to(device=teacher_patch_tokens.device)
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: Tensor,
        n_iterations: int = 3,
    ) -> Tensor:
        """Sinkhorn-Knopp targets for the masked teacher patches (M, K), fp32. As in dinov2,
        ``n_masked_patches_tensor`` is all-reduced in place (it becomes the global count) when
        torch.distributed is initialized; the targets do not depend on it (the count cancels)."""
        if _distributed():
            dist.all_reduce(n_masked_patches_tensor)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations, backend=self.backend)

    def forward(
        self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor, student_masks_flat: Tensor
    ) -> Tensor:
        """-mean over images of the mean over its masked patches of <t, log_softmax(s / student_temp)>;
        tokens (B, N, K), masks (B, N). Unmasked patches get weight 0 and are skipped."""
        images, patches, K = student_patch_tokens.shape
        masks = student_masks_flat.float()
        weights = masks / (masks.sum(dim=-1, keepdim=True).clamp(min=1.0) * images)
        return weighted_cross_entropy(
            student_patch_tokens.reshape(images * patches, K),
            teacher_patch_tokens.reshape(images * patches, K),
            weights.reshape(-1),
            student_temp=self.student_temp,
            backend=self.backend,
        )

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | Tensor | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """The loss on the masked patches only, (M, K) each: -sum_r w_r <t_r, log_softmax(s_r / tau)> /
        n_images, with w_r = 1 / (masked patches of r's image) unless ``masks_weight`` is given, over
        the first ``n_masked_patches`` rows when given."""
        student, teacher = student_patch_tokens_masked, teacher_patch_tokens_masked
        if masks_weight is None:
            masks_weight = (
                (1 / student_masks_flat.sum(-1).clamp(min=1.0))
                .unsqueeze(-1)
                .expand_as(student_masks_flat)[student_masks_flat]
            )
        if n_masked_patches is not None:
            rows = int(n_masked_patches)
            student, teacher = student[:rows], teacher[:rows]
        weights = torch.broadcast_to(masks_weight.float(), (student.shape[0],)) / student_masks_flat.shape[0]
        return weighted_cross_entropy(
            student, teacher, weights, student_temp=self.student_temp, backend=self.backend
        )

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens: Tensor) -> None:
        """dinov2's patch center: the sum over dim 0 of the mean over dim 1, divided by len * world."""
        batch_sum = torch.sum(teacher_patch_tokens.float().mean(1), dim=0, keepdim=True)
        self._start_center_update(batch_sum, len(teacher_patch_tokens))


class KoLeoLoss(nn.Module):
    """dinov2's ``KoLeoLoss()``: ``forward(student_output, eps=1e-8)`` (dino_fast.ops.koleo)."""

    def pairwise_NNs_inner(self, x: Tensor) -> Tensor:
        """Index of each row's nearest neighbour among the other rows of x (rows L2-normalized)."""
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-1)
            return dots.argmax(dim=1)

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        return koleo_loss(student_output, eps=eps)
