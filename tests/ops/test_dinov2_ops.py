"""The DINOv2-family ops (dino_fast.ops.sinkhorn, .cross_entropy, .koleo) against float64
transcriptions of dinov2's formulas (dino_fast/official/dinov2.py), on every backend that has them.

Triton runs under the interpreter on CPU (tests/conftest.py), so its shapes stay small; the block
sizes are forced small so that K = 300 spans several column chunks and several row blocks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_fast.dinov2 import DINOLoss, iBOTPatchLoss
from dino_fast.official.dinov2 import dinov2_koleo, dinov2_sinkhorn_knopp
from dino_fast.ops import backends, reference
from dino_fast.ops.backends import BackendUnavailableError
from dino_fast.ops.cross_entropy import weighted_cross_entropy, weighted_cross_entropy_with_stats
from dino_fast.ops.koleo import koleo_loss
from dino_fast.ops.sinkhorn import sinkhorn_knopp

BACKENDS = ["torch", "native", "triton"]
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# fp32 results against fp64: a few fp32 roundings per entry (exp, ~3 normalizations, sums of <= 300
# terms in fp32), so 1e-5 relative is the bar with a margin of ~10x over what we observe.
RTOL_FP32 = 1e-5
# Assignments under 1e-30 (of a row mass of 1) come from subnormal fp32 exponentials, which hold
# fewer than 24 significant bits: compared absolutely.
ATOL_TINY = 1e-30
SHAPES = [(1, 7), (5, 33), (13, 300)]  # B = 1; K odd, K not a multiple of any block


def device_for(backend: str) -> torch.device:
    return torch.device(
        "cuda" if backend == "triton" and torch.cuda.is_available() and not INTERPRETING else "cpu"
    )


def teacher_logits(rows: int, K: int, *, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, K, generator=gen, dtype=torch.float64) * scale


# --- Sinkhorn-Knopp ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,K", SHAPES)
@pytest.mark.parametrize("n_iterations", [1, 3])
def test_sinkhorn_matches_dinov2_fp32(backend, rows, K, n_iterations):
    t = teacher_logits(rows, K).float()
    expected = dinov2_sinkhorn_knopp(t.double(), 0.07, n_iterations)
    got = sinkhorn_knopp(t.to(device_for(backend)), 0.07, n_iterations=n_iterations, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (rows, K)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=RTOL_FP32, atol=ATOL_TINY)


def test_sinkhorn_spec_is_dinov2():
    # dino_fast.ops.reference's closed form (scalings r, c on column-shifted exponentials) is the
    # spec the passes implement: in fp64 it equals dinov2's normalizations up to summation order.
    t = teacher_logits(11, 50, scale=3.0, seed=11)
    for n_iterations in (1, 3, 5):
        expected = dinov2_sinkhorn_knopp(t, 0.05, n_iterations)
        got = reference.reference_sinkhorn_knopp(t, 0.05, n_iterations)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_fp64_is_exact(backend):
    t = teacher_logits(6, 45, seed=1)
    got = sinkhorn_knopp(t.to(device_for(backend)), 0.0625, backend=backend)
    assert got.dtype == torch.float64
    # fp64 throughout; only summation order differs from dinov2's normalizations.
    torch.testing.assert_close(got.cpu(), dinov2_sinkhorn_knopp(t, 0.0625), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_bf16_input_reads_stored_values(backend):
    t = teacher_logits(5, 33, seed=2).bfloat16()
    got = sinkhorn_knopp(t.to(device_for(backend)), 0.07, backend=backend)
    torch.testing.assert_close(
        got.cpu().double(), dinov2_sinkhorn_knopp(t.double(), 0.07), rtol=RTOL_FP32, atol=ATOL_TINY
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_finite_where_dinov2_overflows_fp32(backend):
    # t / tau reaches ~ 4 / 0.02 = 200 > 88.7: dinov2's fp32 exp overflows to inf (NaN result).
    t = teacher_logits(7, 40, seed=3).float()
    assert not torch.isfinite(dinov2_sinkhorn_knopp(t.clone(), 0.02)).all()
    got = sinkhorn_knopp(t.to(device_for(backend)), 0.02, backend=backend).cpu().double()
    expected = dinov2_sinkhorn_knopp(t.double(), 0.02)  # fp64 exp stays finite up to 709
    torch.testing.assert_close(got, expected, rtol=RTOL_FP32, atol=ATOL_TINY)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(7, dtype=torch.float64), rtol=1e-5, atol=0)


def test_sinkhorn_rejects_no_iterations():
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.randn(3, 4), 0.1, n_iterations=0)


def test_native_backend_unavailable_for_cuda_tensors_is_explained():
    # The native kernels are CPU-only; selecting them for another device names the missing kernel.
    for native_op in ("sinkhorn_exp", "weighted_cross_entropy_fwd"):
        with pytest.raises(BackendUnavailableError, match=native_op):
            backends.select_backend("native", torch.device("meta"), op="test", native_op=native_op)


def _sinkhorn_rank(rank: int, world: int, init_file: str, result: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        full = teacher_logits(9, 37, seed=4).float()
        mine = full[[0, 1, 2, 3] if rank == 0 else [4, 5, 6, 7, 8]]  # unequal shares
        for backend in BACKENDS:
            result[(backend, rank)] = sinkhorn_knopp(mine, 0.05, backend=backend)
            # A rank without rows (no masked patch on any of its images) still joins every all-reduce.
            result[(backend, "empty", rank)] = sinkhorn_knopp(
                full if rank else full[:0], 0.05, backend=backend
            )
        # The modules' distributed parts: the asynchronous center all-reduce, and iBOT's in-place
        # all-reduce of the masked-patch count (dinov2's side effect, kept).
        dino = DINOLoss(37)
        dino.update_center(mine)
        dino.apply_center_update()
        result[("center", rank)] = dino.center
        count = torch.tensor(len(mine))
        result[("ibot", rank)] = iBOTPatchLoss(37).sinkhorn_knopp_teacher(mine, 0.05, count)
        result[("count", rank)] = count
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_sinkhorn_equals_the_concatenated_batch_and_centers_all_reduce(tmp_path):
    # One pair of processes runs every backend (starting processes dominates the test's time).
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_sinkhorn_rank, args=(2, str(tmp_path / "init"), result), nprocs=2, join=True)
    expected = dinov2_sinkhorn_knopp(teacher_logits(9, 37, seed=4).float().double(), 0.05)
    for backend in BACKENDS:
        got = torch.cat([result[(backend, 0)], result[(backend, 1)]]).double()
        torch.testing.assert_close(
            got, expected, rtol=RTOL_FP32, atol=ATOL_TINY, msg=lambda m, b=backend: f"{b}: {m}"
        )
        assert result[(backend, "empty", 0)].shape == (0, 37)
        torch.testing.assert_close(
            result[(backend, "empty", 1)].double(), expected, rtol=RTOL_FP32, atol=ATOL_TINY
        )
        # Without the all-reduce a rank's share is normalized on its own: visibly different.
        alone = sinkhorn_knopp(
            teacher_logits(9, 37, seed=4).float()[:4], 0.05, distributed=False, backend=backend
        )
        assert not torch.allclose(alone.double(), expected[:4], rtol=1e-3)
    ibot = torch.cat([result[("ibot", 0)], result[("ibot", 1)]]).double()
    torch.testing.assert_close(ibot, expected, rtol=RTOL_FP32, atol=ATOL_TINY)
    assert result[("count", 0)].item() == result[("count", 1)].item() == 9
    # dinov2 divides the all-reduced sum by (local rows * world size): the mean when shares are equal.
    full_sum = teacher_logits(9, 37, seed=4).float().double().sum(dim=0, keepdim=True)
    for rank, local_rows in ((0, 4), (1, 5)):
        center = 0.1 * full_sum / (local_rows * 2)
        torch.testing.assert_close(result[("center", rank)].double(), center, rtol=1e-6, atol=1e-8)


# --- weighted cross-entropy ----------------------------------------------------------------------


def ce_inputs(rows: int, T: int, K: int, *, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, K, generator=gen, dtype=torch.float64) * 3
    target = torch.softmax(torch.randn(T, K, generator=gen, dtype=torch.float64) * 2, dim=-1)
    target[:, 0] *= 1.01  # a target whose rows do not sum exactly to 1 (as Sinkhorn's, to rounding)
    weights = torch.rand(rows, generator=gen, dtype=torch.float64)
    if rows > 2:
        weights[1] = 0.0  # a masked-out row
    return student, target, weights


def dinov2_weighted_ce(student, target, weights, student_temp):
    repeats = student.shape[0] // target.shape[0]
    q = target.repeat(repeats, 1)
    return -(weights * torch.sum(q * torch.log_softmax(student / student_temp, dim=-1), dim=-1)).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,T,K", [(1, 1, 7), (6, 3, 33), (13, 13, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighted_cross_entropy_and_gradient(backend, rows, T, K, dtype):
    student, target, weights = ce_inputs(rows, T, K)
    student, target, weights = student.to(dtype), target.to(dtype), weights.to(dtype)
    s64 = student.double().requires_grad_()
    # 0.125: an exact fp32 inverse (the Triton kernels get temperatures as fp32), so fp64 is exact.
    expected = dinov2_weighted_ce(s64, target.double(), weights.double(), 0.125)
    expected.backward(torch.tensor(0.7, dtype=torch.float64))
    device = device_for(backend)
    s = student.to(device).requires_grad_()
    loss = weighted_cross_entropy(
        s, target.to(device), weights.to(device), student_temp=0.125, backend=backend
    )
    (loss * 0.7).backward()
    # fp64: exact up to summation order; fp32: per-row loss is a sum of non-negative terms of
    # relative error ~1e-7, the gradient q * (p / sum - 1) loses no digits to cancellation.
    rtol = 1e-10 if dtype == torch.float64 else RTOL_FP32
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert s.grad.dtype == dtype
    torch.testing.assert_close(loss.cpu().double(), expected.detach(), rtol=rtol, atol=0)
    grad_scale = s64.grad.abs().max()
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, rtol=0, atol=rtol * grad_scale)
    if rows > 2:
        assert torch.all(s.grad[1] == 0)  # a zero weight gives an exactly zero gradient row


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_cross_entropy_statistics(backend):
    student, target, weights = ce_inputs(6, 3, 33, seed=5)
    device = device_for(backend)
    _, stats = weighted_cross_entropy_with_stats(
        student.float().to(device), target.float().to(device), weights.float().to(device), backend=backend
    )
    weighted = weights != 0  # the statistics of rows of weight 0 are left unspecified (skipped rows)
    logits = student.float().double()[weighted] / 0.1
    stats = stats.cpu().double()[weighted]
    # fp32 max is exact; log-sum-exp and the target mass are fp32 sums of <= 33 terms.
    torch.testing.assert_close(stats[:, 0], logits.amax(dim=-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats[:, 0] + stats[:, 1], torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=0)
    mass = target.float().double().sum(-1).repeat(2)[weighted]
    torch.testing.assert_close(stats[:, 2], mass, rtol=1e-6, atol=0)


def test_weighted_cross_entropy_backward_runs_on_another_backend():
    # The statistics contract is shared: a torch forward's statistics serve any backward.
    student, target, weights = ce_inputs(6, 3, 33, seed=6)
    s = student.float().requires_grad_()
    _, stats = weighted_cross_entropy_with_stats(s, target.float(), weights.float(), backend="torch")
    for backend in BACKENDS:
        grad = torch.ops.dino_fast.weighted_cross_entropy_backward(
            torch.tensor(1.0), s.detach(), target.float(), weights.float(), stats, 0.1, backend
        )
        expected = reference.reference_weighted_cross_entropy_grad(
            student, target, weights.double(), student_temp=0.1
        )
        torch.testing.assert_close(grad.double(), expected, rtol=0, atol=RTOL_FP32 * expected.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_cross_entropy_bf16_student_fp32_target(backend):
    student, target, weights = ce_inputs(10, 5, 45, seed=9)
    student = student.bfloat16()
    s64 = student.double().requires_grad_()
    expected = dinov2_weighted_ce(s64, target, weights, 0.125)
    expected.backward()
    device = device_for(backend)
    s = student.to(device).requires_grad_()
    loss = weighted_cross_entropy(
        s, target.float().to(device), weights.float().to(device), student_temp=0.125, backend=backend
    )
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    # bf16 values are exact in fp32: the loss keeps fp32 accuracy; the gradient is rounded to bf16
    # (8 significant bits: 2^-8 of the largest entry).
    torch.testing.assert_close(loss.cpu().double(), expected.detach(), rtol=RTOL_FP32, atol=0)
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, rtol=0, atol=2**-8 * s64.grad.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_cross_entropy_backward_ignores_statistics_of_weight_zero_rows(backend):
    # Their statistics are unspecified (skipped by the forward): poisoned with NaN, the gradient
    # of those rows must still be exactly 0 and the others unaffected.
    student, target, weights = (x.float() for x in ce_inputs(6, 3, 33, seed=10))
    weights[4] = 0.0
    _, stats = weighted_cross_entropy_with_stats(student, target, weights, backend="torch")
    stats[weights == 0] = float("nan")
    device = device_for(backend)
    grad = torch.ops.dino_fast.weighted_cross_entropy_backward(
        torch.tensor(1.0, device=device), student.to(device), target.to(device), weights.to(device),
        stats.to(device), 0.1, backend,
    ).cpu()  # fmt: skip
    expected = reference.reference_weighted_cross_entropy_grad(
        student.double(), target.double(), weights.double(), student_temp=0.1
    )
    assert torch.all(grad[weights == 0] == 0)
    torch.testing.assert_close(grad.double(), expected, rtol=0, atol=RTOL_FP32 * expected.abs().max())


def test_weighted_cross_entropy_validates_shapes():
    with pytest.raises(ValueError, match="multiple"):
        weighted_cross_entropy(torch.randn(5, 4), torch.rand(2, 4), torch.ones(5))
    with pytest.raises(ValueError, match="weights"):
        weighted_cross_entropy(torch.randn(4, 4), torch.rand(2, 4), torch.ones(3))


def test_weighted_cross_entropy_compiles_fullgraph():
    student, target, weights = (x.float() for x in ce_inputs(6, 3, 33, seed=7))
    fn = torch.compile(
        lambda s: weighted_cross_entropy(s, target, weights, backend="torch"), fullgraph=True, backend="eager"
    )
    s = student.clone().requires_grad_()
    fn(s).backward()
    expected = reference.reference_weighted_cross_entropy_grad(student, target, weights, student_temp=0.1)
    torch.testing.assert_close(s.grad, expected, rtol=0, atol=1e-6 * expected.abs().max())


# --- KoLeo ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,D", [(2, 3), (17, 65)])
def test_koleo_matches_dinov2_with_gradient(n, D):
    x = teacher_logits(n, D, seed=8)
    x64 = x.clone().requires_grad_()
    dinov2_koleo(x64).backward()
    x32 = x.float().requires_grad_()
    loss = koleo_loss(x32)
    loss.backward()
    assert loss.dtype == torch.float32
    # fp32 normalization, one dot product of D terms and a log: ~1e-6 relative.
    torch.testing.assert_close(loss.double(), dinov2_koleo(x.float().double()), rtol=RTOL_FP32, atol=0)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=0, atol=RTOL_FP32 * x64.grad.abs().max())


def test_koleo_bf16_input_computes_in_fp32():
    x = teacher_logits(9, 16, seed=9).bfloat16()
    loss = koleo_loss(x)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), dinov2_koleo(x.double()), rtol=RTOL_FP32, atol=0)
