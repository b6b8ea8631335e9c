"""benchmarks/throughput.py for convnets (the paper's RN50 row): the official step on a torchvision
ResNet with the optimizer the run names, its FLOP count, the RN50 recipe, and whole runs on a CPU
that pass the equal-loss check, skip what does not apply and write their JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import throughput
from benchmarks.end_to_end import official_step as od
from benchmarks.end_to_end.context import bench_config
from benchmarks.end_to_end.flops import step_flops
from dino_fast.official.training import build_student_teacher
from dino_fast.train import TrainConfig

RESNET18 = od.ModelSpec(arch="resnet18", out_dim=256, drop_path_rate=0.0)


def crops(batch: int, n_local: int, global_size: int, local_size: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, global_size, global_size, generator=gen) for _ in range(2)]
    return views + [torch.randn(batch, 3, local_size, local_size, generator=gen) for _ in range(n_local)]


def test_resnet_flop_count_equals_torch_flop_counter() -> None:
    # A whole official step's matmul work (student forward + backward over every crop, teacher
    # forward over the global ones): the stem convolution gets no input gradient.
    batch, n_local = 2, 2
    student, teacher = build_student_teacher(RESNET18)
    views = crops(batch, n_local, 64, 32)
    with FlopCounterMode(display=False) as counter:
        student(views).sum().backward()
        teacher(views[:2])
    expected = step_flops("resnet18", 16, 64, 32, n_local, 256)
    assert counter.get_total_flops() == expected["total"] * batch


def test_resnet50_forward_count_is_torchvisions_4_09_gmacs() -> None:
    flops = step_flops("resnet50", 16, 224, 96, 0, 256)
    # torchvision documents ResNet-50 at 4.09 GFLOPS (multiply-adds) per 224-px image.
    assert flops["teacher_backbone"] / 2 / 2 == pytest.approx(4.09e9, rel=0.002)


@pytest.mark.slow  # 3-20 s each (by the machine's load): fp64 convolutions have no fast CPU kernels
@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_tuned_parts_compute_the_official_convnet_step(optimizer: str) -> None:
    # channels_last, the fused SGD (LARS keeps its loop), sync-free clipping and the foreach EMA
    # must follow the official trajectory of a ResNet with batch norms, in fp64 as for the ViT.
    hyper = od.Hyper(lr=0.1, weight_decay=1e-4, momentum=0.9)
    runs = {}
    for name, options in (
        ("official", od.OFFICIAL_FP32),
        ("tuned", dataclasses.replace(od.TUNED, amp_dtype=None)),
    ):
        state = od.official_state_dict(RESNET18, seed=3)
        step = od.TrainStep(
            RESNET18, options, state, torch.device("cpu"), ncrops=4, dtype=torch.float64, optimizer=optimizer
        )
        views = [v.double() for v in crops(2, 2, 32, 16, seed=4)]
        runs[name] = ([step.step(views, hyper) for _ in range(2)], step)
    (official_losses, official), (tuned_losses, tuned) = runs["official"], runs["tuned"]
    assert tuned.channels_last and not official.channels_last
    assert type(tuned.optimizer).__name__ == {"sgd": "SGD", "lars": "LARS"}[optimizer]
    assert official_losses[0] != official_losses[1]
    torch.testing.assert_close(tuned_losses, official_losses, rtol=1e-10, atol=0)
    for name, value in official.teacher.state_dict().items():
        torch.testing.assert_close(tuned.teacher.state_dict()[name], value, rtol=1e-9, atol=1e-10, msg=name)


def test_a_convnet_arch_takes_the_rn50_recipe_and_its_preset() -> None:
    args = throughput.parse_args(["--device", "cpu", "--arch", "resnet50"])
    assert args.preset == "rn_tiny" and args.arch == "resnet50" and args.global_crops_size == 96
    config = bench_config(args)
    recipe = TrainConfig.from_preset("resnet50_imagenet")  # the official README's RN50 command line
    for name in (
        "optimizer",
        "lr",
        "weight_decay",
        "weight_decay_end",
        "global_crops_scale",
        "local_crops_scale",
    ):
        assert getattr(config, name) == getattr(recipe, name), name
    assert config.optimizer == "sgd" and config.weight_decay_end == 1e-4
    lars = bench_config(
        throughput.parse_args(["--device", "cpu", "--arch", "resnet18", "--optimizer", "lars"])
    )
    assert lars.optimizer == "lars" and lars.lr == 0.03
    vit = bench_config(throughput.parse_args(["--device", "cpu"]))
    assert vit.arch == "vit_tiny" and vit.optimizer == "adamw" and vit.global_crops_scale == (0.4, 1.0)
    # The GPU preset: the ViT anchor's shapes with main_dino.py's 8 local crops.
    rn50 = throughput.PRESETS["rn50"]
    assert rn50["local_crops_number"] == 8 and rn50["batch_size_per_gpu"] == 128 and rn50["out_dim"] == 65536


@pytest.mark.slow  # 5-15 s: an fp32 reference and two variants of a ResNet-18 step
def test_resnet18_tiny_run_passes_the_equal_loss_check_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "rn18.json"
    argv = ["--device", "cpu", "--preset", "rn_tiny", "--steps", "1", "--warmup", "0", "--json", str(out)]
    payload = throughput.main([*argv, "--variants", "official", "dino_fast", "dino_fast+explicit"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    results = {r["name"]: r for r in payload["variants"]}
    for name in ("official", "dino_fast"):
        assert results[name]["status"] == "ok", results[name].get("error")
        assert results[name]["check"]["passed"] and results[name]["images_per_s"] > 0
    assert results["dino_fast"]["precision"] == "bf16" and results["official"]["precision"] == "fp32"
    # An attention backend has nothing to change in a convnet: skipped with the reason, not failed.
    explicit = results["dino_fast+explicit"]
    assert explicit["status"] == "skipped" and "convnet" in explicit["reason"]
    assert payload["all_ok"] and payload["complete"]
    config = payload["config"]
    assert (
        config["arch"] == "resnet18" and config["optimizer"] == "sgd" and config["lr_per_256_images"] == 0.03
    )
    assert config["crops_scale"] == {"global": [0.14, 1.0], "local": [0.05, 0.14]}
    assert set(payload["flops_per_image"]) == {
        "student_backbone",
        "student_head",
        "teacher_backbone",
        "teacher_head",
        "total",
    }


@pytest.mark.slow  # 5-20 s: ResNet-50 on 96/48-px crops
def test_resnet50_tiny_run_passes_the_equal_loss_check(tmp_path: Path) -> None:
    argv = ["--device", "cpu", "--arch", "resnet50", "--steps", "1", "--warmup", "0"]
    payload = throughput.main([*argv, "--variants", "dino_fast", "--json", str(tmp_path / "rn50.json")])
    (result,) = payload["variants"]
    assert result["status"] == "ok", result.get("error")
    assert result["check"]["passed"], result["check"]
    assert json.loads((tmp_path / "rn50.json").read_text())["config"]["arch"] == "resnet50"
