"""Fused residual add (with per-row drop-path factor) + LayerNorm in Triton, forward and backward.

Standalone (imports only torch and triton). In a pre-norm transformer every residual add is
followed by the next LayerNorm:

    x_out = x + s * y          (s: per-row drop-path factor keep/(1-p), or 1)
    h     = LN(x_out) * w + b  (written in the compute dtype, e.g. bf16 under autocast)

Eager PyTorch under autocast runs that as four passes over the tokens (addcmul in fp32, layer_norm
in fp32, a cast of its output to bf16 for the next matmul, plus the cast of y), reading and writing
the fp32 residual stream each time; here one pass reads x and y and writes x_out and h, and the
backward one pass reads x_out, dh and dx_out and writes dx and dy. ``layer_norm`` is the same
kernel without the add (the first block's norm1).

Numerics equal the autocast path: the sum and the statistics are in fp32, h is LN's fp32 result
rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import sm_count

# Math, per row (D features), xhat = (x_out - mean) * rstd, rstd = 1 / sqrt(var + eps):
#   h = xhat * w + b
# Backward, with g = dL/dh and the gradient dL/dx_out = r arriving from the rest of the network:
#   dL/dx_out (total) = r + rstd * (w*g - mean_D(w*g) - xhat * mean_D(w*g * xhat))
#   dL/dx = dL/dx_out (total)            dL/dy = s * dL/dx_out (total)
#   dL/dw = sum_rows g * xhat            dL/db = sum_rows g
# The forward saves x_out (the residual stream, kept by the graph anyway) and (mean, rstd) per row.
# dw/db: each backward program accumulates its rows in fp32 registers and writes one partial row;
# a (programs, D) sum finishes them.

_MAX_D = 8192  # one row per register tile; ViT-L is 1024


def _tiles(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_R rows per tile, num_warps): ~4K elements per tile for D <= 1024."""
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_d * block_r <= 4096 else 8
    return block_d, block_r, num_warps


