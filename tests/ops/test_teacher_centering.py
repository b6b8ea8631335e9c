"""DINOLoss's teacher centering: ``center`` (DINO v1, tests/ops/test_dino_loss.py) and
``sinkhorn_knopp`` (DINOv2's teacher targets with DINO v1's student side), against float64
references built from the transcribed formulas: dinov2's ``sinkhorn_knopp_teacher``
(dino_fast/official/dinov2.py) over both global views' rows, as dinov2's train loop calls it, and
the official DINO v1 cross-entropy loop over (teacher view, student view) pairs
(dino_fast/official/loss.py).

Temperatures are powers of two (exact in fp32, as the Triton kernels take them), so fp64 inputs
compare at 1e-10; a teacher-temperature warmup makes every epoch's temperature matter.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_fast.official.dinov2 import dinov2_sinkhorn_knopp
from dino_fast.official.loss import dino_loss as official_dino_loss
from dino_fast.ops.loss import DINOLoss, dino_loss
from dino_fast.ops.reference import teacher_probabilities
from dino_fast.ops.target_loss import dino_loss_from_targets

BACKENDS = ["torch", "native", "triton"]
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}  # relative; gradients relative to max |grad|
# teacher_temp_schedule(0.0625, 0.125, 2 warmup epochs, 3 epochs) = [0.0625, 0.125, 0.125]
TEMPS = dict(warmup_teacher_temp=0.0625, teacher_temp=0.125, warmup_teacher_temp_epochs=2, nepochs=3)
STUDENT_TEMP = 0.25  # not the default 0.1: a loss that ignores the configured value fails
# (B, ncrops, K): B = 1; no local view; K odd and not a multiple of any block; the paper's 12 crops.
SHAPES = [(1, 2, 7), (1, 4, 33), (3, 5, 300), (2, 12, 129)]


def device_for(backend: str) -> torch.device:
    return torch.device(
        "cuda" if backend == "triton" and torch.cuda.is_available() and not INTERPRETING else "cpu"
    )


def head_outputs(batch: int, ncrops: int, K: int, *, seed: int = 0):
    """fp64 student (ncrops * B, K) and teacher (2 * B, K); the teacher's prototypes have unequal
    means, which Sinkhorn-Knopp evens out and a softmax does not."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(ncrops * batch, K, generator=gen, dtype=torch.float64) * 2
    offsets = torch.randn(1, K, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2 * batch, K, generator=gen, dtype=torch.float64) * 0.5 + offsets
    return student, teacher


