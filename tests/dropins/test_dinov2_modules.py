"""dino_fast.dinov2's DINOLoss, iBOTPatchLoss and KoLeoLoss against dinov2's formulas
(dino_fast/official/dinov2.py): losses, gradients, teacher targets and the center update, with a
sample of B = 1, an image with no masked patch and truncated masked rows.

fp32 modules against fp64 formulas on the same fp32-rounded inputs: 1e-5 relative (the issue's
bar; sums of non-negative fp32 terms, observed ~1e-7). Backends are covered op by op in
tests/test_dinov2_ops.py; the modules run on the default backend.
"""

from __future__ import annotations

import pytest
import torch

from dino_fast.dinov2 import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dino_fast.official.dinov2 import (
    dinov2_center_step,
    dinov2_dino_loss,
    dinov2_ibot_forward,
    dinov2_ibot_forward_masked,
    dinov2_koleo,
    dinov2_sinkhorn_knopp,
)

RTOL = 1e-5
# Triton runs on the CPU under the interpreter here (tests/conftest.py).
BACKENDS = ["torch", "native"] + (["triton"] if not torch.cuda.is_available() else [])


def randn(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).float()


def assert_grad_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=RTOL * expected.abs().max())


def test_dino_loss_forward_and_gradient_with_softmax_and_sinkhorn_targets():
    K, B = 37, 3
    loss_fn = DINOLoss(K, student_temp=0.1)
    teacher = randn(2 * B, K, seed=0)
    students = [randn(B, K, seed=1 + i) for i in range(3)]
    for targets in (
        loss_fn.softmax_center_teacher(teacher, 0.04).chunk(2),
        loss_fn.sinkhorn_knopp_teacher(teacher, 0.04).chunk(2),
    ):
        leaves = [s.clone().requires_grad_() for s in students]
        loss = loss_fn(leaves, list(targets))
        loss.backward()
        leaves64 = [s.double().requires_grad_() for s in students]
        expected = dinov2_dino_loss(leaves64, [t.double() for t in targets], 0.1)
        expected.backward()
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=RTOL, atol=0)
        for got, want in zip(leaves, leaves64, strict=True):
            assert_grad_close(got.grad, want.grad)
    sinkhorn = loss_fn.sinkhorn_knopp_teacher(teacher, 0.04)
    expected_sk = dinov2_sinkhorn_knopp(teacher.double(), 0.04)
    torch.testing.assert_close(sinkhorn.double(), expected_sk, rtol=RTOL, atol=1e-30)


def test_dino_loss_single_sample():
    loss_fn = DINOLoss(9)
    s = randn(1, 9, seed=3).requires_grad_()
    t = loss_fn.softmax_center_teacher(randn(1, 9, seed=4), 0.07)
    loss_fn([s], [t]).backward()
    s64 = s.detach().double().requires_grad_()
    dinov2_dino_loss([s64], [t.double()], 0.1).backward()
    assert_grad_close(s.grad, s64.grad)


def test_center_update_is_deferred_until_the_next_softmax():
    K = 11
    loss_fn = DINOLoss(K, center_momentum=0.8)
    teacher_1, teacher_2 = randn(6, K, seed=5), randn(4, K, seed=6)
    loss_fn.update_center(teacher_1)
    assert torch.all(loss_fn.center == 0) and not loss_fn.updated  # not applied yet
    loss_fn.softmax_center_teacher(teacher_2, 0.04)  # applies it first
    center = dinov2_center_step(
        torch.zeros(1, K, dtype=torch.float64), teacher_1.double().sum(0, keepdim=True), 6, 0.8
    )
    torch.testing.assert_close(loss_fn.center.double(), center, rtol=1e-6, atol=1e-7)
    expected = torch.softmax((teacher_2.double() - center) / 0.04, dim=-1)
    torch.testing.assert_close(
        loss_fn.softmax_center_teacher(teacher_2, 0.04).double(), expected, rtol=RTOL, atol=1e-9
    )
    assert loss_fn.len_teacher_output == 6 and "center" in loss_fn.state_dict()


def test_ibot_forward_with_an_image_without_masked_patches():
    images, patches, K = 3, 5, 23
    loss_fn = iBOTPatchLoss(K, student_temp=0.1)
    masks = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    student = randn(images, patches, K, seed=7)
    teacher = loss_fn.softmax_center_teacher(randn(images, patches, K, seed=8), 0.05)
    s = student.clone().requires_grad_()
    loss = loss_fn(s, teacher, masks)
    loss.backward()
    s64 = student.double().requires_grad_()
    expected = dinov2_ibot_forward(s64, teacher.double(), masks, 0.1)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=RTOL, atol=0)
    assert_grad_close(s.grad, s64.grad)
    assert torch.all(s.grad[1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_forward_masked_with_sinkhorn_targets_and_truncation(backend):
    images, patches, K = 4, 6, 29
    loss_fn = iBOTPatchLoss(K, backend=backend)
    masks = torch.zeros(images, patches, dtype=torch.bool)
    masks[0, :3] = True
    masks[2, 1] = True
    masks[3, 2:] = True  # image 1 has no masked patch
    n_masked = int(masks.sum())
    student = randn(n_masked + 2, K, seed=9)  # two padding rows past the masked ones, cut by n_masked_patches
    teacher_rows = randn(n_masked, K, seed=10)
    n_tensor = torch.tensor(n_masked)
    targets = loss_fn.sinkhorn_knopp_teacher(teacher_rows, 0.05, n_tensor)
    torch.testing.assert_close(
        targets.double(), dinov2_sinkhorn_knopp(teacher_rows.double(), 0.05), rtol=RTOL, atol=1e-30
    )
    targets = torch.cat([targets, targets[:2]])
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    for kwargs in ({}, {"masks_weight": weights}):
        s = student.clone().requires_grad_()
        loss = loss_fn.forward_masked(s, targets, masks, n_masked_patches=n_masked, **kwargs)
        loss.backward()
        s64 = student.double().requires_grad_()
        expected = dinov2_ibot_forward_masked(
            s64,
            targets.double(),
            masks,
            0.1,
            n_masked_patches=n_masked,
            **{k: v.double() for k, v in kwargs.items()},
        )
        expected.backward()
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=RTOL, atol=0)
        assert_grad_close(s.grad, s64.grad)
        assert torch.all(s.grad[n_masked:] == 0)


def test_ibot_center_update_uses_the_patch_mean():
    images, patches, K = 2, 4, 7
    loss_fn = iBOTPatchLoss(K, center_momentum=0.9)
    tokens = randn(images, patches, K, seed=11)
    loss_fn.update_center(tokens)
    loss_fn.apply_center_update()
    batch_sum = tokens.double().mean(1).sum(0, keepdim=True)
    expected = dinov2_center_step(torch.zeros(1, 1, K, dtype=torch.float64), batch_sum, images, 0.9)
    assert loss_fn.center.shape == (1, 1, K)
    torch.testing.assert_close(loss_fn.center.double(), expected, rtol=1e-6, atol=1e-7)


def test_koleo_module():
    x = randn(12, 20, seed=12)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    loss = KoLeoLoss()(x32)
    loss.backward()
    expected = dinov2_koleo(x64)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=RTOL, atol=0)
    assert_grad_close(x32.grad, x64.grad)
    normalized = torch.nn.functional.normalize(x, dim=-1)
    nearest = KoLeoLoss().pairwise_NNs_inner(normalized)
    dots = normalized @ normalized.t() - 3 * torch.eye(12)
    assert torch.equal(nearest, dots.argmax(dim=1))
