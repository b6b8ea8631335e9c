"""kernels/add_layer_norm.py (fused residual add + drop-path factor + LayerNorm) against float64.

Without CUDA the kernels run under the Triton interpreter (tests/conftest.py switches it on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dino_fast.kernels import add_layer_norm as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, y, scale, w, b, eps):
    """float64: x_out = x + scale * y, h = LayerNorm(x_out)."""
    x, w, b = x.double(), w.double(), b.double()
    if y is not None:
        y = y.double()
        x = x + (y if scale is None else y * scale.double()[:, None])
    return x, F.layer_norm(x, (x.shape[-1],), w, b, eps)


def make(rows, d, x_dtype, y_dtype, with_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen).mul(3).add(1)  # non-zero mean: the centering matters
    y = torch.randn(rows, d, generator=gen)
    # Drop-path factors: kept rows scaled by 1/keep, dropped rows 0.
    scale = (torch.rand(rows, generator=gen) > 0.25).float() / 0.75 if with_scale else None
    w = torch.randn(d, generator=gen)
    b = torch.randn(d, generator=gen)
    to = lambda t, dt: None if t is None else t.to(DEVICE, dt)
    return (
        to(x, x_dtype),
        to(y, y_dtype),
        to(scale, torch.float32),
        to(w, torch.float32),
        to(b, torch.float32),
    )


def tol(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


# (rows, D): one row; 37 rows of D=48 (neither a power of two); 200 rows of 384 (ViT-S width, more
# rows than the backward's programs, so they loop); D=1 (degenerate: xhat = 0, only the bias).
SHAPES = [(1, 64), (37, 48), (200, 384), (5, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_scale", [False, True])
# fp32 everywhere (fp32 training); fp32 residual + bf16 branch + bf16 output (bf16 autocast);
# fp16 branch (fp16 autocast, the official DINO precision).
@pytest.mark.parametrize(
    ("y_dtype", "out_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
)
def test_add_layer_norm_matches_fp64(shape, with_scale, y_dtype, out_dtype):
    rows, d = shape
    x, y, scale, w, b = make(rows, d, torch.float32, y_dtype, with_scale, seed=rows + d)
    params = [t.clone().requires_grad_() for t in (x, y, w, b)]
    x_out, h = K.add_layer_norm(params[0], params[1], scale, params[2], params[3], 1e-6, out_dtype)
    assert x_out.dtype == torch.float32 and h.dtype == out_dtype
    ref_params = [t.detach().double().requires_grad_() for t in (x, y, w, b)]
    ref_x, ref_h = reference(ref_params[0], ref_params[1], scale, ref_params[2], ref_params[3], 1e-6)
    torch.testing.assert_close(x_out.double(), ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), ref_h, atol=tol(out_dtype), rtol=tol(out_dtype))

    gen = torch.Generator().manual_seed(7)
    g_x = torch.randn(rows, d, generator=gen).to(DEVICE)
    g_h = torch.randn(rows, d, generator=gen).to(DEVICE)
    torch.autograd.backward([x_out, h], [g_x, g_h.to(out_dtype)])
    torch.autograd.backward([ref_x, ref_h], [g_x.double(), g_h.to(out_dtype).double()])
    for name, got, want, dtype in zip(
        ("dx", "dy", "dw", "db"),
        params,
        ref_params,
        (torch.float32, y_dtype, torch.float32, torch.float32),
        strict=True,
    ):
        assert got.grad.dtype == dtype, name
        # dw/db sum over rows: scale the tolerance with the number of rows summed.
        atol = tol(y_dtype) * (rows**0.5 if name in ("dw", "db") else 1)
        torch.testing.assert_close(got.grad.double(), want.grad, atol=atol, rtol=tol(y_dtype), msg=name)


def test_without_upstream_residual_gradient():
    # Only h is used downstream: the backward has no dx_out to add.
    x, y, scale, w, b = make(9, 32, torch.float32, torch.float32, True, seed=1)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    _, h = K.add_layer_norm(xr, yr, scale, w, b, 1e-5)
    h.sum().backward()
    x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
    reference(x64, y64, scale, w, b, 1e-5)[1].sum().backward()
    torch.testing.assert_close(xr.grad.double(), x64.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(yr.grad.double(), y64.grad, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_alone_matches_fp64(out_dtype):
    x, _, _, w, b = make(37, 48, torch.float32, torch.float32, False, seed=2)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    h = K.layer_norm(xr, wr, br, 1e-6, out_dtype)
    assert h.dtype == out_dtype
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    want = reference(x64, None, None, w64, b64, 1e-6)[1]
    torch.testing.assert_close(h.double(), want, atol=tol(out_dtype), rtol=tol(out_dtype))
    g = torch.randn(37, 48, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    h.backward(g.to(out_dtype))
    want.backward(g.to(out_dtype).double())
    for got, ref in ((xr, x64), (wr, w64), (br, b64)):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=5 * tol(out_dtype), rtol=tol(out_dtype))


def test_outputs_are_fully_written(monkeypatch):
    # Every buffer the launchers allocate starts as NaN: each element of every output and
    # gradient must be written by the kernels (19 rows leave a partial last row tile).
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    x, y, scale, w, b = make(19, 48, torch.float32, torch.float32, True, seed=4)
    params = [t.clone().requires_grad_() for t in (x, y, w, b)]
    x_out, h = K.add_layer_norm(params[0], params[1], scale, params[2], params[3], 1e-6)
    torch.autograd.backward([x_out, h], [torch.ones_like(x_out), torch.ones_like(h)])
    for t in (x_out, h, *(p.grad for p in params)):
        assert torch.isfinite(t).all()
    ref_x, ref_h = reference(x, y, scale, w, b, 1e-6)
    torch.testing.assert_close(x_out.double(), ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), ref_h, atol=2e-5, rtol=2e-5)


def test_bad_inputs_are_rejected():
    x, y, scale, w, b = make(4, 8, torch.float32, torch.float32, True, seed=5)
    with pytest.raises(ValueError, match="rows, D"):
        K.add_layer_norm(x[None], y[None], None, w, b, 1e-6)
    with pytest.raises(ValueError, match="x's shape"):
        K.add_layer_norm(x, y[:, :4], None, w, b, 1e-6)
    with pytest.raises(ValueError, match="weight/bias"):
        K.add_layer_norm(x, y, None, w[:4], b, 1e-6)
    with pytest.raises(ValueError, match="scale must be"):
        K.add_layer_norm(x, y, scale[:2], w, b, 1e-6)
    with pytest.raises(ValueError, match="D <= 8192"):
        K.layer_norm(
            torch.zeros(1, 8193, device=DEVICE),
            torch.ones(8193, device=DEVICE),
            torch.zeros(8193, device=DEVICE),
            1e-6,
        )


@pytest.mark.gpu
def test_gpu_vit_small_shapes_bf16():
    # The real layout: 2x224 + 10x96 crops of 4 images at ViT-S width, fp32 residual, bf16 branch.
    rows = 8 * 197 + 40 * 37
    x, y, scale, w, b = make(rows, 384, torch.float32, torch.bfloat16, True, seed=6)
    params = [t.clone().requires_grad_() for t in (x, y, w, b)]
    x_out, h = K.add_layer_norm(params[0], params[1], scale, params[2], params[3], 1e-6, torch.bfloat16)
    ref_params = [t.detach().double().requires_grad_() for t in (x, y, w, b)]
    ref_x, ref_h = reference(ref_params[0], ref_params[1], scale, ref_params[2], ref_params[3], 1e-6)
    torch.testing.assert_close(x_out.double(), ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), ref_h, atol=2e-2, rtol=2e-2)
    g = torch.randn(rows, 384, device="cuda")
    torch.autograd.backward([x_out, h], [g, g.bfloat16()])
    torch.autograd.backward([ref_x, ref_h], [g.double(), g.bfloat16().double()])
    for got, ref in zip(params, ref_params, strict=True):
        err = (got.grad.double() - ref.grad).norm() / ref.grad.norm()
        assert err < 1e-2, err
