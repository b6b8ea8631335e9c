"""dino_fast against the official training code (dino_fast.official), from the same seed.

1. The same ``--seed`` gives the official initial weights, bitwise: the official models of
   dino_fast.official built in ``train_dino``'s order after ``fix_random_seeds``; dino_fast's
   truncated normal draws exactly as the official inverse-CDF one.
2. ``Trainer.step`` follows the official step for 10 steps, fp32 on CPU, with the official
   defaults that shape the update: per-parameter clipping at 3.0, drop path 0.1, the last layer
   frozen for the first epoch (4 steps per epoch, so the run crosses two epoch boundaries), the
   learning rate still warming up.
3. The comparison fails for planted bugs: the schedules read one iteration late, weight decay on
   biases and norms, the last layer left unfrozen, the global-norm clip, unsynchronized drop path.

The comparison itself, and why it is made on whole vectors, is tests/helpers/official_step.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest
import torch

from dino_fast.models import CpuSyncBatchNorm
from dino_fast.models.init import trunc_normal_
from dino_fast.official import training as official
from dino_fast.official.vision_transformer import trunc_normal_ as official_trunc_normal_
from dino_fast.train import TrainConfig, Trainer
from dino_fast.train import trainer as trainer_module
from tests.helpers.official_step import (
    STEPS_PER_EPOCH,
    report,
    side_by_side,
    trainer_reading_schedules_one_late,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU
    yield
    torch.set_num_threads(threads)


def run_config(**overrides: object) -> TrainConfig:
    """The smoke preset's tiny ViT (vit_tiny/16 on 32- and 16-px crops, K=256, 4 images, 2 local
    crops) with the official optimization defaults; the learning rate warms up over the first 8 of
    12 iterations to a peak of 1e-3 (0.064 per 256 images), large enough that every planted bug
    moves the parameters by more than the tolerance."""
    values: dict[str, object] = dict(
        data="synthetic", device="cpu", seed=0, precision="fp32", epochs=3, warmup_epochs=2, lr=0.064
    )
    values.update(overrides)
    return TrainConfig.from_preset("smoke", **values)


# ---------------------------------------------------------------------------------------------
# Initial weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "mean", "std", "a", "b"),
    [
        ((384, 1152), 0.0, 0.02, -2.0, 2.0),  # a ViT-S qkv weight, as the models draw it
        ((1, 197, 384), 0.0, 0.02, -2.0, 2.0),  # the positional embedding
        ((5000,), 0.5, 1.0, -0.5, 1.0),  # bounds that cut: values are clamped into [a, b]
    ],
)
def test_trunc_normal_draws_exactly_as_the_official_one(shape, mean, std, a, b) -> None:
    torch.manual_seed(11)
    ours = trunc_normal_(torch.empty(shape), mean=mean, std=std, a=a, b=b)
    ours_next = torch.rand(3)
    torch.manual_seed(11)
    theirs = official_trunc_normal_(torch.empty(shape), mean=mean, std=std, a=a, b=b)
    theirs_next = torch.rand(3)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_next, theirs_next)  # the same number of draws: later draws line up
    assert a <= float(ours.min()) and float(ours.max()) <= b


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"seed": 7, "norm_last_layer": False, "patch_size": 8},
        {"use_bn_in_head": True, "arch": "vit_small", "out_dim": 64},
    ],
    ids=["smoke", "other-seed-unnormed-last-layer", "batchnorm-head-vit_small"],
)
def test_seed_gives_the_official_initial_weights_bitwise(overrides: dict[str, object]) -> None:
    config = run_config(**overrides)
    official.fix_random_seeds(config.seed)
    student, teacher = official.build_student_teacher(config)
    trainer = Trainer(config, "cpu", steps_per_epoch=STEPS_PER_EPOCH)
    for name, ours, theirs in (("student", trainer.student, student), ("teacher", trainer.teacher, teacher)):
        expected = theirs.state_dict()
        got = ours.state_dict()
        # In the official order too: optimizer state dicts index parameters by position.
        assert list(got) == list(expected), name
        differ = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not differ, f"{name}: {len(differ)} of {len(expected)} tensors differ, e.g. {differ[:3]}"
    if config.use_bn_in_head:  # the official conversion, on a CPU to the batch norm gloo can synchronize
        assert any(isinstance(m, CpuSyncBatchNorm) for m in trainer.student.modules())
        assert any(isinstance(m, CpuSyncBatchNorm) for m in trainer.teacher.modules())


# ---------------------------------------------------------------------------------------------
# Trajectory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "clip_grad",
    [3.0, 1.0],
    ids=["official-clip-3.0", "clip-1.0-bites-on-some-parameters"],
)
def test_trainer_step_follows_the_official_trajectory(clip_grad: float) -> None:
    config = run_config(clip_grad=clip_grad)
    if clip_grad == 3.0:
        assert (config.drop_path_rate, config.freeze_last_layer, config.clip_grad_mode) == (
            0.1,
            1,
            "per_param",
        )
    comparisons = side_by_side(config)
    text = report(comparisons)
    assert all(c.agrees for c in comparisons), f"dino_fast left the official trajectory:\n{text}"
    assert comparisons[0].loss_official != comparisons[-1].loss_official, "the steps changed nothing"
    if clip_grad == 1.0:
        # The per-parameter rule at work: in a step, some gradients are scaled and others are not.
        assert any(0 < c.clipped < c.gradients for c in comparisons), text


def _schedule_off_by_one(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> Trainer:
    return trainer_reading_schedules_one_late(config)


def _weight_decay_on_biases_and_norms(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> Trainer:
    one_group = lambda model: [{"params": [p for p in model.parameters() if p.requires_grad]}]
    monkeypatch.setattr(trainer_module, "get_params_groups", one_group)
    return Trainer(config, "cpu", steps_per_epoch=STEPS_PER_EPOCH)


def _last_layer_not_frozen(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> Trainer:
    return Trainer(dataclasses.replace(config, freeze_last_layer=0), "cpu", steps_per_epoch=STEPS_PER_EPOCH)


def _global_norm_clip(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> Trainer:
    return Trainer(
        dataclasses.replace(config, clip_grad_mode="global"), "cpu", steps_per_epoch=STEPS_PER_EPOCH
    )


PLANTED_BUGS: dict[str, Callable[[TrainConfig, pytest.MonkeyPatch], Trainer]] = {
    "schedules-read-one-iteration-late": _schedule_off_by_one,
    "weight-decay-on-biases-and-norms": _weight_decay_on_biases_and_norms,
    "last-layer-not-frozen": _last_layer_not_frozen,
    "global-norm-clip": _global_norm_clip,
}


@pytest.mark.parametrize("bug", list(PLANTED_BUGS))
def test_the_comparison_catches_a_planted_bug(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = run_config()
    trainer = PLANTED_BUGS[bug](config, monkeypatch)
    comparisons = side_by_side(config, trainer=trainer, stop_at_disagreement=True)
    assert not comparisons[-1].agrees, f"{bug} went unnoticed:\n{report(comparisons)}"


def test_the_comparison_catches_unsynchronized_drop_path() -> None:
    comparisons = side_by_side(run_config(), sync_drop_path=False, stop_at_disagreement=True)
    assert not comparisons[-1].agrees, f"different drop-path masks went unnoticed:\n{report(comparisons)}"
