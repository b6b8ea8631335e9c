"""The fused DINO loss (dino_fast.ops.loss, kernels/dino_loss.py, csrc/dino_loss.cpp) against the fp64
spec in dino_fast.ops.reference and the official formulas.

Every backend runs here: ``torch`` and ``native`` on the CPU, ``triton`` on CUDA when there is a GPU
and otherwise on the CPU under the Triton interpreter (tests/conftest.py). The interpreter executes
every program in Python, so Triton gets a representative subset at K = 65536 (two samples, four
crops: 32 column chunks) instead of every large case.

Temperatures are 0.1 / 0.04 / 0.05 in the fp64 comparisons: the Triton kernels take temperatures as
fp32 scalars, and these have exact fp32 inverses, so fp64 results can be compared at 1e-10.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dino_fast.official.loss import DINOLoss as OfficialDINOLoss
from dino_fast.official.loss import dino_loss as official_dino_loss
from dino_fast.official.loss import update_center as official_center_update
from dino_fast.ops import backends, native, reference
from dino_fast.ops import loss as dino_loss_module
from dino_fast.ops.backends import BACKENDS, BackendUnavailableError
from dino_fast.ops.loss import DINOLoss, dino_loss, dino_loss_with_stats

# Loading dino_fast._C registers torch.ops.dino_fast_native.*, which some tests call directly. A
# missing or broken extension fails those tests (and the native backend's) with this reason.
NATIVE_MODULE, NATIVE_REASON = native.load()
# Triton runs compiled on a GPU; under the interpreter (no GPU, or TRITON_INTERPRET=1 on a GPU
# machine, as benchmarks/gpu_check.sh runs the CPU suite) its tensors stay on the CPU.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu")
TOLERANCE = {  # (rtol for loss and statistics, gradient tolerance relative to max |grad|)
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-3),  # inputs are exact in fp32; only the fp16 gradient is rounded
    torch.bfloat16: (2e-5, 1.6e-2),
}


def device_for(backend: str) -> torch.device:
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


def make_inputs(batch: int, ncrops: int, dim: int, n_global: int = 2, *, seed: int = 0, scale: float = 3.0):
    """fp64 student (ncrops*B, K), teacher (n_global*B, K) and center (1, K)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(ncrops * batch, dim, generator=gen, dtype=torch.float64) * scale
    teacher = torch.randn(n_global * batch, dim, generator=gen, dtype=torch.float64) * scale
    center = torch.randn(1, dim, generator=gen, dtype=torch.float64)
    return student, teacher, center


def expected(student, teacher, center, **kwargs):
    """fp64 loss, gradient, row statistics and teacher column sum from the spec."""
    s, t, c = student.double().cpu(), teacher.double().cpu(), center.double().cpu()
    student_logits, teacher_logits = s / kwargs["student_temp"], (t - c) / kwargs["teacher_temp"]
    return {
        "loss": reference.reference_dino_loss(s, t, c, **kwargs),
        "grad": reference.reference_dino_loss_grad(s, t, c, **kwargs),
        "student_max": student_logits.amax(dim=-1),
        "student_lse": torch.logsumexp(student_logits, dim=-1),
        "teacher_max": teacher_logits.amax(dim=-1),
        "teacher_lse": torch.logsumexp(teacher_logits, dim=-1),
        "colsum": t.sum(dim=0),
    }


def with_statistics(loss, student_stats, teacher_stats, colsum, grad):
    """A backend's outputs keyed like ``expected``: row statistics (M, log Z) -> max and M + log Z."""
    assert student_stats.shape[1] == teacher_stats.shape[1] == 2
    assert (student_stats[:, 1] >= 0).all() and (teacher_stats[:, 1] >= 0).all(), (
        "log Z >= 0 when M is the max"
    )
    return {
        "loss": loss,
        "grad": grad,
        "student_max": student_stats[:, 0],
        "student_lse": student_stats.double().sum(dim=-1),
        "teacher_max": teacher_stats[:, 0],
        "teacher_lse": teacher_stats.double().sum(dim=-1),
        "colsum": colsum,
    }


def run_backend(backend, student, teacher, center, **kwargs):
    """Loss, statistics and gradient from one backend through the public op."""
    device = device_for(backend)
    s = student.to(device).requires_grad_(True)
    loss, student_stats, teacher_stats, colsum = dino_loss_with_stats(
        s, teacher.to(device), center.to(device), backend=backend, **kwargs
    )
    loss.backward()
    return with_statistics(loss, student_stats, teacher_stats, colsum, s.grad)


