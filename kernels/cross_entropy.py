"""Fused weighted soft-target cross-entropy in Triton, forward and backward: the loss of dinov2's
DINO class-token head and of its (masked) iBOT patch head.

Standalone (torch and triton only). For R student rows s, T target rows q (R a multiple of T; row r
uses target row r mod T) and weights w (R,):

    loss = sum_r w_r h_r,   h_r = -sum_k q_k log softmax(x)_k,   x = s_r / tau_s   (q = q_{r mod T})

Forward, one program per row, streaming its K columns in chunks with the running statistics of the
DINO-loss kernels (kernels/dino_loss.py): the max M, Z = sum_k e^(x_k - M), the target mass
S = sum_k q_k and D = sum_k q_k (M - x_k) >= 0. A chunk with max m raising M to M' = max(M, m) gives

    Z <- Z e^(M - M') + sum_chunk e^(x_k - M'),   D <- D + S (M' - M) + sum_chunk q_k (M' - x_k),

and at the end h = S log Z + D, since log softmax(x)_k = x_k - M - log Z. Both terms are sums of
non-negative numbers, so nothing cancels, as in the DINO loss. Rows of weight 0 are skipped (their
statistics are left unwritten): the unmasked patches of an iBOT batch cost no reads.

Backward, one program per row: d loss / d s_rk = g w_r / tau_s (S p_k - q_k), p_k = e^((x_k - M) - log Z),
rebuilt from the saved (M, log Z, S): one read of s and q, one write of the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dino_loss import _acc_dtypes, _num_warps, _on_input_device, _rows_contiguous
from .runtime import interpreting
from .sinkhorn import _scaled

# One row per program, 1024 columns per chunk on a GPU (one 16-byte load per thread of 4 warps for
# bf16); the interpreter takes 64 so the tests' odd K span several chunks.
_BLOCK_K = 1024
_BLOCK_K_INTERPRETED = 64
N_STATS = 3  # M, log Z, S per row


def _block_k(K: int) -> int:
    return min(_BLOCK_K_INTERPRETED if interpreting() else _BLOCK_K, triton.next_power_of_2(K))


@triton.jit
def _ce_fwd_kernel(
    s_ptr, q_ptr, w_ptr, row_loss_ptr, stats_ptr, T, K, stride_s, stride_q, temp,
    BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    w = tl.load(w_ptr + row).to(ACC)
    if w != 0:
        s_base = s_ptr + row.to(tl.int64) * stride_s
        q_base = q_ptr + (row % T).to(tl.int64) * stride_q
        m = tl.full([], float("-inf"), ACC)
        z = tl.zeros([], ACC)
        mass = tl.zeros([], ACC)
        d = tl.zeros([], ACC)
        for k0 in tl.range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = cols < K
            x = tl.where(ok, _scaled(tl.load(s_base + cols, mask=ok, other=0.0), temp, ACC), float("-inf"))
            q = tl.load(q_base + cols, mask=ok, other=0.0).to(ACC)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            d = d + mass * (m_new - tl.where(m == float("-inf"), m_new, m))  # mass = 0 before a first chunk
            d = d + tl.sum(q * tl.where(ok, m_new - x, 0.0), axis=0)
            mass = mass + tl.sum(q, axis=0)
            m = m_new
        log_z = tl.log(z)
        tl.store(row_loss_ptr + row, w * (mass * log_z + d))
        tl.store(stats_ptr + row * 3, m)
        tl.store(stats_ptr + row * 3 + 1, log_z)
        tl.store(stats_ptr + row * 3 + 2, mass)
    else:
        tl.store(row_loss_ptr + row, tl.zeros([], ACC))


@triton.jit
def _ce_bwd_kernel(
    grad_loss_ptr, s_ptr, q_ptr, w_ptr, stats_ptr, grad_ptr, T, K, stride_s, stride_q, stride_g, temp,
    BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    w = tl.load(w_ptr + row).to(ACC)
    g_base = grad_ptr + row.to(tl.int64) * stride_g
    if w != 0:
        scale = tl.load(grad_loss_ptr).to(ACC) * w / tl.cast(temp, ACC)
        m = tl.load(stats_ptr + row * 3)
        log_z = tl.load(stats_ptr + row * 3 + 1)
        mass = tl.load(stats_ptr + row * 3 + 2)
        s_base = s_ptr + row.to(tl.int64) * stride_s
        q_base = q_ptr + (row % T).to(tl.int64) * stride_q
        for k0 in tl.range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = cols < K
            x = _scaled(tl.load(s_base + cols, mask=ok, other=0.0), temp, ACC)
            q = tl.load(q_base + cols, mask=ok, other=0.0).to(ACC)
            p = tl.exp((x - m) - log_z)
            grad = scale * (mass * p - q)
            tl.store(g_base + cols, grad.to(grad_ptr.dtype.element_ty), mask=ok)
    else:
        for k0 in tl.range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            tl.store(g_base + cols, tl.zeros([BLOCK_K], grad_ptr.dtype.element_ty), mask=cols < K)


def _check(student: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> None:
    if student.dim() != 2 or target.dim() != 2 or student.shape[1] != target.shape[1]:
        raise ValueError(
            f"student (R, K) and target (T, K) expected, got {tuple(student.shape)}, {tuple(target.shape)}"
        )
    if target.shape[0] == 0 or student.shape[0] % target.shape[0]:
        raise ValueError(
            f"student rows {student.shape[0]} must be a multiple of target rows {target.shape[0]}"
        )
    if tuple(weights.shape) != (student.shape[0],):
        raise ValueError(f"weights must have shape ({student.shape[0]},), got {tuple(weights.shape)}")


@_on_input_device
def weighted_cross_entropy_forward(
    student: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, *, student_temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, row statistics (R, 3) = (M, log Z, target mass)), in fp32 (fp64 for fp64 student);
    the statistics of rows of weight 0 are not written."""
    _check(student, target, weights)
    student, target = _rows_contiguous(student), _rows_contiguous(target)
    acc_torch, acc_tl = _acc_dtypes(student.dtype)
    rows, K = student.shape
    block = _block_k(K)
    row_loss = torch.empty(rows, dtype=acc_torch, device=student.device)
    stats = torch.empty((rows, N_STATS), dtype=acc_torch, device=student.device)
    _ce_fwd_kernel[(rows,)](
        student, target, weights.contiguous(), row_loss, stats, target.shape[0], K, student.stride(0),
        target.stride(0), student_temp, BLOCK_K=block, ACC=acc_tl, num_warps=_num_warps(block),
        enable_fp_fusion=False,
    )  # fmt: skip
    return row_loss.sum(), stats


@_on_input_device
def weighted_cross_entropy_backward(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    stats: torch.Tensor,
    *,
    student_temp: float,
) -> torch.Tensor:
    """d loss / d student in the student's dtype, from ``weighted_cross_entropy_forward``'s statistics."""
    _check(student, target, weights)
    student, target = _rows_contiguous(student), _rows_contiguous(target)
    acc_torch, acc_tl = _acc_dtypes(student.dtype)
    rows, K = student.shape
    block = _block_k(K)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    _ce_bwd_kernel[(rows,)](
        grad_loss.reshape(()).contiguous(), student, target, weights.contiguous(),
        stats.to(acc_torch).contiguous(), grad, target.shape[0], K, student.stride(0), target.stride(0),
        grad.stride(0), student_temp, BLOCK_K=block, ACC=acc_tl, num_warps=_num_warps(block),
        enable_fp_fusion=False,
    )  # fmt: skip
    return grad
