"""dino_fast.ops.reference (the spec every backend is tested against) vs the official formulas."""

from __future__ import annotations

import pytest
import torch

from dino_fast.official.loss import dino_loss as official_dino_loss
from dino_fast.official.loss import update_center as official_center_update
from dino_fast.official.training import update_teacher as official_ema
from dino_fast.ops import reference


def random_outputs(batch: int, ncrops: int, dim: int, n_global: int = 2, scale: float = 3.0):
    student = torch.randn(ncrops * batch, dim, dtype=torch.float64) * scale
    teacher = torch.randn(n_global * batch, dim, dtype=torch.float64) * scale
    center = torch.randn(1, dim, dtype=torch.float64)
    return student, teacher, center


@pytest.mark.parametrize(
    ("batch", "ncrops", "dim"),
    [
        (1, 2, 1000),  # smallest legal batch and crop count
        (3, 12, 1000),  # paper's best crop count, odd batch
        (2, 12, 65536),  # the default head width
        (4, 5, 4099),  # K prime-ish, odd number of local crops
    ],
)
def test_loss_matches_official_double_loop(batch: int, ncrops: int, dim: int) -> None:
    student, teacher, center = random_outputs(batch, ncrops, dim)
    kwargs = dict(ncrops=ncrops, teacher_temp=0.04, student_temp=0.1)
    expected = official_dino_loss(student, teacher, center, **kwargs)
    actual = reference.reference_dino_loss(student, teacher, center, **kwargs)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_global", [1, 3])
def test_loss_other_global_view_counts(n_global: int) -> None:
    student, teacher, center = random_outputs(3, 6, 257, n_global=n_global)
    kwargs = dict(ncrops=6, teacher_temp=0.07, student_temp=0.1, n_global=n_global)
    expected = official_dino_loss(student, teacher, center, **kwargs)
    torch.testing.assert_close(reference.reference_dino_loss(student, teacher, center, **kwargs), expected)


def test_closed_form_gradient_matches_autograd() -> None:
    student, teacher, center = random_outputs(3, 5, 300)
    student.requires_grad_(True)
    kwargs = dict(ncrops=5, teacher_temp=0.05, student_temp=0.1)
    official_dino_loss(student, teacher, center, **kwargs).backward()
    closed_form = reference.reference_dino_loss_grad(student.detach(), teacher, center, **kwargs)
    torch.testing.assert_close(closed_form, student.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_on_small_shape() -> None:
    student, teacher, center = random_outputs(2, 4, 7)
    student.requires_grad_(True)

    def loss_of(s: torch.Tensor) -> torch.Tensor:
        return reference.reference_dino_loss(
            s, teacher, center, ncrops=4, teacher_temp=0.04, student_temp=0.1
        )

    assert torch.autograd.gradcheck(loss_of, (student,))


def test_loss_has_no_teacher_or_center_gradient() -> None:
    student, teacher, center = random_outputs(2, 3, 11)
    for tensor in (student, teacher, center):
        tensor.requires_grad_(True)
    reference.reference_dino_loss(student, teacher, center, ncrops=3, teacher_temp=0.04).backward()
    assert student.grad is not None
    assert teacher.grad is None and center.grad is None


def test_center_update_matches_official() -> None:
    _, teacher, center = random_outputs(4, 2, 33)
    expected = official_center_update(center, teacher, momentum=0.9)
    actual = reference.center_update(center, reference.teacher_column_mean(teacher), momentum=0.9)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.996, 1.0])
def test_ema_matches_official(momentum: float) -> None:
    sizes = [1, 7, 1023]
    teacher = [torch.randn(n, dtype=torch.float64) for n in sizes]
    student = [torch.randn(n, dtype=torch.float64) for n in sizes]
    expected = [t.clone() for t in teacher]
    official_ema(student, expected, momentum)
    reference.reference_ema_update_(teacher, student, momentum)
    for actual, want in zip(teacher, expected, strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-14, atol=1e-14)


def test_ema_with_tensor_momentum_and_bf16_teacher() -> None:
    teacher = [torch.randn(64).bfloat16()]
    student = [torch.randn(64)]
    expected = (teacher[0].float() * 0.9 + student[0] * 0.1).bfloat16()
    reference.reference_ema_update_(teacher, student, torch.tensor(0.9))
    torch.testing.assert_close(teacher[0], expected)
