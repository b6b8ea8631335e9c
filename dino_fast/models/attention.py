"""Attention backends for the ViT and how one is chosen.

Every backend computes the same thing, multi-head scaled dot-product attention without a mask:

    out[b, h] = softmax(q[b, h] @ k[b, h]^T * scale) @ v[b, h],   scale = head_dim ** -0.5 by default

on ``(B, H, N, head_dim)`` tensors (``q`` may have fewer rows than ``k``/``v``: the multi-crop
forward's last block asks for the CLS rows only). They differ only in what they keep in memory:

- ``"explicit"`` materializes the ``(B, H, Nq, Nk)`` weights exactly as the official DINO code
  does (``(q @ k^T) * scale``, softmax, ``@ v``); the only backend that can return them, so
  attention maps (``get_last_selfattention``) always use it.
- ``"sdpa"`` (default) calls ``torch.nn.functional.scaled_dot_product_attention`` and lets
  PyTorch pick flash, memory-efficient or cuDNN attention, which stream over keys with an online
  softmax and never store the weights (backward recomputes them from the saved log-sum-exp).
  ``"sdpa:flash"``, ``"sdpa:efficient"``, ``"sdpa:cudnn"`` and ``"sdpa:math"`` pin one kernel
  (``torch.nn.attention.sdpa_kernel``); a pinned kernel that cannot run the inputs raises.
- ``"xformers"`` calls ``xformers.ops.memory_efficient_attention``, but only when xformers
  imports AND a probe call on the current device and dtype matches SDPA; otherwise one warning
  names the reason and SDPA runs instead.
- ``"auto"``: xformers when its probe passes on a CUDA device, else sdpa.

Packed variable-length attention (:func:`varlen_attention`, ``torch.nn.attention.varlen``, flash
on CUDA in fp16/bf16) runs every sequence of a token-packed batch in one call; the multi-crop
forward uses it under the ``sdpa``/``auto`` backends when :func:`varlen_unavailable_reason` says
it works here (also probe-checked against SDPA once per device and dtype).

Probes run once per (device, dtype) on first eager use and are cached. They cannot run inside a
``torch.compile`` trace: there an unprobed ``auto`` means ``sdpa`` and unprobed varlen means one
attention call per resolution group. Call :func:`prepare` before compiling to probe first.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

SDPA_KERNELS: dict[str, SDPBackend] = {
    "sdpa:flash": SDPBackend.FLASH_ATTENTION,
    "sdpa:efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa:cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa:math": SDPBackend.MATH,
}
BACKENDS: tuple[str, ...] = ("auto", "sdpa", *SDPA_KERNELS, "xformers", "explicit")

# Probe verdicts, keyed by (backend, device, dtype): None when usable, else why not.
_PROBES: dict[tuple[str, str, torch.dtype], str | None] = {}
_WARNED: set[tuple[str, str, torch.dtype]] = set()


def check_backend(name: str) -> str:
    """``name`` if it is a known backend name, else a ValueError listing the valid ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def _device_key(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _probe_inputs(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, phase: float) -> Tensor:
    # Deterministic values: a probe must not advance the caller's RNG (drop path draws from it).
    n = math.prod(shape)
    values = torch.arange(n, device=device, dtype=torch.float32).mul_(0.7548776662).add_(phase).sin_()
    return values.view(shape).to(dtype)


def _probe_tolerance(dtype: torch.dtype) -> float:
    return {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-4)


def _compare(name: str, got: Tensor, want: Tensor, dtype: torch.dtype) -> str | None:
    err = (got.float() - want.float()).abs().max().item()
    if not math.isfinite(err) or err > _probe_tolerance(dtype):
        return f"{name} differs from the fp32 reference by {err:.3g} (tolerance {_probe_tolerance(dtype):g})"
    return None


def _xformers_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"xformers kernels need a CUDA device, got {device.type}"
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (`pip install xformers` built for this torch)"
    try:
        import xformers.ops as xops
    except Exception as err:  # a broken install is a reason to fall back, whatever it raises
        return f"xformers does not import ({type(err).__name__}: {err})"
    try:
        q, k, v = (_probe_inputs((2, 3, 40, 64), device, torch.float32, p) for p in (0.0, 1.0, 2.0))
        grad = _probe_inputs((2, 3, 40, 64), device, torch.float32, 3.0)
        qd, kd, vd = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out = xops.memory_efficient_attention(qd.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2))
        out.transpose(1, 2).backward(grad.to(dtype))
        qr, kr, vr = (t.requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qr, kr, vr)
        ref.backward(grad)
        verdicts = [_compare("xformers output", out.transpose(1, 2), ref, dtype)]
        verdicts += [
            _compare(f"xformers d{n}", a.grad, b.grad, dtype)
            for n, a, b in zip("qkv", (qd, kd, vd), (qr, kr, vr), strict=True)
        ]
        return next((reason for reason in verdicts if reason), None)
    except Exception as err:
        return f"the xformers probe call failed on {device} {dtype} ({type(err).__name__}: {err})"


