"""Attention backends against an fp64 reference, backend selection and its fallbacks."""

from __future__ import annotations

import builtins
import warnings

import pytest
import torch

from dino_fast.models import attention as A

HAS_CUDA = torch.cuda.is_available()


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


def qkv_views(b: int, n: int, heads: int, head_dim: int, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v as the model makes them: strided (B, H, N, hd) views of one (B, N, 3*D) matmul output."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * heads * head_dim, generator=gen).to(device=device, dtype=dtype)
    return tuple(t.transpose(1, 2) for t in qkv.view(b, n, 3, heads, head_dim).unbind(2))


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    # Probe verdicts and warnings are process-wide caches; each test starts from empty ones.
    monkeypatch.setattr(A, "_PROBES", {})
    monkeypatch.setattr(A, "_WARNED", set())


# Shapes: B=1 and 3 (no batch-of-2 luck), N=1 (a single CLS token), 37 (a 96-px crop at
# patch 16: 1 + 6*6) and 50 (not a multiple of any kernel tile), head_dim 8 and 64.
SHAPES = [(1, 1, 2, 8), (3, 37, 3, 64), (2, 50, 6, 8)]


@pytest.mark.parametrize("backend", ["sdpa", "explicit", "sdpa:math", "auto"])
@pytest.mark.parametrize("shape", SHAPES)
def test_backends_match_fp64_reference(backend, shape):
    q, k, v = qkv_views(*shape)
    out = A.attention(q, k, v, backend)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_sdpa_and_explicit_agree_fp32_with_scale_and_cls_queries():
    q, k, v = qkv_views(3, 37, 3, 64, seed=1)
    # CLS-only queries (Nq=1 against Nk=37) and a non-default scale, as the last block / qk_scale use.
    q_cls = q[:, :, :1]
    for qq in (q, q_cls):
        sdpa = A.attention(qq, k, v, "sdpa", scale=0.3)
        explicit = A.attention(qq, k, v, "explicit", scale=0.3)
        torch.testing.assert_close(sdpa, explicit, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sdpa.double(), reference(qq, k, v, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_gradients_match_fp64_reference(backend):
    q, k, v = (t.detach().requires_grad_() for t in qkv_views(3, 37, 2, 8, seed=2))
    grad_out = torch.randn(3, 2, 37, 8, generator=torch.Generator().manual_seed(3))
    torch.autograd.backward(A.attention(q, k, v, backend), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    torch.autograd.backward(reference(q64, k64, v64), grad_out.double())
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_explicit_gradcheck_fp64():
    q, k, v = (t.double().detach().requires_grad_() for t in qkv_views(2, 5, 2, 4, seed=4))
    assert torch.autograd.gradcheck(lambda a, b, c: A.attention(a, b, c, "explicit"), (q, k, v))


def test_attention_with_weights_returns_the_softmax():
    q, k, v = qkv_views(2, 37, 3, 8, seed=5)
    out, weights = A.attention_with_weights(q, k, v)
    assert weights.shape == (2, 3, 37, 37)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 37))
    scores = q.double() @ k.double().transpose(-2, -1) * 8**-0.5
    torch.testing.assert_close(weights.double(), scores.softmax(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_a_clear_value_error():
    q, k, v = qkv_views(1, 4, 1, 8)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*sdpa"):
        A.attention(q, k, v, "flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.check_backend("SDPA")


def test_bad_shapes_and_mixed_dtypes_are_rejected():
    q, k, v = qkv_views(2, 4, 2, 8)
    with pytest.raises(ValueError, match="4-D"):
        A.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="shape mismatch"):
        A.attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="share dtype"):
        A.attention(q, k.double(), v)


def test_pinned_kernel_that_cannot_run_raises_with_the_fix():
    # The memory-efficient kernel has no CPU implementation (and none for these inputs on CUDA
    # without the right dtype/alignment), so pinning it on CPU must fail loudly, not fall back.
    q, k, v = qkv_views(1, 4, 1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's own "why not" warnings
        with pytest.raises(RuntimeError, match=r"'sdpa:efficient' cannot run.*use 'sdpa'"):
            A.attention(q, k, v, "sdpa:efficient")


def test_xformers_request_without_xformers_warns_once_and_uses_sdpa(monkeypatch):
    real_import = builtins.__import__

    def no_xformers(name, *args, **kwargs):
        if name.startswith("xformers"):
            raise ImportError("simulated: no xformers here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    monkeypatch.setattr(
        A.importlib.util, "find_spec", lambda name, package=None: object()
    )  # "installed" but broken
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    q, k, v = qkv_views(2, 37, 2, 8, device=device)
    with pytest.warns(RuntimeWarning, match="'xformers' unavailable, using 'sdpa'") as record:
        out = A.attention(q, k, v, "xformers")
        again = A.attention(q, k, v, "xformers")
    assert len([w for w in record if "xformers" in str(w.message)]) == 1
    want = "simulated: no xformers here" if HAS_CUDA else "need a CUDA device"
    assert want in str(record[0].message)
    torch.testing.assert_close(out, A.attention(q, k, v, "sdpa"))
    torch.testing.assert_close(again, out)


def test_auto_is_sdpa_on_cpu_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert A.resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    assert A.resolve_backend("explicit", "cpu", torch.float32) == "explicit"
    assert A.resolve_backend("sdpa:math", "cpu", torch.bfloat16) == "sdpa:math"


def test_failed_xformers_probe_is_cached_with_its_reason(monkeypatch):
    calls = []

    def failing_probe(device, dtype):
        calls.append((device, dtype))
        return "simulated probe mismatch"

    monkeypatch.setattr(A, "_xformers_reason", failing_probe)
    for _ in range(3):
        assert A.xformers_unavailable_reason("cpu", torch.float32) == "simulated probe mismatch"
    assert len(calls) == 1
    with pytest.warns(RuntimeWarning, match="simulated probe mismatch"):
        assert A.resolve_backend("xformers", "cpu", torch.float32) == "sdpa"


def test_varlen_reasons_on_cpu_and_for_bad_head_dims():
    assert "CUDA only" in A.varlen_unavailable_reason("cpu", torch.bfloat16)
    assert "multiple of 8" in A.varlen_unavailable_reason("cpu", torch.bfloat16, head_dim=12)
    assert "at most 256" in A.varlen_unavailable_reason("cpu", torch.bfloat16, head_dim=512)
    verdicts = A.prepare("cpu", torch.float32)
    assert set(verdicts) == {"xformers", "varlen"} and all(verdicts.values())
    assert A.describe()  # the verdicts are now recorded for logs


def test_cumulative_lengths():
    cu = A.cumulative_lengths(((2, 5), (3, 2)), "cpu")
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 5, 10, 12, 14, 16]
    assert A.cumulative_lengths(((1, 7),), "cpu").tolist() == [0, 7]


def test_resolution_traces_without_graph_breaks():
    # Under torch.compile(fullgraph=True): cached verdicts are read, an unprobed one means "not
    # available" without probing, and the xformers fallback does not warn from inside the trace.
    A.prepare("cpu", torch.bfloat16)

    def f(q):
        ok = A.varlen_unavailable_reason(q.device, q.dtype) is None
        backend = A.resolve_backend("xformers", q.device, q.dtype)
        unprobed = A.varlen_unavailable_reason(q.device, torch.float16)
        return q * 2 if ok or backend != "sdpa" or unprobed is None else q + 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.compile(f, fullgraph=True, backend="eager")(torch.full((2,), 3.0, dtype=torch.bfloat16))
    torch.testing.assert_close(out, torch.full((2,), 4.0, dtype=torch.bfloat16))  # every verdict "no"


def test_probes_do_not_touch_the_global_rng(monkeypatch):
    # Drop path reproduces the official RNG stream; a probe that drew random numbers would shift it.
    torch.manual_seed(0)
    state = torch.get_rng_state()
    A.prepare("cpu", torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------
# GPU (bf16), run by benchmarks/gpu_check.sh on a lent device
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "explicit", "auto", "xformers"])
@pytest.mark.parametrize("shape", [(4, 197, 6, 64), (7, 37, 6, 64), (3, 50, 3, 64)])
def test_gpu_bf16_backends_match_fp64(backend, shape):
    q, k, v = qkv_views(*shape, dtype=torch.bfloat16, device="cuda", seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # xformers may fall back to sdpa here
        out = A.attention(q, k, v, backend)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_xformers_is_used_only_when_its_probe_passes():
    reason = A.xformers_unavailable_reason("cuda", torch.bfloat16)
    resolved = A.resolve_backend("auto", "cuda", torch.bfloat16)
    assert resolved == ("xformers" if reason is None else "sdpa")


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", ["sdpa:flash", "sdpa:efficient", "sdpa:math"])
def test_gpu_pinned_sdpa_kernels_bf16(pinned):
    q, k, v = qkv_views(4, 197, 6, 64, dtype=torch.bfloat16, device="cuda", seed=7)
    torch.testing.assert_close(
        A.attention(q, k, v, pinned).double(), reference(q, k, v), atol=2e-2, rtol=2e-2
    )


@pytest.mark.gpu
def test_gpu_varlen_matches_per_group_attention_bf16():
    reason = A.varlen_unavailable_reason("cuda", torch.bfloat16)
    if reason is not None and "torch.nn.attention.varlen" in reason:
        pytest.skip(reason)  # an older torch without the op; anything else is a failure
    assert reason is None, reason
    groups, heads, head_dim = ((6, 197), (15, 37)), 6, 64
    total = sum(n * length for n, length in groups)
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(total, 3, heads, head_dim, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    grad = torch.randn(total, heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
    cu = A.cumulative_lengths(groups, "cuda")
    out = A.varlen_attention(*qkv.unbind(1), cu, cu, 197, 197)
    out.backward(grad)
    ref_qkv = qkv.detach().double().requires_grad_()
    outs, offset = [], 0
    for n, length in groups:
        q, k, v = (
            t.transpose(1, 2)
            for t in ref_qkv[offset : offset + n * length].view(n, length, 3, heads, head_dim).unbind(2)
        )
        outs.append(reference(q, k, v).transpose(1, 2).reshape(n * length, heads, head_dim))
        offset += n * length
    ref = torch.cat(outs)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(qkv.grad.double(), ref_qkv.grad, atol=5e-2, rtol=5e-2)