def sinkhorn_reference(student: torch.Tensor, teacher: torch.Tensor, *, ncrops: int, teacher_temp: float):
    """float64 loss: dinov2's 3 Sinkhorn-Knopp iterations over every teacher row, then the official
    DINO v1 pair loop. Fed log q as logits at temperature 1 with a zero center, the loop's softmax
    returns q itself (each row of q sums to 1)."""
    q = dinov2_sinkhorn_knopp(teacher.double(), teacher_temp, 3)
    zero_center = torch.zeros(1, teacher.shape[1], dtype=torch.float64)
    return official_dino_loss(
        student, q.log(), zero_center, ncrops=ncrops, teacher_temp=1.0, student_temp=STUDENT_TEMP
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,ncrops,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_knopp_loss_and_gradient_equal_dinov2_targets_with_dino_v1_pairs(
    backend, batch, ncrops, K, dtype
):
    device = device_for(backend)
    module = DINOLoss(
        K, ncrops, **TEMPS, student_temp=STUDENT_TEMP, teacher_centering="sinkhorn_knopp", backend=backend
    ).to(device)
    # A center left by a DINO v1 run (resumed with sinkhorn_knopp): the centered softmax would differ,
    # and the center must not move. (Subtracting it before Sinkhorn-Knopp would change nothing: the
    # first prototype normalization cancels any per-prototype shift.)
    resumed_center = torch.randn(1, K, generator=torch.Generator().manual_seed(1)).to(device)
    module.center = resumed_center.clone()
    rtol = TOLERANCE[dtype]
    for epoch in range(TEMPS["nepochs"]):
        student, teacher = head_outputs(batch, ncrops, K, seed=epoch)
        student, teacher = student.to(dtype), teacher.to(dtype)
        s64 = student.double().requires_grad_()
        want = sinkhorn_reference(
            s64, teacher, ncrops=ncrops, teacher_temp=module.teacher_temp_schedule[epoch]
        )
        want.backward()
        s = student.to(device).requires_grad_()
        loss = module(s, teacher.to(device), epoch)
        loss.backward()
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(
            loss.cpu().double(), want.detach(), rtol=rtol, atol=0, msg=f"epoch {epoch}"
        )
        torch.testing.assert_close(
            s.grad.cpu().double(), s64.grad, rtol=0, atol=rtol * s64.grad.abs().max(), msg=f"epoch {epoch}"
        )
    assert torch.equal(module.center, resumed_center)
    assert torch.equal(module.state_dict()["center"], resumed_center)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_global", [1, 2, 3])
def test_loss_from_softmax_targets_equals_the_fused_dino_loss(backend, n_global):
    # The student side given teacher probabilities is DINO v1's: fed the centered softmax, it is the
    # fused dino_loss, for every number of teacher views (view t never meets student view t).
    batch, ncrops, K = 3, 5, 77
    gen = torch.Generator().manual_seed(n_global)
    student = torch.randn(ncrops * batch, K, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(n_global * batch, K, generator=gen, dtype=torch.float64)
    center = torch.randn(1, K, generator=gen, dtype=torch.float64)
    device = device_for(backend)
    kwargs = dict(ncrops=ncrops, n_global=n_global, student_temp=0.125, backend=backend)
    fused_student = student.clone().to(device).requires_grad_()
    fused = dino_loss(fused_student, teacher.to(device), center.to(device), teacher_temp=0.0625, **kwargs)
    fused.backward()
    targets = teacher_probabilities(teacher, center, 0.0625).to(device)
    given_student = student.clone().to(device).requires_grad_()
    given = dino_loss_from_targets(given_student, targets, **kwargs)
    given.backward()
    torch.testing.assert_close(given, fused, rtol=1e-10, atol=0)
    torch.testing.assert_close(given_student.grad, fused_student.grad, rtol=0, atol=1e-10)


def test_loss_from_targets_names_a_batch_that_is_not_crop_major():
    with pytest.raises(ValueError, match="teacher_targets has 4 rows; with B=3"):
        dino_loss_from_targets(torch.randn(9, 5), torch.rand(4, 5), ncrops=3)


def test_an_unknown_teacher_centering_is_refused_naming_both_choices():
    with pytest.raises(ValueError, match="teacher_centering='sinkhorn'") as exc:
        DINOLoss(16, 4, 0.04, 0.04, 0, 1, teacher_centering="sinkhorn")
    assert "'center'" in str(exc.value) and "'sinkhorn_knopp'" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_both_centerings_share_one_state_dict_format():
    # Checkpoints of either centering load into the other: the center buffer is always there.
    K, ncrops = 33, 4
    student, teacher = (x.float() for x in head_outputs(2, ncrops, K))
    v1 = DINOLoss(K, ncrops, 0.04, 0.04, 0, 1)
    v1(student, teacher, 0)
    sinkhorn = DINOLoss(K, ncrops, 0.04, 0.04, 0, 1, teacher_centering="sinkhorn_knopp")
    sinkhorn.load_state_dict(v1.state_dict())
    assert list(sinkhorn.state_dict()) == ["center"]
    sinkhorn(student, teacher, 0)
    back = DINOLoss(K, ncrops, 0.04, 0.04, 0, 1)
    back.load_state_dict(sinkhorn.state_dict())
    assert torch.equal(back.center, v1.center) and v1.center.abs().sum() > 0


# --- two processes: the Sinkhorn-Knopp sums cover every rank's rows -------------------------------

DIST = dict(batch=2, ncrops=4, K=37)


def _rank_outputs(rank: int):
    student, teacher = head_outputs(**DIST, seed=10 + rank)
    return student.float(), teacher.float() + rank  # ranks differ, so the all-reduce matters


def _sinkhorn_rank(rank: int, world: int, init_file: str, result: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher = _rank_outputs(rank)
        for backend in ("torch", "native"):
            module = DINOLoss(
                DIST["K"], DIST["ncrops"], **TEMPS, student_temp=STUDENT_TEMP,
                teacher_centering="sinkhorn_knopp", backend=backend,
            )  # fmt: skip
            result[(backend, rank)] = module(student, teacher, 0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_take_sinkhorn_knopp_over_the_global_batch(tmp_path):
    result = mp.Manager().dict()
    mp.spawn(_sinkhorn_rank, args=(2, str(tmp_path / "init"), result), nprocs=2, join=True)
    outputs = [_rank_outputs(rank) for rank in range(2)]
    q = dinov2_sinkhorn_knopp(torch.cat([t for _, t in outputs]).double(), TEMPS["warmup_teacher_temp"], 3)
    rows = 2 * DIST["batch"]
    zero_center = torch.zeros(1, DIST["K"], dtype=torch.float64)
    for rank, (student, _) in enumerate(outputs):
        want = official_dino_loss(
            student.double(), q[rank * rows : (rank + 1) * rows].log(), zero_center,
            ncrops=DIST["ncrops"], teacher_temp=1.0, student_temp=STUDENT_TEMP,
        )  # fmt: skip
        for backend in ("torch", "native"):
            torch.testing.assert_close(result[(backend, rank)].double(), want, rtol=1e-5, atol=0)
