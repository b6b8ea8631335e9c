"""Batch norms synchronized across processes on every device, CPU (gloo) included.

The official code converts every batch norm to ``nn.SyncBatchNorm`` when a model has any (a
ResNet backbone, ``--use_bn_in_head``). torch's SyncBatchNorm refuses CPU tensors in a process
group; this subclass computes the same statistics there with two differentiable all-reduces
(per-channel sum and count, then the centered sum of squares) and defers to torch everywhere else.
The backward of a sum all-reduce is a sum all-reduce of the gradients, which is what torch's
CUDA SyncBatchNorm computes for ``sum_dy`` and ``sum_dy_xmu``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the gradients (every rank's loss
    reads the sum)."""

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


class SyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` with the same state dict, that also synchronizes CPU tensors."""

    def forward(self, input: Tensor) -> Tensor:
        if input.device.type != "cpu" or not self._synchronizes():
            return super().forward(input)
        return self._forward_cpu_group(input)

    def _synchronizes(self) -> bool:
        return (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group or dist.group.WORLD) > 1
        )

    def _forward_cpu_group(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        group = self.process_group or dist.group.WORLD
        reduce_dims = [0, *range(2, x.dim())]
        channel_shape = (1, -1) + (1,) * (x.dim() - 2)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype)
        sums = _AllReduceSum.apply(torch.cat([x.sum(reduce_dims), count]), group)
        total = sums[-1]
        mean = sums[:-1] / total
        centered = x - mean.view(channel_shape)
        var = _AllReduceSum.apply(centered.square().sum(reduce_dims), group) / total
        out = centered * torch.rsqrt(var + self.eps).view(channel_shape)
        if self.affine:
            out = out * self.weight.view(channel_shape) + self.bias.view(channel_shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total.detach())
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, total: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum None is torch's cumulative average: weight 1 / batches seen.
        factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.to(mean.dtype)
        unbiased = var * total / (total - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` that makes the CPU-capable :class:`SyncBatchNorm`."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for m in module.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm  # same attributes and state; only forward differs
    return module
