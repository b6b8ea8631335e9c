"""dino_fast.lightly_adapter.DINOLoss against the real ``lightly.loss.DINOLoss`` (installed from PyPI
by the Makefile's test-deps): losses, gradients, centers over several steps and state dicts agree.

Both run in fp32 on the same inputs; lightly computes the loss with one einsum over softmaxes,
the fused op with log-sum-exps: the two agree to fp32 rounding of sums over K <= 300 terms
(observed ~1e-7), so losses, gradients and centers are compared at 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from lightly.loss import DINOLoss as LightlyDINOLoss

from dino_fast.lightly_adapter import DINOLoss

RTOL = 1e-5
BACKENDS = ["torch", "native"]


def views(n: int, batch: int, dim: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=gen) * 3 for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_teacher,n_student,batch,dim", [(2, 2, 1, 7), (2, 5, 3, 33), (1, 3, 4, 300)])
def test_swap_for_lightly_over_three_steps(backend, n_teacher, n_student, batch, dim):
    kwargs = {
        "output_dim": dim,
        "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.07,
        "warmup_teacher_temp_epochs": 2,
    }
    ours, theirs = (
        DINOLoss(**kwargs, center_momentum=0.8, backend=backend),
        LightlyDINOLoss(**kwargs, center_momentum=0.8),
    )
    for step, call in enumerate([{"epoch": 1}, {"epoch": 5}, {"teacher_temp": 0.05}]):
        teacher = views(n_teacher, batch, dim, seed=10 * step)
        student = views(n_student, batch, dim, seed=10 * step + 1)
        ours_student = [s.clone().requires_grad_() for s in student]
        theirs_student = [s.clone().requires_grad_() for s in student]
        loss = ours(teacher, ours_student, **call)
        expected = theirs(teacher, theirs_student, **call)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=RTOL, atol=0)
        for got, want in zip(ours_student, theirs_student, strict=True):
            torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=RTOL * want.grad.abs().max())
        torch.testing.assert_close(ours.center, theirs.center, rtol=RTOL, atol=1e-7)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())


def test_update_center_matches_lightly():
    ours, theirs = DINOLoss(output_dim=9), LightlyDINOLoss(output_dim=9)
    teacher = torch.stack(views(3, 4, 9, seed=7))
    ours.update_center(teacher)
    theirs.update_center(teacher)
    torch.testing.assert_close(ours.center, theirs.center, rtol=RTOL, atol=1e-7)


def test_too_few_student_views_is_explained():
    with pytest.raises(ValueError, match="student view"):
        DINOLoss(output_dim=5)(views(2, 2, 5, seed=0), views(1, 2, 5, seed=1))


def test_bf16_student_with_fp32_teacher_keeps_the_teacher_precise():
    # lightly computes the teacher softmax in the teacher's fp32; the adapter promotes rather than
    # rounding the teacher to bf16 (which would move the loss by ~1e-3 at tau_t = 0.04).
    teacher = views(2, 3, 33, seed=20)
    student = [s.bfloat16() for s in views(4, 3, 33, seed=21)]
    ours_student = [s.clone().requires_grad_() for s in student]
    theirs_student = [s.float().requires_grad_() for s in student]
    loss = DINOLoss(output_dim=33)(teacher, ours_student)
    expected = LightlyDINOLoss(output_dim=33)(teacher, theirs_student)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=0)
    assert ours_student[0].grad.dtype == torch.bfloat16
    for got, want in zip(ours_student, theirs_student, strict=True):  # the gradient is rounded to bf16
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=0, atol=2**-8 * want.grad.abs().max())
