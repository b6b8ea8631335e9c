"""ResNet DINO training: LARS against its formula, the checkpoint's official keys, and the official
README's RN50 command line run as a user runs it, alone and under a 2-process torchrun (gloo,
SyncBatchNorm), at tiny size on real photos. The step itself is compared with the official one in
tests/official/test_official_resnet.py."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from torchvision import models as torchvision_models

from dino_fast.checkpoint import load_checkpoint
from dino_fast.official import training as official
from dino_fast.official.vision_transformer import DINOHead, MultiCropWrapper
from dino_fast.train import ConfigError, TrainConfig, Trainer, train
from dino_fast.train.optim import LARS
from tests.helpers.photos import photo_folder
from tests.helpers.processes import run_python

# The official README's ResNet-50 command line, without its --data_path and --output_dir.
OFFICIAL_RN50_LINE = [
    "--arch", "resnet50", "--optimizer", "sgd", "--lr", "0.03", "--weight_decay", "1e-4",
    "--weight_decay_end", "1e-4", "--global_crops_scale", "0.14", "1", "--local_crops_scale", "0.05", "0.14",
]  # fmt: skip
# Tiny size for a CPU: 32- and 16-px crops, 2 local crops, 4 images per process, a 256-way head.
TINY = [
    "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
    "--batch_size_per_gpu", "4", "--out_dim", "256", "--epochs", "1", "--warmup_epochs", "0",
    "--num_workers", "0", "--data", "torchvision", "--device", "cpu", "--precision", "fp32",
]  # fmt: skip


def lars_by_formula(
    params: list[np.ndarray], grads: list[list[np.ndarray]], lr: float, wd: float, momentum: float, eta: float
) -> list[np.ndarray]:
    """LARS in float64 NumPy, step by step: for a multi-dimensional p, d = g + wd p scaled by
    eta |p| / |d| (by 1 when either norm is 0); biases and norms take g as it is; then
    mu <- momentum mu + d and p <- p - lr mu."""
    params = [p.copy() for p in params]
    mus = [np.zeros_like(p) for p in params]
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads, strict=True)):
            d = g
            if p.ndim != 1:
                d = g + wd * p
                p_norm, d_norm = np.linalg.norm(p), np.linalg.norm(d)
                d = d * (eta * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0)
            mus[i] = momentum * mus[i] + d
            params[i] = p - lr * mus[i]
    return params


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_lars_follows_its_formula(wd: float) -> None:
    rng = np.random.default_rng(0)
    # A matrix, a conv kernel, a bias, a batch-norm weight, and a zero matrix (|p| = 0: no scaling).
    shapes = [(5, 3), (4, 2, 3, 3), (5,), (4,), (3, 2)]
    initial = [rng.standard_normal(s) for s in shapes]
    initial[-1][:] = 0.0
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(3)]
    grads[1][0][:] = 0.0  # |dp| = 0 on one step (without weight decay): no scaling either
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in initial]
    opt = LARS([{"params": params}], lr=0.3, weight_decay=wd, momentum=0.9, eta=0.02)
    reference = official.LARS([{"params": [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in initial]}])
    reference.param_groups[0].update(lr=0.3, weight_decay=wd, momentum=0.9, eta=0.02)
    for step_grads in grads:
        for p, q, g in zip(params, reference.param_groups[0]["params"], step_grads, strict=True):
            p.grad, q.grad = torch.from_numpy(g.copy()), torch.from_numpy(g.copy())
        opt.step()
        reference.step()
    expected = lars_by_formula(initial, grads, lr=0.3, wd=wd, momentum=0.9, eta=0.02)
    for p, q, e in zip(params, reference.param_groups[0]["params"], expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-12)
        assert torch.equal(p, q)  # and bitwise the official utils.LARS


def test_resnet_checkpoint_has_the_official_keys(tmp_path) -> None:
    config = TrainConfig.from_preset(
        "resnet50_imagenet", data="synthetic", device="cpu", out_dim=256, output_dir=str(tmp_path)
    )
    state = Trainer(config, "cpu", steps_per_epoch=4).state_dict(0)
    teacher, student = state["teacher"], state["student"]
    torchvision_keys = set(torchvision_models.resnet50().state_dict()) - {"fc.weight", "fc.bias"}
    assert {k.removeprefix("backbone.") for k in teacher if k.startswith("backbone.")} == torchvision_keys
    assert {"head.last_layer.weight_g", "head.last_layer.weight_v"} <= set(teacher)
    assert set(student) == {f"module.{k}" for k in teacher}
    # main_dino's own teacher (a torchvision ResNet-50 in its MultiCropWrapper) loads it strictly.
    official_teacher = MultiCropWrapper(torchvision_models.resnet50(), DINOHead(2048, 256))
    official_teacher.load_state_dict(teacher)
    # The official evaluation scripts strip "module." and "backbone." and load into a torchvision
    # ResNet whose fc is an identity: every backbone weight lands, only the head is left over.
    backbone = torchvision_models.resnet50()
    backbone.fc = torch.nn.Identity()
    stripped = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in student.items()}
    missing, unexpected = backbone.load_state_dict(stripped, strict=False)
    assert not missing and all(k.startswith("head.") for k in unexpected)


def test_an_official_resnet_training_checkpoint_resumes_into_ours(tmp_path) -> None:
    # main_dino's checkpoint after a step: the DDP student's "module." keys, SGD's momentum
    # buffers, argparse.Namespace args.
    config = TrainConfig.from_preset(
        "resnet50_imagenet", arch="resnet18", data="synthetic", device="cpu", out_dim=64, precision="fp32"
    )
    official.fix_random_seeds(1)
    student, teacher = official.build_student_teacher(config)
    optimizer = official.build_optimizer(config, official.get_params_groups(student))
    optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = 0.1
    student(torch.randn(4, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    checkpoint = {
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "args": argparse.Namespace(**config.to_dict()),
        "dino_loss": {"center": torch.randn(1, 64)},
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    trainer = Trainer(config, "cpu", steps_per_epoch=5)
    assert trainer.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pth")) == 15  # epoch 3's start
    for name, value in student.state_dict().items():
        assert torch.equal(trainer.student.state_dict()[name], value), name
    ours = trainer.optimizer.state_dict()["state"]
    theirs = optimizer.state_dict()["state"]
    assert ours.keys() == theirs.keys() and len(ours) == sum(p.requires_grad for p in student.parameters())
    assert all(torch.equal(ours[i]["momentum_buffer"], theirs[i]["momentum_buffer"]) for i in ours)


def test_a_resnet_run_resumes_whatever_patch_size_is_given(tmp_path) -> None:
    # --patch_size shapes no weight of a convnet: it is not one of the flags a resume must match.
    config = TrainConfig.from_preset(
        "smoke", arch="resnet18", data="synthetic", device="cpu", output_dir=str(tmp_path), max_steps=1
    )
    train(config)
    resumed = train(dataclasses.replace(config, patch_size=8, max_steps=2))
    assert resumed.iteration == 2
    with pytest.raises(ConfigError, match="--arch resnet18, but this run asks for --arch resnet34"):
        train(dataclasses.replace(config, arch="resnet34", max_steps=3))


def _check_run(out, proc, *, steps: int, world_size: int) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (ckpt["iteration"], ckpt["world_size"], ckpt["args"]["arch"]) == (steps, world_size, "resnet50")
    assert ckpt["args"]["optimizer"] == "sgd" and ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9
    teacher = ckpt["teacher"]
    assert all(torch.isfinite(v).all() for v in teacher.values())
    # The teacher's batch norms ran in train mode: their running statistics left the initial 0 / 1.
    assert int(teacher["backbone.bn1.num_batches_tracked"]) > 0
    assert not torch.equal(teacher["backbone.layer4.2.bn3.running_var"], torch.ones(2048))
    assert "resnet50 (torchvision; batch norms" in proc.stderr
    return ckpt


@pytest.mark.slow
def test_the_official_rn50_command_line_trains_on_a_cpu(tmp_path) -> None:
    data, out = photo_folder(tmp_path / "photos"), tmp_path / "out"
    line = [*OFFICIAL_RN50_LINE, "--data_path", str(data), "--output_dir", str(out), *TINY]
    proc = run_python(["-m", "dino_fast.train", *line], timeout=300)
    _check_run(out, proc, steps=7, world_size=1)  # 29 photos: 7 full batches of 4
    assert "over this process's batch" in proc.stderr


@pytest.mark.slow
def test_the_official_rn50_command_line_trains_under_a_two_process_torchrun(tmp_path) -> None:
    data, out = photo_folder(tmp_path / "photos"), tmp_path / "out"
    line = [*OFFICIAL_RN50_LINE, "--data_path", str(data), "--output_dir", str(out), *TINY]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_python([*launcher, "-m", "dino_fast.train", *line], timeout=420)
    _check_run(out, proc, steps=3, world_size=2)  # ceil(29 / 2) = 15 photos per rank: 3 batches
    assert "2 process(es)" in proc.stderr and "gloo" in proc.stderr
    assert "synchronized across processes" in proc.stderr