def _varlen_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"packed varlen attention runs on CUDA only, got {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"packed varlen attention (flash) needs float16/bfloat16 inputs, got {dtype}"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10 does)"
    try:
        # The real layout: q, k, v as strided views of one packed qkv tensor, a group longer than
        # 128 tokens (cuDNN's varlen path) and one shorter, plus CLS-only queries (max_q = 1).
        groups, heads, head_dim = ((2, 197), (3, 37)), 2, 64
        total = sum(n * length for n, length in groups)
        qkv = _probe_inputs((total, 3, heads, head_dim), device, torch.float32, 0.0)
        grad = _probe_inputs((total, heads, head_dim), device, torch.float32, 1.0)
        cu = cumulative_lengths(groups, device)
        starts = cu[:-1].long()
        packed = qkv.to(dtype).requires_grad_()
        q, k, v = packed.unbind(1)
        out = varlen_attn(q, k, v, cu, cu, 197, 197)
        cu_cls = torch.arange(starts.numel() + 1, device=device, dtype=torch.int32)
        out_cls = varlen_attn(q[starts], k, v, cu_cls, cu, 1, 197)
        (out.float() * grad).sum().add((out_cls.float() * grad[starts]).sum()).backward()

        ref_packed = qkv.clone().requires_grad_()
        outs, offset = [], 0
        for n, length in groups:
            qg, kg, vg = (
                ref_packed[offset : offset + n * length].view(n, length, 3, heads, head_dim).unbind(2)
            )
            outs.append(
                F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2))
                .transpose(1, 2)
                .reshape(n * length, heads, head_dim)
            )
            offset += n * length
        ref = torch.cat(outs)
        (ref * grad).sum().add((ref[starts] * grad[starts]).sum()).backward()
        reason = (
            _compare("varlen output", out, ref, dtype)
            or _compare("varlen CLS-query output", out_cls, ref[starts], dtype)
            or _compare("varlen dqkv", packed.grad, ref_packed.grad, dtype)
        )
    except Exception as err:
        reason = f"the varlen probe call failed on {device} {dtype} ({type(err).__name__}: {err})"
    if reason is not None:  # available but broken: worth a warning, the fallback is slower
        log.warning("packed varlen attention disabled, attention runs per crop resolution: %s", reason)
    return reason


@torch.compiler.disable
def _run_probe(kind: str, device: torch.device, dtype: torch.dtype) -> str | None:
    key = (kind, _device_key(device), dtype)
    if key not in _PROBES:
        with torch.enable_grad():
            _PROBES[key] = (_xformers_reason if kind == "xformers" else _varlen_reason)(
                torch.device(key[1]), dtype
            )
        log.info("attention probe %s on %s %s: %s", kind, key[1], dtype, _PROBES[key] or "ok")
    return _PROBES[key]


def _probe(kind: str, device: torch.device, dtype: torch.dtype) -> str | None:
    key = (kind, _device_key(device), dtype)
    if key in _PROBES:
        return _PROBES[key]
    if torch.compiler.is_compiling():
        return (
            f"{kind} was not probed before torch.compile traced the model "
            "(call dino_fast.models.attention.prepare)"
        )
    return _run_probe(kind, device, dtype)