def assert_matches(actual, want, dtype):
    rtol, grad_tol = TOLERANCE[dtype]
    for key in ("loss", "student_max", "student_lse", "teacher_max", "teacher_lse", "colsum"):
        torch.testing.assert_close(actual[key].double().cpu(), want[key], rtol=rtol, atol=rtol, msg=key)
    grad_scale = want["grad"].abs().max().item()
    torch.testing.assert_close(
        actual["grad"].double().cpu(), want["grad"], rtol=grad_tol, atol=grad_tol * grad_scale, msg="grad"
    )


SHAPES = [
    (1, 2, 1000, 2),  # smallest batch and crop count; K not a power of two
    (3, 4, 4099, 2),  # odd batch; K prime, just past 4096: a last block with 3 live columns
    (3, 12, 1000, 2),  # the paper's 2 global + 10 local crops
    # Many samples: Triton loops several samples per program.
    pytest.param(64, 2, 1000, 2, marks=pytest.mark.slow),
    # The default head width: 64 column chunks of the GPU's 1024-column tile, 16 of the interpreter's.
    pytest.param(2, 4, 65536, 2, marks=pytest.mark.slow),
    (3, 5, 300, 1),  # one global view: student view 0 is never paired, n_v differs per view
    (2, 6, 257, 3),  # three global views: padded teacher rows in the Triton tiles
]


@pytest.mark.parametrize(("batch", "ncrops", "dim", "n_global"), SHAPES)
def test_matches_reference_fp64(backend, batch, ncrops, dim, n_global):
    student, teacher, center = make_inputs(batch, ncrops, dim, n_global)
    kwargs = dict(ncrops=ncrops, n_global=n_global, teacher_temp=0.04, student_temp=0.1)
    actual = run_backend(backend, student, teacher, center, **kwargs)
    assert actual["loss"].dtype == torch.float64 and actual["loss"].dim() == 0
    assert actual["grad"].dtype == torch.float64
    assert_matches(actual, expected(student, teacher, center, **kwargs), torch.float64)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_all_crops_at_full_width_fp64(backend):
    # B=1 with 12 crops at K=65536 (too slow for the interpreter; Triton covers 65536 above).
    student, teacher, center = make_inputs(1, 12, 65536)
    kwargs = dict(ncrops=12, n_global=2, teacher_temp=0.05, student_temp=0.1)
    actual = run_backend(backend, student, teacher, center, **kwargs)
    assert_matches(actual, expected(student, teacher, center, **kwargs), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("batch", "ncrops", "dim"),
    [
        (3, 12, 4099),  # all crops, odd batch, K prime
        pytest.param(2, 4, 65536, marks=pytest.mark.slow),  # head width: K-sums of 65536 half-precision terms
    ],
)
def test_low_precision_inputs(backend, dtype, batch, ncrops, dim):
    student, teacher, center = make_inputs(batch, ncrops, dim, seed=1)
    # The reference sees exactly the rounded values the kernels see; the center stays fp32.
    student, teacher, center = student.to(dtype), teacher.to(dtype), center.float()
    kwargs = dict(ncrops=ncrops, n_global=2, teacher_temp=0.07, student_temp=0.1)
    actual = run_backend(backend, student, teacher, center, **kwargs)
    assert actual["loss"].dtype == torch.float32 and actual["loss"].dim() == 0
    assert actual["grad"].dtype == dtype
    assert actual["colsum"].dtype == torch.float32
    assert_matches(actual, expected(student, teacher, center, **kwargs), dtype)


@pytest.mark.parametrize(
    ("batch", "dim", "block_k", "samples_per_program"),
    [
        (5, 300, 64, 2),  # 5 chunks, the last 44 columns wide; the last group holds one of two samples
        (3, 1100, 256, 3),  # 5 chunks, one sample group
        (4, 100, 16, 1),  # 7 chunks of the smallest block, one sample per program
    ],
)
def test_triton_launch_configs(batch, dim, block_k, samples_per_program):
    """The GPU's block sizes and sample grouping, forced onto small inputs."""
    from dino_fast.kernels import dino_loss as triton_dino_loss

    student, teacher, center = make_inputs(batch, 4, dim)
    kwargs = dict(ncrops=4, n_global=2, teacher_temp=0.04, student_temp=0.1)
    s, t, c = (x.to(TRITON_DEVICE) for x in (student, teacher, center))
    loss, student_stats, teacher_stats, colsum = triton_dino_loss.dino_loss_forward(
        s, t, c, block_k=block_k, samples_per_program=samples_per_program, **kwargs
    )
    grad = triton_dino_loss.dino_loss_backward(
        torch.ones((), dtype=torch.float64, device=s.device),
        s,
        t,
        c,
        student_stats,
        teacher_stats,
        block_k=block_k,
        **kwargs,
    )
    got = with_statistics(loss, student_stats, teacher_stats, colsum, grad)
    assert_matches(got, expected(student, teacher, center, **kwargs), torch.float64)


