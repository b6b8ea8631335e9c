"""Fused weighted cross-entropy against soft targets over rows: the loss of dinov2's DINO class-token
head and of its (masked) iBOT patch head, as the ``dino_fast::weighted_cross_entropy_with_stats`` op.

    loss = sum_r w_r * h_r,   h_r = -sum_k q_{r mod T, k} log softmax(s_r / tau_s)_k

for R student rows s (any float dtype), T target rows q (R a multiple of T: student crop i of a
batch of T samples uses the same targets as every other crop) and per-row weights w (R,). A weight
of 0 skips its row (the masked-out patches of ``iBOTPatchLoss.forward``).

The forward saves per row (M, log Z, sum_k q_k), left unspecified for rows of weight 0: M the max
of s_r / tau_s and log Z the log-sum-exp of the logits minus M, as the DINO loss does
(dino_fast.ops.loss), plus the target's mass, which a Sinkhorn target has only up to rounding.
The backward rebuilds p = softmax(s_r / tau_s) from them:

    d loss / d s_rk = g * w_r / tau_s * (sum_j q_rj * p_rk - q_rk)

so no backend keeps (R, K) fp32 temporaries between forward and backward. Differentiable in the
student only (targets and weights are constants, as in dinov2).

Backends: ``triton`` (dino_fast.kernels.cross_entropy), ``native`` (csrc/cross_entropy.cpp, CPU:
``torch.ops.dino_fast_native.weighted_cross_entropy_fwd/bwd``) and ``torch`` (dino_fast.ops.reference).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dino_fast.ops.backends import select_backend
from dino_fast.ops.reference import reference_weighted_cross_entropy, reference_weighted_cross_entropy_grad

__all__ = ["weighted_cross_entropy", "weighted_cross_entropy_with_stats"]

NATIVE_FORWARD_OP = "weighted_cross_entropy_fwd"
NATIVE_BACKWARD_OP = "weighted_cross_entropy_bwd"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _validate(student: Tensor, target: Tensor, weights: Tensor, student_temp: float) -> None:
    for name, x in (("student", student), ("target", target), ("weights", weights)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}"
            )
    if student.dim() != 2 or target.dim() != 2:
        raise ValueError(
            f"student and target must be 2-D (rows, K), got {tuple(student.shape)} and {tuple(target.shape)}"
        )
    rows, K = student.shape
    if target.shape[1] != K:
        raise ValueError(f"target has K={target.shape[1]} columns, student K={K}")
    if target.shape[0] == 0 or rows % target.shape[0]:
        raise ValueError(
            f"student has {rows} rows, not a multiple of the target's {target.shape[0]}: row r uses target "
            "row r mod T, so stack student crops crop-major over the same T samples"
        )
    if tuple(weights.shape) != (rows,):
        raise ValueError(
            f"weights must have shape ({rows},) (one per student row), got {tuple(weights.shape)}"
        )
    if len({student.device, target.device, weights.device}) > 1:
        raise ValueError("student, target and weights must be on one device")
    if not (math.isfinite(student_temp) and student_temp > 0):
        raise ValueError(f"student_temp must be a positive finite number, got {student_temp}")


def _forward_torch(student: Tensor, target: Tensor, weights: Tensor, student_temp: float):
    loss = reference_weighted_cross_entropy(student, target, weights, student_temp=student_temp)
    acc = _acc(student.dtype)
    x = student.to(acc) / student_temp
    row_max = x.amax(dim=-1, keepdim=True)
    log_z = torch.logsumexp(x - row_max, dim=-1, keepdim=True)
    q_mass = target.to(acc).sum(dim=-1, keepdim=True).repeat(student.shape[0] // target.shape[0], 1)
    return loss.to(acc), torch.cat([row_max, log_z, q_mass], dim=-1)


def _backward_torch(grad_loss, student, target, weights, stats, student_temp):
    grad = reference_weighted_cross_entropy_grad(student, target, weights, student_temp=student_temp)
    return (grad * grad_loss.to(grad.dtype)).to(student.dtype)


def _forward_triton(student, target, weights, student_temp):
    from dino_fast.kernels import cross_entropy

    return cross_entropy.weighted_cross_entropy_forward(student, target, weights, student_temp=student_temp)


def _backward_triton(grad_loss, student, target, weights, stats, student_temp):
    from dino_fast.kernels import cross_entropy

    return cross_entropy.weighted_cross_entropy_backward(
        grad_loss, student, target, weights, stats, student_temp=student_temp
    )


def _forward_native(student, target, weights, student_temp):
    loss, stats = torch.ops.dino_fast_native.weighted_cross_entropy_fwd(
        student, target, weights, student_temp
    )
    return loss, stats


def _backward_native(grad_loss, student, target, weights, stats, student_temp):
    return torch.ops.dino_fast_native.weighted_cross_entropy_bwd(
        grad_loss, student, target, weights, stats, student_temp
    )


_FORWARD = {"torch": _forward_torch, "native": _forward_native, "triton": _forward_triton}
_BACKWARD = {"torch": _backward_torch, "native": _backward_native, "triton": _backward_triton}


@torch.library.custom_op("dino_fast::weighted_cross_entropy_with_stats", mutates_args=())
def _forward_op(
    student: Tensor, target: Tensor, weights: Tensor, student_temp: float, backend: str | None
) -> tuple[Tensor, Tensor]:
    name = select_backend(backend, student.device, op="weighted_cross_entropy", native_op=NATIVE_FORWARD_OP)
    return _FORWARD[name](student, target, weights, student_temp)


@_forward_op.register_fake
def _forward_fake(student, target, weights, student_temp, backend):
    acc = _acc(student.dtype)
    return student.new_empty((), dtype=acc), student.new_empty((student.shape[0], 3), dtype=acc)


@torch.library.custom_op("dino_fast::weighted_cross_entropy_backward", mutates_args=())
def _backward_op(
    grad_loss: Tensor,
    student: Tensor,
    target: Tensor,
    weights: Tensor,
    stats: Tensor,
    student_temp: float,
    backend: str | None,
) -> Tensor:
    name = select_backend(backend, student.device, op="weighted_cross_entropy", native_op=NATIVE_BACKWARD_OP)
    return _BACKWARD[name](grad_loss, student, target, weights, stats, student_temp)


@_backward_op.register_fake
def _backward_fake(grad_loss, student, *args):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    student, target, weights, student_temp, backend = inputs
    ctx.save_for_backward(student, target, weights, output[1])
    ctx.config = (student_temp, backend)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_stats):
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _backward_op(grad_loss, *ctx.saved_tensors, *ctx.config)
    return grad, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def weighted_cross_entropy_with_stats(
    student: Tensor, target: Tensor, weights: Tensor, *, student_temp: float = 0.1, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """``weighted_cross_entropy`` that also returns the per-row statistics (R, 3): (M, log Z, sum_k q_k)."""
    _validate(student, target, weights, student_temp)
    return _forward_op(student, target.detach(), weights.detach(), float(student_temp), backend)


def weighted_cross_entropy(
    student: Tensor, target: Tensor, weights: Tensor, *, student_temp: float = 0.1, backend: str | None = None
) -> Tensor:
    """sum_r weights_r * (-sum_k target_{r mod T, k} * log_softmax(student_r / student_temp)_k).

    ``student`` (R, K), ``target`` (T, K) with R a multiple of T, ``weights`` (R,); a 0-dim fp32 loss
    (fp64 for fp64 student), differentiable in ``student`` (gradient in its dtype). ``backend``: "triton",
    "native" or "torch"; None takes DINO_FAST_BACKEND when set, else the fastest available.
    """
    return weighted_cross_entropy_with_stats(
        student, target, weights, student_temp=student_temp, backend=backend
    )[0]
