"""Sinkhorn-Knopp passes in Triton: the streaming passes behind dinov2's ``sinkhorn_knopp_teacher``.

Standalone (torch and triton only). For logits x (B, K) at temperature tau, with a_bk = x_bk / tau and
E_bk = exp(a_bk - m_k), the four passes are

    column_max(x, tau)                -> m_k = max_b a_bk                        (K,)
    prototype_sums(x, tau, m, c)      -> u_k = sum_b E_bk c_b                    (K,)
    sample_sums(x, tau, m, r)         -> v_b = sum_k E_bk r_k                    (B,)
    assign(x, tau, m, r, c)           -> E_bk r_k c_b                            (B, K)

and Sinkhorn-Knopp is: m (all-reduce MAX); c = 1; n times { r = 1 / (K u) with u all-reduced;
c = 1 / v }; assign. Why that equals dinov2's normalizations, and why shifting by the column max
m_k keeps every exponential <= 1 without changing the result, is derived in
dino_fast/ops/sinkhorn.py. Each pass reads the logits once in their stored dtype (bf16, fp16,
fp32; fp64 for validation) and accumulates in fp32 (fp64): no (B, K) temporaries.

a = x / tau is divided with IEEE rounding (div_rn), as PyTorch does, not multiplied by 1 / tau: at
tau = 0.04 the logits reach ~100, where the extra rounding of 1 / tau would move exp(a) by ~1e-5.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dino_loss import _acc_dtypes, _on_input_device, _rows_contiguous
from .runtime import interpreting

# Column passes tile (BLOCK_R rows x BLOCK_K columns) and loop down the rows: 128 fp32 columns per
# program is 512 programs at K = 65536, enough to fill an H100 once; row passes loop along the
# columns one row block at a time. The interpreter gets the same code with small tiles so the
# tests' odd shapes span several of them.
_BLOCK_K = 128
_BLOCK_R_COLUMNS = 16
_BLOCK_R_ROWS = 4


def _launch_config() -> tuple[int, int, int]:
    if interpreting():
        return 64, 8, 8
    return _BLOCK_K, _BLOCK_R_COLUMNS, _BLOCK_R_ROWS


@triton.jit
def _scaled(x, temp, ACC: tl.constexpr):
    """x / temp in the accumulation dtype, rounded as IEEE division (fp64 division always is)."""
    if ACC == tl.float64:  # noqa: SIM108, SIM300 (a compile-time branch on the constexpr dtype)
        a = x.to(ACC) / tl.cast(temp, ACC)
    else:
        a = tl.math.div_rn(x.to(ACC), tl.cast(temp, ACC))
    return a


@triton.jit
def _column_pass_kernel(
    x_ptr,
    shift_ptr,
    c_ptr,
    out_ptr,
    R,
    K,
    stride,
    temp,
    TAKE_MAX: tl.constexpr,  # True: out = column max of a; False: out = sum_b exp(a - shift) c_b
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    if TAKE_MAX:
        acc = tl.full([BLOCK_K], float("-inf"), ACC)
    else:
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        acc = tl.zeros([BLOCK_K], ACC)
    for r0 in tl.range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=ok, other=0.0)
        a = _scaled(x, temp, ACC)
        if TAKE_MAX:
            acc = tl.maximum(acc, tl.max(tl.where(ok, a, float("-inf")), axis=0))
        else:
            c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
            e = tl.where(ok, tl.exp(a - shift[None, :]), 0.0)
            acc += tl.sum(e * c[:, None], axis=0)
    tl.store(out_ptr + cols, acc, mask=col_ok)


@triton.jit
def _sample_sums_kernel(
    x_ptr,
    shift_ptr,
    r_ptr,
    out_ptr,
    R,
    K,
    stride,
    temp,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    acc = tl.zeros([BLOCK_R], ACC)
    for k0 in tl.range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=ok, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        r = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
        e = tl.where(ok, tl.exp(_scaled(x, temp, ACC) - shift[None, :]), 0.0)
        acc += tl.sum(e * r[None, :], axis=1)
    tl.store(out_ptr + rows, acc, mask=row_ok)


@triton.jit
def _assign_kernel(
    x_ptr,
    shift_ptr,
    r_ptr,
    c_ptr,
    out_ptr,
    R,
    K,
    stride,
    temp,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < R, cols < K
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    r = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    q = tl.exp(_scaled(x, temp, ACC) - shift[None, :]) * r[None, :] * c[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q, mask=ok)


def _column_pass(x: torch.Tensor, temp: float, shift, c, take_max: bool) -> torch.Tensor:
    x = _rows_contiguous(x)
    acc_torch, acc_tl = _acc_dtypes(x.dtype)
    rows, K = x.shape
    block_k, block_r, _ = _launch_config()
    out = torch.empty(K, dtype=acc_torch, device=x.device)
    dummy = out  # never read when take_max
    _column_pass_kernel[(triton.cdiv(K, block_k),)](
        x,
        dummy if shift is None else shift.contiguous(),
        dummy if c is None else c.contiguous(),
        out,
        rows,
        K,
        x.stride(0),
        temp,
        TAKE_MAX=take_max,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        ACC=acc_tl,
        enable_fp_fusion=False,
    )
    return out


@_on_input_device
def column_max(x: torch.Tensor, temp: float) -> torch.Tensor:
    """(K,) max over rows of x / temp (-inf for a matrix without rows)."""
    return _column_pass(x, temp, None, None, take_max=True)


@_on_input_device
def prototype_sums(x: torch.Tensor, temp: float, shift: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(K,) sum_b exp(x_bk / temp - shift_k) c_b."""
    return _column_pass(x, temp, shift, c, take_max=False)


@_on_input_device
def sample_sums(x: torch.Tensor, temp: float, shift: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(B,) sum_k exp(x_bk / temp - shift_k) r_k."""
    x = _rows_contiguous(x)
    acc_torch, acc_tl = _acc_dtypes(x.dtype)
    rows, K = x.shape
    block_k, _, block_r = _launch_config()
    out = torch.empty(rows, dtype=acc_torch, device=x.device)
    _sample_sums_kernel[(triton.cdiv(rows, block_r),)](
        x, shift.contiguous(), r.contiguous(), out, rows, K, x.stride(0), temp,
        BLOCK_R=block_r, BLOCK_K=block_k, ACC=acc_tl, enable_fp_fusion=False,
    )  # fmt: skip
    return out


@_on_input_device
def assign(
    x: torch.Tensor, temp: float, shift: torch.Tensor, r: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """(B, K) exp(x_bk / temp - shift_k) r_k c_b, fp32 (fp64 for fp64 x)."""
    x = _rows_contiguous(x)
    acc_torch, acc_tl = _acc_dtypes(x.dtype)
    rows, K = x.shape
    block_k, block_r, _ = _launch_config()
    out = torch.empty((rows, K), dtype=acc_torch, device=x.device)
    _assign_kernel[(triton.cdiv(rows, block_r), triton.cdiv(K, block_k))](
        x, shift.contiguous(), r.contiguous(), c.contiguous(), out, rows, K, x.stride(0), temp,
        BLOCK_R=block_r, BLOCK_K=block_k, ACC=acc_tl, enable_fp_fusion=False,
    )  # fmt: skip
    return out