def test_strided_inputs(backend):
    """Rows with padding (a column slice of a wider buffer) and a column-major teacher."""
    student, teacher, center = make_inputs(3, 4, 300, seed=7)
    padded_student = torch.zeros(12, 307, dtype=torch.float64)
    padded_student[:, :300] = student
    column_major_teacher = teacher.t().contiguous().t()
    kwargs = dict(ncrops=4, n_global=2, teacher_temp=0.04, student_temp=0.1)
    actual = run_backend(backend, padded_student[:, :300], column_major_teacher, center, **kwargs)
    assert_matches(actual, expected(student, teacher, center, **kwargs), torch.float64)


def test_triton_autograd_function_standalone():
    """kernels/dino_loss.py on its own: the autograd Function returns the loss and the column sum."""
    from dino_fast.kernels import dino_loss as triton_dino_loss

    student, teacher, center = make_inputs(3, 4, 333)
    kwargs = dict(ncrops=4, n_global=2, teacher_temp=0.04, student_temp=0.1)
    s = student.to(TRITON_DEVICE).requires_grad_(True)
    loss, colsum = triton_dino_loss.dino_loss_and_column_sum(
        s, teacher.to(TRITON_DEVICE), center.to(TRITON_DEVICE), **kwargs
    )
    (2.5 * loss).backward()
    want = expected(student, teacher, center, **kwargs)
    torch.testing.assert_close(loss.cpu(), want["loss"], rtol=1e-10, atol=0)
    torch.testing.assert_close(colsum.cpu(), want["colsum"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.grad.cpu(), 2.5 * want["grad"], rtol=1e-10, atol=1e-14)


def test_large_logits_and_saturated_teacher(backend):
    batch, ncrops, dim = 3, 4, 1000
    gen = torch.Generator().manual_seed(3)
    # Student logits up to 1e4 in fp32, i.e. s / tau_s ~ 1e5: softmaxes are one-hot and a naive
    # lse - <q, s / tau_s> loses every digit.
    student = (torch.rand(ncrops * batch, dim, generator=gen) * 2 - 1) * 1e4
    teacher = torch.randn(2 * batch, dim, generator=gen)
    teacher[0] = -1e4
    teacher[0, 17] = 1e4  # one column takes all the mass: q is exactly one-hot
    teacher[1] = 5.0  # a constant row: q uniform
    teacher[2 * batch - 1] = torch.where(torch.arange(dim) % 2 == 0, 1e4, -1e4)  # two-level saturated row
    center = torch.zeros(1, dim)
    kwargs = dict(ncrops=ncrops, n_global=2, teacher_temp=0.04, student_temp=0.1)
    actual = run_backend(backend, student, teacher, center, **kwargs)
    assert torch.isfinite(actual["loss"]).all()
    assert torch.isfinite(actual["grad"]).all()
    assert torch.isfinite(actual["student_lse"]).all() and torch.isfinite(actual["teacher_lse"]).all()
    # A one-hot softmax stays exactly one-hot: x - M is exact for the max entry and log Z = 0.
    assert (actual["teacher_lse"][0] - actual["teacher_max"][0].double()).item() == 0.0
    want = expected(student, teacher, center, **kwargs)
    torch.testing.assert_close(actual["loss"].double().cpu(), want["loss"], rtol=1e-5, atol=0)
    scale = want["grad"].abs().max().item()
    torch.testing.assert_close(actual["grad"].double().cpu(), want["grad"], rtol=1e-4, atol=1e-5 * scale)


def _nan_like(shape, dtype, row_padding=0):
    """A NaN-filled tensor of ``shape`` whose rows sit inside a wider NaN buffer (row stride > K)."""
    rows, dim = shape
    return torch.full((rows, dim + row_padding), float("nan"), dtype=dtype)[:, :dim]


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_poisoned_gradient_buffer_is_fully_overwritten(backend, dtype):
    batch, ncrops, dim = 3, 4, 1000
    student, teacher, center = make_inputs(batch, ncrops, dim, seed=4)
    student, teacher, center = student.to(dtype), teacher.to(dtype), center.float()
    kwargs = dict(ncrops=ncrops, n_global=2, teacher_temp=0.04, student_temp=0.1)
    want = expected(student, teacher, center, **kwargs)
    device = device_for(backend)
    s, t, c = (x.to(device) for x in (student, teacher, center))
    # Rows padded by 7 NaN columns: a write past K would overwrite them, a missed write leaves NaN.
    base = _nan_like(s.shape, dtype, row_padding=7).to(device)
    grad_out = base[:, :dim]
    one = torch.ones((), device=device)
    if backend == "native":
        assert NATIVE_MODULE is not None, NATIVE_REASON
        _, student_stats, teacher_stats, _ = torch.ops.dino_fast_native.dino_loss_fwd(
            s, t, c, ncrops, 2, 0.04, 0.1
        )
        returned = torch.ops.dino_fast_native.dino_loss_bwd(
            one, s, t, c, student_stats, teacher_stats, ncrops, 2, 0.04, 0.1, grad_out
        )
    else:
        from dino_fast.kernels import dino_loss as triton_dino_loss

        _, student_stats, teacher_stats, _ = triton_dino_loss.dino_loss_forward(
            s, t, c, block_k=256, **kwargs
        )
        returned = triton_dino_loss.dino_loss_backward(
            one, s, t, c, student_stats, teacher_stats, block_k=256, grad_out=grad_out, **kwargs
        )
    assert returned.data_ptr() == grad_out.data_ptr()
    assert not torch.isnan(grad_out).any()
    assert torch.isnan(base[:, dim:].float()).all(), "the kernel wrote past the last column"
    scale = want["grad"].abs().max().item()
    tol = TOLERANCE[dtype][1]
    torch.testing.assert_close(grad_out.double().cpu(), want["grad"], rtol=tol, atol=tol * scale)


def test_triton_workspaces_need_no_initialisation(monkeypatch):
    """Every buffer the Triton launchers allocate (chunk statistics, column-sum partials, outputs)
    starts as NaN here: each must be fully written before it is read."""
    from dino_fast.kernels import dino_loss as triton_dino_loss

    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    student, teacher, center = make_inputs(5, 4, 1000)
    kwargs = dict(ncrops=4, n_global=2, teacher_temp=0.04, student_temp=0.1)
    s, t, c = (x.to(TRITON_DEVICE) for x in (student, teacher, center))
    monkeypatch.setattr(torch, "empty", nan_empty)
    loss, student_stats, teacher_stats, colsum = triton_dino_loss.dino_loss_forward(
        s, t, c, block_k=128, samples_per_program=2, **kwargs
    )
    grad = triton_dino_loss.dino_loss_backward(
        torch.ones((), dtype=torch.float64, device=s.device),
        s,
        t,
        c,
        student_stats,
        teacher_stats,
        block_k=128,
        **kwargs,
    )
    monkeypatch.undo()
    got = with_statistics(loss, student_stats, teacher_stats, colsum, grad)
    assert_matches(got, expected(student, teacher, center, **kwargs), torch.float64)


def test_gradient_reaches_student_only():
    student, teacher, center = make_inputs(2, 3, 50)
    for x in (student, teacher, center):
        x.requires_grad_(True)
    dino_loss(student, teacher, center, ncrops=3, teacher_temp=0.04, backend="native").backward()
    assert student.grad is not None and teacher.grad is None and center.grad is None


HOPPER_COMPILE_SCRIPT = r"""
import json, subprocess, sys, tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dino_fast.kernels import dino_loss as k

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
TL = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}
K = 65536
block = k._block_k(K, None)


def signature(fn, dtype, acc):
    types = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
        elif name in ("student_ptr", "teacher_ptr", "grad_ptr"):
            types[name] = "*" + dtype
        elif name in ("center_ptr", "grad_loss_ptr"):
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = "*" + acc
        elif name.startswith("inv_"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def compile_one(fn, dtype, constexprs, **options):
    acc = "fp64" if dtype == "fp64" else "fp32"
    sig = signature(fn, dtype, acc)
    # What a launch at K = 65536 specializes: 16-byte aligned pointers, K and strides divisible by 16.
    divisible = {"K", "stride_s", "stride_t", "stride_g"}
    aligned = [i for i, n in enumerate(sig) if sig[n].startswith("*") or n in divisible]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    constexprs = dict(constexprs, ACC=TL[acc])
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "k.ptx")
        ptx.write_text(compiled.asm["ptx"])
        info = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp, "k.cubin"))],
                              capture_output=True, text=True, check=True).stderr
    regs = int(info.split("Used ")[1].split(" registers")[0])
    spills = int(info.split("bytes spill stores")[0].split(",")[-1].strip())
    return {"kernel": fn.__name__, "dtype": dtype, "constexprs": {n: str(v) for n, v in constexprs.items()},
            "registers": regs, "spill_bytes": spills}


rows = []
for dtype, ncrops, n_global in [("bf16", 12, 2), ("fp32", 12, 2), ("fp16", 4, 1), ("fp64", 6, 3)]:
    g_pad = triton.next_power_of_2(n_global)
    nstat = 2 * g_pad + 2 * ncrops + g_pad * ncrops
    common = dict(NCROPS=ncrops, N_GLOBAL=n_global, G_PAD=g_pad)
    rows.append(compile_one(k._dino_loss_fwd_kernel, dtype, dict(common, NSTAT=nstat, BLOCK_K=block),
                            num_warps=k._num_warps(block), enable_fp_fusion=False))
    rows.append(compile_one(k._dino_loss_bwd_kernel, dtype, dict(common, BLOCK_K=block),
                            num_warps=k._num_warps(block), enable_fp_fusion=False))
    rows.append(compile_one(k._dino_loss_combine_kernel, dtype,
                            dict(common, V_PAD=triton.next_power_of_2(ncrops), NSTAT=nstat, CHUNK_BLOCK=64,
                                 COL_BLOCK=256), num_warps=4))
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_hopper():
    """The interpreter accepts code the compiler rejects, so the kernels are also compiled for sm_90
    (no GPU needed: triton ships ptxas) with the launch configuration a K=65536 call uses, and the
    register budget the launch configuration was chosen for is held: no spills in the training
    dtypes (bf16/fp32/fp16), and at most 128 registers for the bf16/fp32 anchors (>= 4 resident
    programs of 4 warps per SM). fp64 is for validation only: its kernels must compile, but how
    many bytes they spill is the compiler's business (triton 3.6 spills 20 in the combine kernel,
    3.8 none)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", HOPPER_COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(rows) == 12
    assert {row["dtype"] for row in rows} == {"bf16", "fp32", "fp16", "fp64"}
    for row in rows:
        if row["dtype"] != "fp64":
            assert row["spill_bytes"] == 0, row
        if row["dtype"] in ("bf16", "fp32") and row["kernel"] != "_dino_loss_combine_kernel":
            assert row["registers"] <= 128, row


