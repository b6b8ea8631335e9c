"""Fused DINO loss in Triton: centering + sharpening + multi-crop cross-entropy, forward and backward.

Standalone (imports only torch and triton):
``dino_loss_and_column_sum(student, teacher, center, ncrops=..., teacher_temp=...)`` is
differentiable in ``student``; ``dino_loss_forward`` / ``dino_loss_backward`` are the launchers
that dino_fast wraps in its torch.library op. Layout is the official crop-major one: ``student``
is ``(ncrops * B, K)`` with rows ``[view 0 of every sample, view 1 of every sample, ...]`` and
``teacher`` is ``(n_global * B, K)``; teacher view t and student view t are the same crop and are
never paired.

Inputs may be fp32, bf16, fp16 (accumulated in fp32) or fp64 (accumulated in fp64, for validation).
Temperatures reach the kernels as fp32 scalars, so fp64 results are exact only for temperatures whose
inverse is an fp32 number (0.1, 0.04, 0.05, 0.0625, ...).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .runtime import interpreting, sm_count

# Math, per sample (b dropped). Teacher view t < G, student view v < V, column k < K.
#   a_tk = (t_k - c_k) / tau_t      q_tk = exp(a_tk - A_t)     A_t = logsumexp_k a_tk
#   x_vk = s_vk / tau_s             log p_vk = x_vk - L_v       L_v = logsumexp_k x_vk
# Pair term: h_tv = -sum_k q_tk log p_vk = sum_k q_tk (L_v - x_vk), every summand >= 0.
# loss = sum_b sum_{(t, v), v != t} h_tv / (n_pairs * B), with n_pairs = G * (V - 1).
#
# Forward, one program per (column chunk, group of samples), so that B * K / BLOCK_K row pieces
# spread over every SM however small B is; the program loops over its samples. Chunk c of a sample gives
#   m_tc = max_{k in c} a_tk, z_tc = sum_{k in c} e^(a_tk - m_tc)          (same m_vc, z_vc for x_v)
#   d_tvc = sum_{k in c} e^(a_tk - m_tc) * (m_vc - x_vk)                    (>= 0)
# and a second, tiny kernel combines chunks with the usual rescaling: M_t = max_c m_tc,
# Z_t = sum_c z_tc e^(m_tc - M_t), A_t = M_t + log Z_t (likewise L_v), and, splitting
# L_v - x_vk = (L_v - m_vc) + (m_vc - x_vk),
#   h_tv = (1 / Z_t) * sum_c e^(m_tc - M_t) * [z_tc (L_v - m_vc) + d_tvc].
# Every term in the bracket is non-negative, so nothing cancels: with |s| ~ 1e4 in fp32 (x ~ 1e5) the
# loss keeps the precision of x itself, where lse - <q, x> would lose five digits.
# The teacher loads also give the column sum sum_rows t_k that the center update needs.
#
# Backward: d loss / d s_vk = g / (tau_s n_pairs B) * (n_v p_vk - sum_{t != v} q_tk), with
# p_vk = e^(x_vk - L_v), n_v = G - [v < G]. q and p are rebuilt from the row statistics the forward
# saves, so the backward reads s, t and c once and writes d s once: no (rows, K) temporaries.
#
# Row statistics are saved as the pair (M, log Z), not as the single number lse = M + log Z: rounding
# lse to fp32 costs ulp(lse) in every exponent, i.e. a relative error of 1e-4 in q for teacher logits
# ~1000 (t - c ~ 40 at tau_t = 0.04), while x - M is exact for the entries that matter. For the same
# reason FMA contraction is off in these kernels: x = s / tau_s must round identically in the max, the
# exponentials and the backward, so that a saturated softmax comes out exactly one-hot.

# Launch configuration (sm_90, bf16, K=65536, read off ptxas for these kernels): 1024 columns over
# 4 warps is 8 per thread, one 16-byte load per bf16 row, with the next row already in flight. The
# forward then needs ~95 registers (5 programs per SM), the backward ~56 (9 per SM): about 20 and
# 37 KB of loads in flight per SM, which is what HBM3's latency asks for. Bigger tiles cost
# registers faster than they add bytes in flight. The interpreter runs programs one at a time in
# Python, so it gets the largest tile instead (fewer programs, same code).
_MAX_BLOCK_K = 1024
_MAX_BLOCK_K_INTERPRETED = 4096
# Forward programs per SM the sample grouping aims for: about three waves of 5 resident programs,
# so the last, partial wave costs little, while the (n_groups, K) column-sum partials stay ~8 MiB.
_PROGRAMS_PER_SM = 16


def _acc_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _block_k(K: int, block_k: int | None) -> int:
    if block_k is None:
        return min(_MAX_BLOCK_K_INTERPRETED if interpreting() else _MAX_BLOCK_K, triton.next_power_of_2(K))
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    return block_k


def _num_warps(block_k: int) -> int:
    return max(1, min(8, block_k // 256))


def _samples_per_program(batch: int, n_chunks: int, device: torch.device, requested: int | None) -> int:
    """Samples one forward program loops over. More samples per program means a smaller
    (n_groups, K) column-sum partial; fewer means more programs. Aim for a few resident
    programs per SM (one program under the interpreter, which runs programs one by one)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"samples_per_program must be >= 1, got {requested}")
        return requested
    n_groups = min(batch, max(1, triton.cdiv(_PROGRAMS_PER_SM * sm_count(device), n_chunks)))
    return triton.cdiv(batch, n_groups)


