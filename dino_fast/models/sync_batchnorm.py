"""Batch norms synchronized across processes on every device, CPU (gloo) included.

The official code converts every batch norm to ``nn.SyncBatchNorm`` when a model has any (a
ResNet backbone, ``--use_bn_in_head``). torch's SyncBatchNorm, and DDP around one, refuse CPU
tensors, so on a CPU the batch norms become :class:`CpuSyncBatchNorm` instead: the same state
dict, the same statistics, computed with two differentiable all-reduces (per-channel sum and
count, then the centered sum of squares).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the gradients (every rank's loss
    reads the sum), which is what torch's CUDA SyncBatchNorm computes for its backward."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CpuSyncBatchNorm(_BatchNorm):
    """``nn.SyncBatchNorm`` for CPU process groups: normalizes over the batch of every rank in
    training, and is a plain batch norm without a process group or in eval mode."""

    def __init__(self, *args: Any, process_group: dist.ProcessGroup | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not self._synchronizes():
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        reduce_dims = [0, *range(2, input.dim())]
        channel_shape = (1, -1) + (1,) * (input.dim() - 2)
        count = torch.full((1,), input.numel() // input.shape[1], dtype=input.dtype)
        sums = _AllReduceSum.apply(torch.cat([input.sum(reduce_dims), count]), group)
        total = sums[-1]
        mean = sums[:-1] / total
        centered = input - mean.view(channel_shape)
        var = _AllReduceSum.apply(centered.square().sum(reduce_dims), group) / total
        out = centered * torch.rsqrt(var + self.eps).view(channel_shape)
        if self.affine:
            out = out * self.weight.view(channel_shape) + self.bias.view(channel_shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total.detach())
        return out

    def _synchronizes(self) -> bool:
        return (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group or dist.group.WORLD) > 1
        )

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, total: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum None is torch's cumulative average: weight 1 / batches seen.
        if self.momentum is None:
            factor: float | Tensor = 1.0 / self.num_batches_tracked.to(mean.dtype)
        else:
            factor = self.momentum
        unbiased = var * total / (total - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(
    module: nn.Module, device: torch.device | str, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """The official ``nn.SyncBatchNorm.convert_sync_batchnorm(module)`` for a model on ``device``:
    torch's SyncBatchNorm on accelerators, :class:`CpuSyncBatchNorm` on a CPU. Weights, buffers and
    state-dict keys are kept."""
    if torch.device(device).type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, _BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        converted = CpuSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group,
        )
        like = module.weight if module.affine else module.running_mean
        if like is not None:
            converted.to(like.dtype)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        if module.affine:
            converted.weight.requires_grad_(module.weight.requires_grad)
            converted.bias.requires_grad_(module.bias.requires_grad)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return module