@triton.jit
def _add_ln_fwd_kernel(
    X, Y, SCALE, W, B, XOUT, H, MEAN, RSTD,
    n_rows, D, eps,
    HAS_Y: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(SCALE + rows, mask=rmask, other=0.0).to(tl.float32)
            x = x + y * s[:, None]
        else:
            x = x + y
        tl.store(XOUT + offs, x.to(XOUT.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    h = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _add_ln_bwd_kernel(
    XOUT, DH, DRES, SCALE, W, MEAN, RSTD, DX, DY, DW_PART, DB_PART,
    n_rows, D,
    HAS_DRES: tl.constexpr, HAS_Y: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_R
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(pid * BLOCK_R, n_rows, step):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(XOUT + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wg = tl.where(mask, g * w[None, :], 0.0)
        c1 = tl.sum(xhat * wg, axis=1) / D
        c2 = tl.sum(wg, axis=1) / D
        dx = (wg - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_Y:
            if HAS_SCALE:
                s = tl.load(SCALE + rows, mask=rmask, other=0.0).to(tl.float32)
                tl.store(DY + offs, (dx * s[:, None]).to(DY.dtype.element_ty), mask=mask)
            else:
                tl.store(DY + offs, dx.to(DY.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(g * xhat, axis=0)
        db_acc += tl.sum(g, axis=0)
    tl.store(DW_PART + pid * D + cols, dw_acc, mask=cmask)
    tl.store(DB_PART + pid * D + cols, db_acc, mask=cmask)


def _check(x: torch.Tensor, y: torch.Tensor | None, scale: torch.Tensor | None, weight, bias) -> None:
    if x.dim() != 2:
        raise ValueError(f"add_layer_norm expects (rows, D) tokens, got x of shape {tuple(x.shape)}")
    rows, d = x.shape
    if d > _MAX_D:
        raise ValueError(f"add_layer_norm handles D <= {_MAX_D}, got {d}")
    if weight.shape != (d,) or bias.shape != (d,):
        raise ValueError(
            f"LayerNorm weight/bias must be ({d},), got {tuple(weight.shape)}/{tuple(bias.shape)}"
        )
    if y is not None and y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if scale is not None and (y is None or scale.shape != (rows,)):
        raise ValueError(
            f"scale must be ({rows},) and needs y, got {None if scale is None else tuple(scale.shape)}"
        )
    devices = {t.device for t in (x, y, scale, weight, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"add_layer_norm inputs must share one device, got {sorted(map(str, devices))}")


def _forward(x, y, scale, weight, bias, eps, out_dtype, x_out_dtype):
    rows, d = x.shape
    x = x.contiguous()
    y = None if y is None else y.contiguous()
    x_out = torch.empty(rows, d, device=x.device, dtype=x_out_dtype) if y is not None else x
    h = torch.empty(rows, d, device=x.device, dtype=out_dtype)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    block_d, block_r, num_warps = _tiles(d)
    # Absent optional inputs get a placeholder pointer; the constexpr flags keep it unread.
    y_arg = y if y is not None else x
    scale_arg = scale if scale is not None else mean
    _add_ln_fwd_kernel[(triton.cdiv(rows, block_r),)](
        x, y_arg, scale_arg, weight, bias, x_out, h, mean, rstd,
        rows, d, eps,
        HAS_Y=y is not None, HAS_SCALE=scale is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return x_out, h, mean, rstd


def _backward(x_out, dh, dres, scale, weight, mean, rstd, x_dtype, y_dtype):
    rows, d = x_out.shape
    dh = dh.contiguous()
    dres = None if dres is None else dres.contiguous()
    dx = torch.empty(rows, d, device=x_out.device, dtype=x_dtype)
    dy = torch.empty(rows, d, device=x_out.device, dtype=y_dtype) if y_dtype is not None else None
    block_d, block_r, num_warps = _tiles(d)
    programs = max(1, min(triton.cdiv(rows, block_r), 4 * sm_count(x_out.device)))
    dw_part = torch.empty(programs, d, device=x_out.device, dtype=torch.float32)
    db_part = torch.empty(programs, d, device=x_out.device, dtype=torch.float32)
    _add_ln_bwd_kernel[(programs,)](
        x_out, dh, dres if dres is not None else dh, scale if scale is not None else mean, weight, mean, rstd,
        dx, dy if dy is not None else dx, dw_part, db_part,
        rows, d,
        HAS_DRES=dres is not None, HAS_Y=y_dtype is not None, HAS_SCALE=scale is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return dx, dy, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, weight, bias, eps, out_dtype):
        x_out_dtype = torch.result_type(x, y)
        x_out, h, mean, rstd = _forward(x, y, scale, weight, bias, eps, out_dtype, x_out_dtype)
        ctx.save_for_backward(x_out, scale, weight, mean, rstd)
        ctx.dtypes = (x.dtype, y.dtype)
        return x_out, h

    @staticmethod
    def backward(ctx, dx_out, dh):
        x_out, scale, weight, mean, rstd = ctx.saved_tensors
        if dh is None:
            dh = torch.zeros_like(x_out)
        dx, dy, dw, db = _backward(x_out, dh, dx_out, scale, weight, mean, rstd, *ctx.dtypes)
        return dx, dy, None, dw, db, None, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        _, h, mean, rstd = _forward(x, None, None, weight, bias, eps, out_dtype, x.dtype)
        ctx.save_for_backward(x.contiguous(), weight, mean, rstd)
        return h

    @staticmethod
    def backward(ctx, dh):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, _, dw, db = _backward(x, dh, None, None, weight, mean, rstd, x.dtype, None)
        return dx, dw, db, None, None


def add_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_out = x + scale[:, None] * y`` (``x + y`` without ``scale``) and ``h = LayerNorm(x_out)``
    in ``out_dtype`` (default x_out's dtype), for ``(rows, D)`` x and y; differentiable in x, y,
    weight and bias. ``x_out`` has the promoted dtype of x and y, like ``torch.addcmul``."""
    _check(x, y, scale, weight, bias)
    out_dtype = torch.result_type(x, y) if out_dtype is None else out_dtype
    return _AddLayerNorm.apply(x, y, scale, weight, bias, eps, out_dtype)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``LayerNorm(x)`` over the last dim of ``(rows, D)`` x, written in ``out_dtype``."""
    _check(x, None, None, weight, bias)
    return _LayerNorm.apply(x, weight, bias, eps, x.dtype if out_dtype is None else out_dtype)