def _check(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int, n_global: int):
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"student and teacher outputs must be 2-D (rows, K); got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    rows, K = student.shape
    if ncrops < 2 or not 1 <= n_global <= ncrops:
        raise ValueError(
            f"need ncrops >= 2 and 1 <= n_global <= ncrops, got ncrops={ncrops}, n_global={n_global}"
        )
    if rows == 0 or rows % ncrops:
        raise ValueError(
            f"student_output has {rows} rows, which is not a positive multiple of ncrops={ncrops}"
        )
    batch = rows // ncrops
    if tuple(teacher.shape) != (n_global * batch, K):
        raise ValueError(
            f"teacher_output must be (n_global * B, K) = ({n_global * batch}, {K}), "
            f"got {tuple(teacher.shape)}"
        )
    if center.numel() != K:
        raise ValueError(f"center must hold K={K} values (shape (1, K) or (K,)), got {tuple(center.shape)}")
    if student.dtype != teacher.dtype:
        raise TypeError(f"student ({student.dtype}) and teacher ({teacher.dtype}) outputs must share a dtype")
    return batch, K


def _on_input_device(launcher):
    """Run ``launcher`` with its tensors' GPU as the current device: Triton launches on the current
    device and torch.empty allocates there, which need not be where the inputs live."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return launcher(*args, **kwargs)

    return wrapper


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def _dino_loss_fwd_kernel(
    student_ptr,
    teacher_ptr,
    center_ptr,
    stats_ptr,  # (B, n_chunks, NSTAT): per-chunk m_t, z_t, m_v, z_v, d_tv
    colsum_part_ptr,  # (n_groups, K): teacher column sums of each sample group
    B,
    K,
    stride_s,
    stride_t,
    samples_per_program,
    inv_teacher_temp,
    inv_student_temp,
    NCROPS: tl.constexpr,
    N_GLOBAL: tl.constexpr,
    G_PAD: tl.constexpr,
    NSTAT: tl.constexpr,  # 2 * G_PAD + 2 * NCROPS + G_PAD * NCROPS
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    g = tl.arange(0, G_PAD)
    g_ok = g < N_GLOBAL
    tile_ok = g_ok[:, None] & col_ok[None, :]
    center = tl.load(center_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    colsum = tl.zeros([BLOCK_K], dtype=ACC)
    for i in tl.range(0, samples_per_program):
        b = pid_g * samples_per_program + i
        if b < B:
            t_rows = (g * B + b).to(tl.int64)
            t = tl.load(teacher_ptr + t_rows[:, None] * stride_t + cols[None, :], mask=tile_ok, other=0.0)
            t = t.to(ACC)
            colsum += tl.sum(t, axis=0)
            a = tl.where(tile_ok, (t - center[None, :]) * inv_teacher_temp, -float("inf"))
            # Padding rows (g >= N_GLOBAL) are all -inf; give them a finite max so they stay NaN-free.
            m_t = tl.where(g_ok, tl.max(a, axis=1), 0.0)
            w = tl.exp(a - m_t[:, None])
            z_t = tl.sum(w, axis=1)
            base = stats_ptr + (b.to(tl.int64) * n_chunks + pid_k) * NSTAT
            tl.store(base + g, m_t, mask=g_ok)
            tl.store(base + G_PAD + g, z_t, mask=g_ok)
            # One student row is always in flight ahead of the one being reduced (software
            # pipelining by hand): the last iteration re-reads its own row, a cache hit.
            s_next = tl.load(student_ptr + b.to(tl.int64) * stride_s + cols, mask=col_ok, other=0.0)
            for v in tl.range(0, NCROPS):
                s = s_next.to(ACC)
                s_ahead = (tl.minimum(v + 1, NCROPS - 1) * B + b).to(tl.int64)
                s_next = tl.load(student_ptr + s_ahead * stride_s + cols, mask=col_ok, other=0.0)
                x = tl.where(col_ok, s * inv_student_temp, -float("inf"))
                m_v = tl.max(x, axis=0)
                z_v = tl.sum(tl.exp(x - m_v), axis=0)
                gap = tl.where(col_ok, m_v - x, 0.0)
                d = tl.sum(w * gap[None, :], axis=1)
                tl.store(base + 2 * G_PAD + v, m_v)
                tl.store(base + 2 * G_PAD + NCROPS + v, z_v)
                tl.store(base + 2 * G_PAD + 2 * NCROPS + g * NCROPS + v, d, mask=g_ok)
    tl.store(colsum_part_ptr + pid_g.to(tl.int64) * K + cols, colsum, mask=col_ok)


@triton.jit
def _dino_loss_combine_kernel(
    stats_ptr,
    colsum_part_ptr,
    colsum_ptr,
    student_stats_ptr,  # (ncrops * B, 2): M, log Z of each student row
    teacher_stats_ptr,  # (n_global * B, 2)
    sample_loss_ptr,
    B,
    K,
    n_chunks,
    n_groups,
    NCROPS: tl.constexpr,
    N_GLOBAL: tl.constexpr,
    G_PAD: tl.constexpr,
    V_PAD: tl.constexpr,
    NSTAT: tl.constexpr,
    CHUNK_BLOCK: tl.constexpr,
    COL_BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    # Programs [0, B) combine one sample's chunk statistics; the rest sum the column-sum partials,
    # so the whole second stage is one launch.
    pid = tl.program_id(0)
    if pid < B:
        g = tl.arange(0, G_PAD)
        v = tl.arange(0, V_PAD)
        g_ok = g < N_GLOBAL
        v_ok = v < NCROPS
        base = stats_ptr + pid.to(tl.int64) * n_chunks * NSTAT
        M_t = tl.full([G_PAD], float("-inf"), ACC)
        Z_t = tl.zeros([G_PAD], ACC)
        M_v = tl.full([V_PAD], float("-inf"), ACC)
        Z_v = tl.zeros([V_PAD], ACC)
        for c0 in tl.range(0, n_chunks, CHUNK_BLOCK):
            c = c0 + tl.arange(0, CHUNK_BLOCK)
            c_ok = c < n_chunks
            row = base + c[:, None] * NSTAT
            ct_ok = c_ok[:, None] & g_ok[None, :]
            cv_ok = c_ok[:, None] & v_ok[None, :]
            m_t = tl.load(row + g[None, :], mask=ct_ok, other=float("-inf"))
            z_t = tl.load(row + G_PAD + g[None, :], mask=ct_ok, other=0.0)
            m_v = tl.load(row + 2 * G_PAD + v[None, :], mask=cv_ok, other=float("-inf"))
            z_v = tl.load(row + 2 * G_PAD + NCROPS + v[None, :], mask=cv_ok, other=0.0)
            new_t = tl.where(g_ok, tl.maximum(M_t, tl.max(m_t, axis=0)), 0.0)
            new_v = tl.where(v_ok, tl.maximum(M_v, tl.max(m_v, axis=0)), 0.0)
            Z_t = Z_t * tl.exp(M_t - new_t) + tl.sum(z_t * tl.exp(m_t - new_t[None, :]), axis=0)
            Z_v = Z_v * tl.exp(M_v - new_v) + tl.sum(z_v * tl.exp(m_v - new_v[None, :]), axis=0)
            M_t = new_t
            M_v = new_v
        log_Z_t = tl.log(tl.where(g_ok, Z_t, 1.0))
        log_Z_v = tl.log(tl.where(v_ok, Z_v, 1.0))
        h = tl.zeros([G_PAD, V_PAD], ACC)
        for c0 in tl.range(0, n_chunks, CHUNK_BLOCK):
            c = c0 + tl.arange(0, CHUNK_BLOCK)
            c_ok = c < n_chunks
            row = base + c[:, None] * NSTAT
            ct_ok = c_ok[:, None] & g_ok[None, :]
            cv_ok = c_ok[:, None] & v_ok[None, :]
            m_t = tl.load(row + g[None, :], mask=ct_ok, other=float("-inf"))
            z_t = tl.load(row + G_PAD + g[None, :], mask=ct_ok, other=0.0)
            m_v = tl.load(row + 2 * G_PAD + v[None, :], mask=cv_ok, other=0.0)
            d_off = 2 * G_PAD + 2 * NCROPS + g[None, :, None] * NCROPS + v[None, None, :]
            d_ok = c_ok[:, None, None] & g_ok[None, :, None] & v_ok[None, None, :]
            d = tl.load(base + c[:, None, None] * NSTAT + d_off, mask=d_ok, other=0.0)
            weight = tl.exp(m_t - M_t[None, :])  # (chunks, G_PAD); 0 on masked chunks
            # L_v - m_vc = (M_v - m_vc) + log Z_v: exact difference plus a small positive number.
            lse_gap = (M_v[None, None, :] - m_v[:, None, :]) + log_Z_v[None, None, :]
            bracket = z_t[:, :, None] * lse_gap + d
            h += tl.sum(weight[:, :, None] * bracket, axis=0)
        h = h / tl.where(g_ok, Z_t, 1.0)[:, None]
        paired = g_ok[:, None] & v_ok[None, :] & (g[:, None] != v[None, :])
        tl.store(sample_loss_ptr + pid, tl.sum(tl.sum(tl.where(paired, h, 0.0), axis=1), axis=0))
        tl.store(student_stats_ptr + (v * B + pid) * 2, M_v, mask=v_ok)
        tl.store(student_stats_ptr + (v * B + pid) * 2 + 1, log_Z_v, mask=v_ok)
        tl.store(teacher_stats_ptr + (g * B + pid) * 2, M_t, mask=g_ok)
        tl.store(teacher_stats_ptr + (g * B + pid) * 2 + 1, log_Z_t, mask=g_ok)
    else:
        cols = (pid - B) * COL_BLOCK + tl.arange(0, COL_BLOCK)
        col_ok = cols < K
        total = tl.zeros([COL_BLOCK], ACC)
        for i in tl.range(0, n_groups):
            total += tl.load(colsum_part_ptr + i * K + cols, mask=col_ok, other=0.0)
        tl.store(colsum_ptr + cols, total, mask=col_ok)


@triton.jit
def _dino_loss_bwd_kernel(
    grad_loss_ptr,
    student_ptr,
    teacher_ptr,
    center_ptr,
    student_stats_ptr,
    teacher_stats_ptr,
    grad_ptr,
    B,
    K,
    stride_s,
    stride_t,
    stride_g,
    inv_teacher_temp,
    inv_student_temp,
    pair_count,  # n_pairs * B, an integer so the scale is exact in any precision
    NCROPS: tl.constexpr,
    N_GLOBAL: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_k = tl.program_id(0)
    b = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    g = tl.arange(0, G_PAD)
    g_ok = g < N_GLOBAL
    tile_ok = g_ok[:, None] & col_ok[None, :]
    center = tl.load(center_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    t_rows = (g * B + b).to(tl.int64)
    t = tl.load(teacher_ptr + t_rows[:, None] * stride_t + cols[None, :], mask=tile_ok, other=0.0).to(ACC)
    M_t = tl.load(teacher_stats_ptr + (g * B + b) * 2, mask=g_ok, other=0.0)
    log_Z_t = tl.load(teacher_stats_ptr + (g * B + b) * 2 + 1, mask=g_ok, other=0.0)
    a = (t - center[None, :]) * inv_teacher_temp
    q = tl.where(tile_ok, tl.exp((a - M_t[:, None]) - log_Z_t[:, None]), 0.0)
    q_total = tl.sum(q, axis=0)
    scale = tl.load(grad_loss_ptr).to(ACC) * inv_student_temp / tl.cast(pair_count, ACC)
    s_next = tl.load(student_ptr + b.to(tl.int64) * stride_s + cols, mask=col_ok, other=0.0)
    for v in tl.range(0, NCROPS):
        s_row = (v * B + b).to(tl.int64)
        s = s_next.to(ACC)
        s_ahead = (tl.minimum(v + 1, NCROPS - 1) * B + b).to(tl.int64)
        s_next = tl.load(student_ptr + s_ahead * stride_s + cols, mask=col_ok, other=0.0)
        M_v = tl.load(student_stats_ptr + s_row * 2)
        log_Z_v = tl.load(student_stats_ptr + s_row * 2 + 1)
        p = tl.exp((s * inv_student_temp - M_v) - log_Z_v)
        own = tl.sum(tl.where(g[:, None] == v, q, 0.0), axis=0)  # q_v when v is also a teacher view
        n_v = tl.sum(tl.where(g_ok & (g != v), 1.0, 0.0), axis=0)  # teacher views paired with v
        grad = (n_v * p - (q_total - own)) * scale
        tl.store(grad_ptr + s_row * stride_g + cols, grad.to(grad_ptr.dtype.element_ty), mask=col_ok)


@_on_input_device
def dino_loss_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    *,
    ncrops: int,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
    block_k: int | None = None,
    samples_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, student_stats (ncrops*B, 2), teacher_stats (n_global*B, 2), teacher column sum (K,)).

    A row's statistics are (M, log Z) with M = max of its scaled logits (s / tau_s, or
    (t - c) / tau_t) and log Z = logsumexp(logits - M), so logsumexp = M + log Z:
    what ``dino_loss_backward`` rebuilds the softmaxes from. All in the accumulation dtype
    (fp32, or fp64 for fp64 inputs).
    ``block_k`` / ``samples_per_program`` override the launch configuration (tests use them
    to exercise many chunks and sample groups on small inputs).
    """
    batch, K = _check(student, teacher, center, ncrops, n_global)
    student, teacher = _rows_contiguous(student), _rows_contiguous(teacher)
    center = center.reshape(K).contiguous()
    acc_torch, acc_tl = _acc_dtypes(student.dtype)
    block = _block_k(K, block_k)
    n_chunks = triton.cdiv(K, block)
    group = _samples_per_program(batch, n_chunks, student.device, samples_per_program)
    n_groups = triton.cdiv(batch, group)
    g_pad = triton.next_power_of_2(n_global)
    nstat = 2 * g_pad + 2 * ncrops + g_pad * ncrops
    device = student.device
    stats = torch.empty((batch, n_chunks, nstat), dtype=acc_torch, device=device)
    colsum_part = torch.empty((n_groups, K), dtype=acc_torch, device=device)
    _dino_loss_fwd_kernel[(n_chunks, n_groups)](
        student,
        teacher,
        center,
        stats,
        colsum_part,
        batch,
        K,
        student.stride(0),
        teacher.stride(0),
        group,
        1.0 / teacher_temp,
        1.0 / student_temp,
        NCROPS=ncrops,
        N_GLOBAL=n_global,
        G_PAD=g_pad,
        NSTAT=nstat,
        BLOCK_K=block,
        ACC=acc_tl,
        num_warps=_num_warps(block),
        enable_fp_fusion=False,
    )
    colsum = torch.empty(K, dtype=acc_torch, device=device)
    student_stats = torch.empty((ncrops * batch, 2), dtype=acc_torch, device=device)
    teacher_stats = torch.empty((n_global * batch, 2), dtype=acc_torch, device=device)
    sample_loss = torch.empty(batch, dtype=acc_torch, device=device)
    col_block = 256  # K / 256 programs share the column-sum reduction
    _dino_loss_combine_kernel[(batch + triton.cdiv(K, col_block),)](
        stats,
        colsum_part,
        colsum,
        student_stats,
        teacher_stats,
        sample_loss,
        batch,
        K,
        n_chunks,
        n_groups,
        NCROPS=ncrops,
        N_GLOBAL=n_global,
        G_PAD=g_pad,
        V_PAD=triton.next_power_of_2(ncrops),
        NSTAT=nstat,
        CHUNK_BLOCK=min(64, triton.next_power_of_2(n_chunks)),
        COL_BLOCK=col_block,
        ACC=acc_tl,
        num_warps=4,
    )
    loss = sample_loss.sum() / (n_global * (ncrops - 1) * batch)
    return loss, student_stats, teacher_stats, colsum


