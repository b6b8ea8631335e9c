"""Schedules against the official DINO utils.cosine_scheduler and DINOLoss teacher-temperature
schedule (dino_fast.official, written independently of dino_fast.train.schedules)."""

from __future__ import annotations

import numpy as np
import pytest

from dino_fast.official.loss import DINOLoss as OfficialDINOLoss
from dino_fast.official.training import cosine_scheduler as official_cosine_scheduler
from dino_fast.ops.loss import teacher_temp_schedule
from dino_fast.train import TrainConfig
from dino_fast.train.schedules import build_schedules, cosine_scheduler


def official_teacher_temp(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """The official DINOLoss's teacher-temperature schedule (one entry per epoch)."""
    loss = OfficialDINOLoss(1, 2, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
    return loss.teacher_temp_schedule


@pytest.mark.parametrize(
    ("epochs", "niter", "warmup"),
    [
        (100, 2502, 10),  # the ImageNet recipe: 1,281,167 images / 512 per step
        (3, 1, 0),  # one step per epoch, no warmup
        (5, 7, 5),  # warmup spans the whole run (no cosine part)
        (7, 13, 1),  # awkward primes
        (1, 1, 1),  # the degenerate single-iteration warmup (linspace of one point = base)
    ],
)
@pytest.mark.parametrize(
    ("base", "final", "start"), [(5e-4, 1e-6, 0.0), (0.996, 1.0, 0.0), (0.04, 0.4, 0.01)]
)
def test_cosine_scheduler_matches_official(epochs, niter, warmup, base, final, start):
    ours = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warmup, start_warmup_value=start)
    ref = official_cosine_scheduler(
        base, final, epochs, niter, warmup_epochs=warmup, start_warmup_value=start
    )
    assert ours.shape == ref.shape == (epochs * niter,)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)


def test_cosine_scheduler_rejects_impossible_lengths():
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1.0, 0.0, epochs=2, steps_per_epoch=3, warmup_epochs=3)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        cosine_scheduler(1.0, 0.0, epochs=2, steps_per_epoch=0)


@pytest.mark.parametrize(("warm_epochs", "nepochs"), [(0, 100), (30, 300), (4, 4), (1, 3)])
def test_teacher_temp_matches_official(warm_epochs, nepochs):
    ours = teacher_temp_schedule(0.04, 0.07, warm_epochs, nepochs)
    np.testing.assert_array_equal(ours, official_teacher_temp(0.04, 0.07, warm_epochs, nepochs))


@pytest.mark.parametrize("world_size", [1, 3, 8])  # 3: a total batch that is not a power of two
def test_build_schedules_is_main_dino(world_size):
    cfg = TrainConfig(
        epochs=4, warmup_epochs=1, batch_size_per_gpu=48, warmup_teacher_temp_epochs=2, teacher_temp=0.06
    )
    niter = 5
    s = build_schedules(cfg, niter, world_size)
    peak = cfg.lr * 48 * world_size / 256.0
    np.testing.assert_array_equal(
        s.lr, official_cosine_scheduler(peak, cfg.min_lr, 4, niter, warmup_epochs=1)
    )
    np.testing.assert_array_equal(s.weight_decay, official_cosine_scheduler(0.04, 0.4, 4, niter))
    np.testing.assert_array_equal(s.momentum, official_cosine_scheduler(0.996, 1, 4, niter))
    np.testing.assert_array_equal(s.teacher_temp, official_teacher_temp(0.04, 0.06, 2, 4))
    # Warmup starts at 0 and reaches the scaled peak on its last iteration.
    assert s.lr[0] == 0.0 and s.lr[niter - 1] == pytest.approx(peak)
    v = s.at(niter * 2 + 3)
    assert v.epoch == 2
    assert (v.lr, v.weight_decay, v.momentum) == (s.lr[13], s.weight_decay[13], s.momentum[13])
    assert v.teacher_temp == pytest.approx(0.06)
    with pytest.raises(IndexError):
        s.at(4 * niter)