def xformers_unavailable_reason(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when xformers attention imports and its probe call matches SDPA on ``device``/``dtype``,
    else why not. Cached per device and dtype."""
    return _probe("xformers", torch.device(device), dtype)


def varlen_unavailable_reason(
    device: torch.device | str, dtype: torch.dtype, head_dim: int = 64
) -> str | None:
    """None when packed varlen attention works for ``head_dim`` on ``device``/``dtype``, else why not."""
    if head_dim % 8 != 0 or head_dim > 256:
        return f"flash varlen attention needs head_dim a multiple of 8 and at most 256, got {head_dim}"
    return _probe("varlen", torch.device(device), dtype)


def prepare(device: torch.device | str, dtype: torch.dtype) -> dict[str, str | None]:
    """Run the probes for ``device``/``dtype`` now (before ``torch.compile``); returns their verdicts."""
    device = torch.device(device)
    return {kind: _probe(kind, device, dtype) for kind in ("xformers", "varlen")}


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The concrete backend that ``name`` means for inputs on ``device`` in ``dtype``."""
    check_backend(name)
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and xformers_unavailable_reason(device, dtype) is None:
            return "xformers"
        return "sdpa"
    if name == "xformers":
        reason = xformers_unavailable_reason(device, dtype)
        if reason is not None:
            key = ("xformers", _device_key(device), dtype)
            # Not from inside a torch.compile trace (a graph break); the first eager call warns.
            if key not in _WARNED and not torch.compiler.is_compiling():
                _WARNED.add(key)
                warnings.warn(
                    f"attention backend 'xformers' unavailable, using 'sdpa': {reason}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return "sdpa"
    return name


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, ndim: int, layout: str) -> None:
    if q.dim() != ndim or k.dim() != ndim or v.dim() != ndim:
        raise ValueError(f"attention expects {ndim}-D {layout} q, k, v; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shape mismatch ({layout}): q {q.shape}, k {k.shape}, v {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            "q, k, v must share dtype and device, got "
            f"{q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}"
        )


def attention_with_weights(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, dropout_p: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Explicit attention as the official DINO code computes it: ``(out, weights)`` with
    ``weights`` the ``(B, H, Nq, Nk)`` softmax (before dropout)."""
    _check_qkv(q, k, v, 4, "(B, H, N, head_dim)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    weights = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    dropped = F.dropout(weights, dropout_p) if dropout_p > 0.0 else weights
    return dropped @ v, weights


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    backend: str = "sdpa",
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention over ``(B, H, N, head_dim)`` q, k, v (strided views are fine) with ``backend``
    (any name in :data:`BACKENDS`); returns ``(B, H, Nq, head_dim)``.

    Flash/cuDNN/xformers return a tensor laid out as ``(B, N, H, head_dim)``, so
    ``out.transpose(1, 2).reshape(B, N, H * head_dim)`` is free for them."""
    _check_qkv(q, k, v, 4, "(B, H, N, head_dim)")
    backend = resolve_backend(backend, q.device, q.dtype)
    if backend == "explicit":
        return attention_with_weights(q, k, v, scale=scale, dropout_p=dropout_p)[0]
    if backend == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p, scale=scale
        )
        return out.transpose(1, 2)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    with sdpa_kernel([SDPA_KERNELS[backend]]):
        try:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        except RuntimeError as err:
            raise RuntimeError(
                f"attention backend {backend!r} cannot run q {tuple(q.shape)} {q.dtype} on {q.device} "
                f"(see the warnings above for PyTorch's reasons); use 'sdpa' to let PyTorch choose a kernel"
            ) from err


def cumulative_lengths(groups: tuple[tuple[int, int], ...], device: torch.device | str) -> Tensor:
    """int32 ``(S + 1,)`` sequence starts of a packed batch made of ``groups`` = ((num_sequences,
    tokens_per_sequence), ...), built on ``device`` (no host-to-device copy, no sync)."""
    parts = [torch.zeros(1, device=device, dtype=torch.int32)]
    offset = 0
    for count, length in groups:
        parts.append(torch.arange(1, count + 1, device=device, dtype=torch.int32) * length + offset)
        offset += count * length
    return torch.cat(parts)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None = None,
) -> Tensor:
    """Packed attention: ``q`` ``(Tq, H, head_dim)`` and ``k``/``v`` ``(Tk, H, head_dim)`` hold
    sequences back to back, sequence i being rows ``cu_seq[i]:cu_seq[i + 1]``; attention never
    crosses sequences. One flash call for every sequence; returns ``(Tq, H, head_dim)``."""
    from torch.nn.attention.varlen import varlen_attn

    _check_qkv(q, k, v, 3, "(tokens, H, head_dim)")
    return varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale)


def describe() -> dict[str, Any]:
    """The probe verdicts so far, for logs and benchmark records."""
    return {
        f"{kind}@{device}/{str(dtype).removeprefix('torch.')}": reason or "ok"
        for (kind, device, dtype), reason in _PROBES.items()
    }