@_on_input_device
def dino_loss_backward(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_stats: torch.Tensor,
    teacher_stats: torch.Tensor,
    *,
    ncrops: int,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
    block_k: int | None = None,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d loss / d student in the student's dtype, from the row statistics of ``dino_loss_forward``.
    ``grad_loss`` is the 0-dim upstream gradient; it is read on the device (no host sync).
    ``grad_out``, when given, is written in place (any row stride, unit column stride) and returned."""
    batch, K = _check(student, teacher, center, ncrops, n_global)
    student, teacher = _rows_contiguous(student), _rows_contiguous(teacher)
    center = center.reshape(K).contiguous()
    acc_torch, acc_tl = _acc_dtypes(student.dtype)
    block = _block_k(K, block_k)
    if grad_out is None:
        grad = torch.empty((ncrops * batch, K), dtype=student.dtype, device=student.device)
    else:
        if grad_out.shape != student.shape or grad_out.dtype != student.dtype or grad_out.stride(-1) != 1:
            raise ValueError(
                f"grad_out must be a {student.dtype} {tuple(student.shape)} tensor with unit column "
                f"stride, got {grad_out.dtype} {tuple(grad_out.shape)} with strides {grad_out.stride()}"
            )
        grad = grad_out
    _dino_loss_bwd_kernel[(triton.cdiv(K, block), batch)](
        grad_loss.reshape(()).contiguous(),
        student,
        teacher,
        center,
        student_stats.to(acc_torch).contiguous(),
        teacher_stats.to(acc_torch).contiguous(),
        grad,
        batch,
        K,
        student.stride(0),
        teacher.stride(0),
        grad.stride(0),
        1.0 / teacher_temp,
        1.0 / student_temp,
        n_global * (ncrops - 1) * batch,
        NCROPS=ncrops,
        N_GLOBAL=n_global,
        G_PAD=triton.next_power_of_2(n_global),
        BLOCK_K=block,
        ACC=acc_tl,
        num_warps=_num_warps(block),
        enable_fp_fusion=False,
    )
    return grad


class DINOLossFunction(torch.autograd.Function):
    """Autograd wrapper for standalone use; gradients flow to the student output only."""

    @staticmethod
    def forward(ctx, student, teacher, center, ncrops, teacher_temp, student_temp, n_global):
        loss, student_stats, teacher_stats, colsum = dino_loss_forward(
            student,
            teacher,
            center,
            ncrops=ncrops,
            teacher_temp=teacher_temp,
            student_temp=student_temp,
            n_global=n_global,
        )
        ctx.save_for_backward(student, teacher, center, student_stats, teacher_stats)
        ctx.config = dict(
            ncrops=ncrops, teacher_temp=teacher_temp, student_temp=student_temp, n_global=n_global
        )
        ctx.mark_non_differentiable(colsum)
        return loss, colsum

    @staticmethod
    def backward(ctx, grad_loss, _grad_colsum):
        student, teacher, center, student_stats, teacher_stats = ctx.saved_tensors
        grad = dino_loss_backward(
            grad_loss, student, teacher, center, student_stats, teacher_stats, **ctx.config
        )
        return grad, None, None, None, None, None, None


def dino_loss_and_column_sum(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    *,
    ncrops: int,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, teacher column sum (K,)): the DINO loss, differentiable in ``student``, and the sum of
    the teacher rows that a center update needs (divide by the total teacher row count)."""
    return DINOLossFunction.apply(student, teacher, center, ncrops, teacher_temp, student_temp, n_global)