def _bad_inputs():
    s, t, c = make_inputs(2, 4, 10)
    meta_teacher = torch.empty(t.shape, dtype=t.dtype, device="meta")
    # (case id, student, teacher, center, extra kwargs, exception type, message pattern)
    return [
        ("student 3-D", s.view(8, 2, 5), t, c, {}, ValueError, "must be 2-D"),
        ("rows not a multiple of ncrops", s[:7], t, c, {}, ValueError, "not a positive multiple of ncrops=4"),
        ("teacher rows", s, t[:3], c, {}, ValueError, "needs n_global \\* B = 4"),
        ("K mismatch", s, t[:, :9], c, {}, ValueError, "K=9 columns"),
        ("center shape", s, t, c[:, :9], {}, ValueError, "center must have shape"),
        (
            "center 2 rows",
            s,
            t,
            torch.zeros(2, 5, dtype=torch.float64),
            {},
            ValueError,
            "center must have shape",
        ),
        ("dtype mismatch", s, t.float(), c, {}, TypeError, "cast one so both share a dtype"),
        ("integer logits", s.long(), t.long(), c, {}, TypeError, "not supported"),
        ("integer center", s, t, c.long(), {}, TypeError, "floating-point"),
        ("device mismatch", s, meta_teacher, c, {}, ValueError, "must be on one device"),
        ("one crop", s, t, c, {"ncrops": 1, "n_global": 1}, ValueError, "ncrops must be >= 2"),
        ("more global views than crops", s, t, c, {"n_global": 5}, ValueError, "n_global must be in"),
        ("zero temperature", s, t, c, {"teacher_temp": 0.0}, ValueError, "teacher_temp must be a positive"),
        (
            "nan temperature",
            s,
            t,
            c,
            {"student_temp": math.nan},
            ValueError,
            "student_temp must be a positive",
        ),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_clear_errors_for_bad_inputs(case):
    _, student, teacher, center, extra, error, pattern = case
    kwargs = dict(ncrops=4, teacher_temp=0.04, student_temp=0.1) | extra
    with pytest.raises(error, match=pattern):
        dino_loss(student, teacher, center, **kwargs)


def test_kernel_entry_points_check_their_inputs():
    from dino_fast.kernels import dino_loss as triton_dino_loss

    assert NATIVE_MODULE is not None, NATIVE_REASON
    student, teacher, center = make_inputs(2, 4, 10)
    with pytest.raises(RuntimeError, match="not a positive multiple of ncrops=3"):
        torch.ops.dino_fast_native.dino_loss_fwd(student, teacher, center, 3, 2, 0.04, 0.1)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        torch.ops.dino_fast_native.dino_loss_fwd(student, teacher.float(), center, 4, 2, 0.04, 0.1)
    with pytest.raises(ValueError, match="teacher_output must be"):
        triton_dino_loss.dino_loss_forward(student, teacher[:2], center, ncrops=4, teacher_temp=0.04)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        triton_dino_loss.dino_loss_forward(student, teacher, center, ncrops=4, teacher_temp=0.04, block_k=100)


def _spy_on_forward(monkeypatch):
    calls = []
    for name, impl in list(dino_loss_module._FORWARD.items()):

        def spy(*args, _name=name, _impl=impl):
            calls.append(_name)
            return _impl(*args)

        monkeypatch.setitem(dino_loss_module._FORWARD, name, spy)
    return calls


def test_backend_choice_argument_environment_and_default(monkeypatch):
    student, teacher, center = make_inputs(2, 3, 64)
    kwargs = dict(ncrops=3, teacher_temp=0.04)
    calls = _spy_on_forward(monkeypatch)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    dino_loss(student, teacher, center, **kwargs)
    assert calls == ["native"], "the default on CPU with the extension built is native"
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    dino_loss(student, teacher, center, **kwargs)
    assert calls[-1] == "torch", "DINO_FAST_BACKEND picks the backend when the call names none"
    dino_loss(student, teacher, center, backend="native", **kwargs)
    assert calls[-1] == "native", "an explicit backend= wins over the environment"
    module = DINOLoss(64, 3, 0.04, 0.04, 0, 1)
    module(student.float(), teacher.float(), 0)
    assert calls[-1] == "torch", "DINOLoss(backend=None) follows the environment too"


def test_forcing_an_unavailable_backend_says_why(monkeypatch):
    student, teacher, center = make_inputs(2, 3, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        dino_loss(student, teacher, center, ncrops=3, teacher_temp=0.04, backend="triton")
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="backend 'triton' is unavailable on cpu"):
        dino_loss(student, teacher, center, ncrops=3, teacher_temp=0.04)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        dino_loss(student, teacher, center, ncrops=3, teacher_temp=0.04, backend="cuda")


def test_torch_compile_fullgraph(monkeypatch):
    """A model calling dino_loss compiles as one graph; the op picks its backend at run time, so one
    compiled function serves every backend (chosen here through DINO_FAST_BACKEND)."""
    torch.manual_seed(0)
    batch, ncrops, dim, width = 3, 4, 257, 16
    head = nn.Linear(width, dim)
    x_student, x_teacher = torch.randn(ncrops * batch, width), torch.randn(2 * batch, width)
    center = torch.randn(1, dim)

    def step(x_student, x_teacher, center):
        return dino_loss(head(x_student), head(x_teacher).detach(), center, ncrops=ncrops, teacher_temp=0.04)

    def loss_and_grad(fn):
        head.zero_grad()
        loss = fn(x_student, x_teacher, center)
        loss.backward()
        return loss.detach(), head.weight.grad.clone()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    eager_loss, eager_grad = loss_and_grad(step)
    for backend in BACKENDS if TRITON_DEVICE.type == "cpu" else ["torch", "native"]:
        monkeypatch.setenv(backends.ENV_VAR, backend)
        loss, grad = loss_and_grad(compiled)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6, msg=backend)
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6, msg=backend)


