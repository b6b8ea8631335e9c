"""Sinkhorn-Knopp teacher assignments (dinov2's ``sinkhorn_knopp_teacher``) in a few streaming passes.

Math. With a_bk = t_bk / tau for the B local teacher rows and K prototypes, dinov2 builds
Q = exp(a)^T, normalizes it to total mass 1, then n times scales every prototype row to 1/K (sums
all-reduced across ranks) and every sample column to 1/B, and returns B * Q^T. Each step rescales
whole rows or whole columns, so the result is E_bk r_k c_b with

    E_bk = exp(a_bk - m_k),   m_k = max_b a_bk (over all ranks),
    r_k  = 1 / (K * sum_b E_bk c_b)      (sum over all ranks' rows: the all-reduce),
    c_b  = 1 / sum_k E_bk r_k            (local to the row),

starting from c = 1 and iterating n times. The global normalization and the factors B cancel
exactly, and so does the shift by m_k (a prototype-wide factor the first r step absorbs), which
is why the result equals dinov2's wherever dinov2's exp(t / tau) is finite, and stays finite where
that overflows fp32 (t / tau > 88.7). Every E_bk <= 1, so the sums cannot overflow.

Passes, each a read of the logits or of E: one for m, then per iteration one for the prototype
sums u_k = sum_b E_bk c_b and one for the sample sums v_b = sum_k E_bk r_k, and one that writes
the (B, K) assignment; sums in fp32 (fp64 for fp64 input). Between passes only vectors cross ranks:
m (MAX) once, u (SUM) per iteration. The Triton kernels (GPU: bytes are the cost) recompute E from
the stored bf16/fp32 logits in every pass; the native and torch backends (CPU: exponentials are
the cost) write E once into the buffer that becomes the output and take the sums as matrix-vector
products on it. Either way nothing (B, K)-sized is allocated but the output.

Backends: ``triton`` (dino_fast.kernels.sinkhorn), ``native`` (csrc/sinkhorn.cpp, CPU:
``torch.ops.dino_fast_native.sinkhorn_column_max/sinkhorn_exp``) and ``torch`` (plain PyTorch).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from dino_fast.ops.backends import select_backend

__all__ = ["sinkhorn_knopp"]

NATIVE_OP = "sinkhorn_exp"


class _Passes(Protocol):
    def column_max(self, logits: Tensor, temp: float) -> Tensor: ...
    def prototype_sums(self, logits: Tensor, temp: float, shift: Tensor, c: Tensor) -> Tensor: ...
    def sample_sums(self, logits: Tensor, temp: float, shift: Tensor, r: Tensor) -> Tensor: ...
    def assign(self, logits: Tensor, temp: float, shift: Tensor, r: Tensor, c: Tensor) -> Tensor: ...


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _MaterializedPasses:
    """The passes for the CPU-side backends: E is computed once, into the buffer that becomes the
    output, and the sums are matrix-vector products on it (on a CPU the exponentials, not the bytes,
    are the cost). ``exponentials(logits, temp, shift)`` returns E in the accumulation dtype."""

    def __init__(self, column_max, exponentials) -> None:
        self.column_max = column_max
        self._exponentials = exponentials
        self._e: Tensor | None = None

    def _exp(self, logits: Tensor, temp: float, shift: Tensor) -> Tensor:
        if self._e is None:
            self._e = self._exponentials(logits, temp, shift)
        return self._e

    def prototype_sums(self, logits, temp, shift, c):
        return self._exp(logits, temp, shift).t().mv(c)

    def sample_sums(self, logits, temp, shift, r):
        return self._exp(logits, temp, shift).mv(r)

    def assign(self, logits, temp, shift, r, c):
        return self._exp(logits, temp, shift).mul_(r[None, :]).mul_(c[:, None])


def _torch_column_max(logits: Tensor, temp: float) -> Tensor:
    if logits.shape[0] == 0:
        return logits.new_full((logits.shape[1],), float("-inf"), dtype=_acc(logits.dtype))
    return logits.amax(dim=0).to(_acc(logits.dtype)) / temp  # x / temp is monotone in x, also once rounded


def _torch_exponentials(logits: Tensor, temp: float, shift: Tensor) -> Tensor:
    return logits.to(_acc(logits.dtype), copy=True).div_(temp).sub_(shift[None, :]).exp_()


def _passes(backend: str) -> _Passes:
    if backend == "triton":
        from dino_fast.kernels import sinkhorn as triton_sinkhorn

        return triton_sinkhorn
    if backend == "native":
        return _MaterializedPasses(
            torch.ops.dino_fast_native.sinkhorn_column_max, torch.ops.dino_fast_native.sinkhorn_exp
        )
    return _MaterializedPasses(_torch_column_max, _torch_exponentials)


def _validate(teacher_output: Tensor, teacher_temp: float, n_iterations: int) -> None:
    if not isinstance(teacher_output, Tensor) or teacher_output.dim() != 2:
        raise ValueError(
            "teacher_output must be a 2-D (rows, K) tensor of teacher head outputs, got "
            f"{getattr(teacher_output, 'shape', type(teacher_output).__name__)}"
        )
    if not teacher_output.is_floating_point():
        raise TypeError(f"teacher_output must be floating point, got {teacher_output.dtype}")
    if not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be positive, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(
            f"n_iterations must be >= 1 (dinov2 uses 3), got {n_iterations}: with none the result is the "
            "plain softmax over all entries"
        )


@torch.no_grad()
def sinkhorn_knopp(
    teacher_output: Tensor,
    teacher_temp: float,
    *,
    n_iterations: int = 3,
    distributed: bool | None = None,
    backend: str | None = None,
) -> Tensor:
    """dinov2's Sinkhorn-Knopp teacher targets for the local rows ``teacher_output`` (B, K): a (B, K)
    fp32 tensor (fp64 for fp64 input) whose rows sum to 1 and whose columns sum, over all ranks, to
    B_total / K.

    ``distributed``: all-reduce the prototype sums over the default process group (None: when
    torch.distributed is initialized), so the result equals Sinkhorn-Knopp on the concatenation of
    every rank's rows. ``backend``: "triton", "native" or "torch"; None picks as for every dino_fast op.
    Not differentiable (the targets are constants, as in dinov2).
    """
    _validate(teacher_output, teacher_temp, n_iterations)
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    name = select_backend(backend, teacher_output.device, op="sinkhorn_knopp", native_op=NATIVE_OP)
    passes = _passes(name)
    logits = teacher_output.detach()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    temp = float(teacher_temp)
    K = logits.shape[1]

    shift = passes.column_max(logits, temp)
    if distributed:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    c = shift.new_ones(logits.shape[0])
    r = shift.new_ones(K)
    for _ in range(n_iterations):
        prototype_sums = passes.prototype_sums(logits, temp, shift, c)
        if distributed:
            dist.all_reduce(prototype_sums)
        r = 1.0 / (K * prototype_sums)
        c = 1.0 / passes.sample_sums(logits, temp, shift, r)
    return passes.assign(logits, temp, shift, r, c)