@pytest.mark.slow
def test_torch_compile_with_inductor():
    """The default compiler, once: inductor lowers everything around the op (fake tensors and the
    autograd formula are exercised), the op itself stays a call."""
    torch.manual_seed(1)
    batch, ncrops, dim, width = 2, 3, 100, 8
    head = nn.Linear(width, dim)
    x_student, x_teacher, center = (
        torch.randn(ncrops * batch, width),
        torch.randn(2 * batch, width),
        torch.zeros(1, dim),
    )

    def step(x_student, x_teacher, center):
        student = torch.tanh(head(x_student)) * 5
        return dino_loss(
            student, head(x_teacher).detach(), center, ncrops=ncrops, teacher_temp=0.04, backend="native"
        )

    losses, grads = [], []
    for fn in (step, torch.compile(step, fullgraph=True)):
        head.zero_grad()
        loss = fn(x_student, x_teacher, center)
        loss.backward()
        losses.append(loss.detach())
        grads.append(head.weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_dino_loss_module_matches_official_over_epochs(backend):
    batch, ncrops, dim, nepochs = 3, 4, 777, 5
    args = (dim, ncrops, 0.04, 0.07, 3, nepochs)  # 3 warmup epochs: the temperature changes every step
    ours = DINOLoss(*args, student_temp=0.1, center_momentum=0.9, backend=backend).to(device_for(backend))
    official = OfficialDINOLoss(*args, student_temp=0.1, center_momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for epoch in range(nepochs):
        student = torch.randn(ncrops * batch, dim, generator=gen) * 2
        teacher = torch.randn(2 * batch, dim, generator=gen) * 2 + 1.5  # mean offset: the center moves
        s_ours = student.clone().to(device_for(backend)).requires_grad_(True)
        s_official = student.clone().requires_grad_(True)
        loss = ours(s_ours, teacher.to(device_for(backend)), epoch)
        loss_official = official(s_official, teacher, epoch)
        loss.backward()
        loss_official.backward()
        torch.testing.assert_close(
            loss.cpu(), loss_official.detach(), rtol=1e-5, atol=0, msg=f"epoch {epoch}"
        )
        torch.testing.assert_close(
            s_ours.grad.cpu(), s_official.grad, rtol=1e-4, atol=1e-9, msg=f"epoch {epoch}"
        )
        torch.testing.assert_close(
            ours.center.cpu(), official.center, rtol=1e-6, atol=1e-7, msg=f"epoch {epoch}"
        )
    assert ours.center.dtype == torch.float32 and ours.center.shape == (1, dim)


def test_dino_loss_module_state_dict_is_official():
    ours = DINOLoss(33, 4, 0.04, 0.04, 0, 2)
    official = OfficialDINOLoss(33, 4, 0.04, 0.04, 0, 2)
    assert list(ours.state_dict()) == list(official.state_dict()) == ["center"]
    student, teacher, _ = make_inputs(2, 4, 33)
    ours(student.float(), teacher.float(), 0)
    official.load_state_dict(ours.state_dict())  # the state dict sees the update of the last forward
    torch.testing.assert_close(
        official.center, official_center_update(torch.zeros(1, 33), teacher.float(), 0.9)
    )
    fresh = DINOLoss(33, 4, 0.04, 0.04, 0, 2)
    fresh.load_state_dict(official.state_dict())
    torch.testing.assert_close(fresh.center, official.center)
    assert [name for name, _ in fresh.named_buffers()] == ["center"]


def test_dino_loss_module_keeps_the_center_its_backward_needs():
    """The update replaces the center (as in the official code) instead of writing into the tensor
    the pending backward saved, so a backward after the update still uses the old center."""
    student, teacher, _ = make_inputs(2, 3, 40, seed=6)
    module = DINOLoss(40, 3, 0.04, 0.04, 0, 1, backend="native")
    module.center = torch.randn(1, 40)
    center_before = module.center.clone()
    s = student.float().requires_grad_(True)
    module(s, teacher.float(), 0).backward()
    want = reference.reference_dino_loss_grad(
        s.detach().double(), teacher, center_before.double(), ncrops=3, teacher_temp=0.04
    )
    torch.testing.assert_close(s.grad.double(), want, rtol=1e-4, atol=1e-9)
    assert not torch.equal(module.center, center_before)


def _distributed_inputs(rank: int, step: int, batch: int, ncrops: int, dim: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    student = torch.randn(ncrops * batch, dim, generator=gen)
    teacher = torch.randn(2 * batch, dim, generator=gen) + rank  # ranks differ, so the all-reduce matters
    return student, teacher


DIST_SHAPE = dict(batch=2, ncrops=3, dim=64)


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        module = DINOLoss(DIST_SHAPE["dim"], DIST_SHAPE["ncrops"], 0.04, 0.06, 2, 3, backend="native")
        losses, pending_kinds = [], []
        for step in range(3):
            student, teacher = _distributed_inputs(rank, step, **DIST_SHAPE)
            loss = module(student.requires_grad_(True), teacher, step)
            pending = module.__dict__["_pending_center"]
            pending_kinds.append(type(pending[0]).__name__ if pending is not None else None)
            loss.backward()
            losses.append(loss.detach())
        torch.save(
            {"losses": torch.stack(losses), "center": module.center, "pending": pending_kinds},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_dino_loss_module_all_reduces_the_center_across_ranks(tmp_path):
    world_size = 2
    mp.spawn(_distributed_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size)
    official = OfficialDINOLoss(DIST_SHAPE["dim"], DIST_SHAPE["ncrops"], 0.04, 0.06, 2, 3)
    want_losses = {rank: [] for rank in range(world_size)}
    for step in range(3):
        per_rank = [_distributed_inputs(rank, step, **DIST_SHAPE) for rank in range(world_size)]
        for rank, (student, teacher) in enumerate(per_rank):
            temp = official.teacher_temp_schedule[step]
            want_losses[rank].append(
                official_dino_loss(
                    student, teacher, official.center, ncrops=DIST_SHAPE["ncrops"], teacher_temp=temp
                )
            )
        all_teachers = torch.cat([teacher for _, teacher in per_rank])
        official.center = official_center_update(official.center, all_teachers, 0.9)
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        # The all-reduce was still pending when forward returned: it is issued asynchronously.
        assert all(kind is not None and kind != "NoneType" for kind in result["pending"]), result["pending"]
        torch.testing.assert_close(result["losses"], torch.stack(want_losses[rank]), rtol=1e-5, atol=0)
        torch.testing.assert_close(result["center"], official.center, rtol=1e-6, atol=1e-6)


def test_public_names():
    import dino_fast
    import dino_fast.ops

    assert dino_fast.ops.dino_loss is dino_loss
    assert dino_fast.DINOLoss is DINOLoss
    # registered under the dino_fast namespace
    assert torch.ops.dino_fast.dino_loss_with_stats.default is not None


def test_center_update_is_deferred_until_the_center_is_used():
    """Single process, with the pending-update machinery driven by hand: nothing touches the
    center until it is read, and every way of reading it first applies the update."""
    dim = 20
    teacher = torch.randn(4, dim)
    for read in (
        lambda m: m.center,
        lambda m: m.state_dict()["center"],
        lambda m: dict(m.named_buffers())["center"],
        lambda m: m.to(torch.float64).center,
        lambda m: copy.deepcopy(m)._buffers["center"],
    ):
        module = DINOLoss(dim, 2, 0.04, 0.04, 0, 1)
        module.__dict__["_pending_center"] = (None, teacher.sum(0, keepdim=True), 4)
        assert torch.equal(module._buffers["center"], torch.zeros(1, dim)), "the update ran early"
        got = read(module)
        torch.testing.assert_close(got.float(), official_center_update(torch.zeros(1, dim), teacher, 0.9))
        assert module.__dict__["_pending_center"] is None


# --- GPU (run by benchmarks/gpu_check.sh on a lent device) --------------------------------------

ANCHOR_KWARGS = dict(ncrops=12, n_global=2, teacher_temp=0.04, student_temp=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [64, 128])
def test_gpu_anchor_shapes_match_reference(batch):
    """bf16, K=65536, 2 + 10 crops: the Triton kernels against the fp32 torch formulas on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(batch)
    student = (torch.randn(12 * batch, 65536, device="cuda", generator=gen) * 3).bfloat16()
    teacher = (torch.randn(2 * batch, 65536, device="cuda", generator=gen) * 3).bfloat16()
    center = torch.randn(1, 65536, device="cuda", generator=gen)
    s = student.clone().requires_grad_(True)
    loss, student_stats, teacher_stats, colsum = dino_loss_with_stats(
        s, teacher, center, backend="triton", **ANCHOR_KWARGS
    )
    loss.backward()
    want_loss = reference.reference_dino_loss(student, teacher, center, **ANCHOR_KWARGS)
    want_grad = reference.reference_dino_loss_grad(student, teacher, center, **ANCHOR_KWARGS)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(s.grad.float(), want_grad, rtol=1.6e-2, atol=1.6e-2 * scale)
    torch.testing.assert_close(colsum, teacher.float().sum(0), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(
        student_stats.sum(-1), torch.logsumexp(student.float() / 0.1, -1), rtol=2e-6, atol=1e-4
    )
    torch.testing.assert_close(
        teacher_stats.sum(-1), torch.logsumexp((teacher.float() - center) / 0.04, -1), rtol=2e-6, atol=1e-4
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_gpu_awkward_shapes(dtype):
    """Odd B, prime K, one and three global views on the GPU's real launch configuration."""
    for batch, ncrops, dim, n_global in [(3, 4, 4099, 2), (1, 12, 1000, 1), (5, 6, 70001, 3)]:
        student, teacher, center = make_inputs(batch, ncrops, dim, n_global)
        student, teacher = student.to(dtype), teacher.to(dtype)
        kwargs = dict(ncrops=ncrops, n_global=n_global, teacher_temp=0.04, student_temp=0.1)
        actual = run_backend(
            "triton", student, teacher, center.float() if dtype != torch.float64 else center, **kwargs
        )
        want = expected(student, teacher, center.float() if dtype != torch.float64 else center, **kwargs)
        assert_matches(actual, want, dtype)


@pytest.mark.gpu
def test_gpu_extra_memory_at_b128():
    """Issue target: peak memory beyond the bf16 gradient <= 64 MiB at B=128, K=65536, 12 crops."""
    batch = 128
    student = torch.randn(12 * batch, 65536, device="cuda").bfloat16().requires_grad_(True)
    teacher = torch.randn(2 * batch, 65536, device="cuda").bfloat16()
    center = torch.zeros(1, 65536, device="cuda")
    dino_loss(student, teacher, center, backend="triton", **ANCHOR_KWARGS).backward()  # compile first
    student.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dino_loss(student, teacher, center, backend="triton", **ANCHOR_KWARGS).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - student.numel() * student.element_size()
    assert extra <= 64 * 2**20, f"{extra / 2**20:.1f} MiB beyond the gradient"
