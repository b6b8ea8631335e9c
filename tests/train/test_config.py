"""TrainConfig presets, validation and the command line (official flags accepted unchanged)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torchvision

from dino_fast.flags import bool_flag
from dino_fast.models import RESNET_ARCHS
from dino_fast.train import ConfigError, TrainConfig, parse_args

# The official README's 100-epoch ViT-S/16 command with every main_dino.py flag spelled out
# at its official default value (what `--arch deit_small` alone means).
OFFICIAL_FLAGS = [
    "--arch", "deit_small", "--patch_size", "16", "--out_dim", "65536", "--norm_last_layer", "true",
    "--momentum_teacher", "0.996", "--use_bn_in_head", "false", "--warmup_teacher_temp", "0.04",
    "--teacher_temp", "0.04", "--warmup_teacher_temp_epochs", "0", "--use_fp16", "true",
    "--weight_decay", "0.04", "--weight_decay_end", "0.4", "--clip_grad", "3.0",
    "--batch_size_per_gpu", "64", "--epochs", "100", "--freeze_last_layer", "1", "--lr", "0.0005",
    "--warmup_epochs", "10", "--min_lr", "1e-06", "--optimizer", "adamw", "--drop_path_rate", "0.1",
    "--global_crops_scale", "0.4", "1.", "--local_crops_number", "8", "--local_crops_scale", "0.05", "0.4",
    "--output_dir", "out", "--saveckp_freq", "20", "--seed", "0", "--num_workers", "10",
    "--dist_url", "env://", "--local_rank", "0",
]  # fmt: skip


def test_official_command_line_runs_unchanged(tmp_path):
    cfg = parse_args([*OFFICIAL_FLAGS, "--data_path", str(tmp_path)])
    preset = TrainConfig.from_preset("vit_small_imagenet", data_path=str(tmp_path), output_dir="out")
    # Spelling out the official defaults gives exactly the preset, except that --use_fp16 true asks
    # for the official fp16 + GradScaler instead of our bf16 default.
    assert cfg.resolved_precision() == "fp16" and preset.resolved_precision() == "bf16"
    assert dataclasses.replace(cfg, use_fp16=None, preset="vit_small_imagenet") == preset
    assert cfg.arch == "vit_small"  # deit_small is the official alias
    assert cfg.global_crops_scale == (0.4, 1.0)


# The official README's ResNet-50 command line (its --data_path and --output_dir aside).
OFFICIAL_RN50_FLAGS = [
    "--arch", "resnet50", "--optimizer", "sgd", "--lr", "0.03", "--weight_decay", "1e-4",
    "--weight_decay_end", "1e-4", "--global_crops_scale", "0.14", "1", "--local_crops_scale", "0.05", "0.14",
]  # fmt: skip


def test_official_rn50_command_line_is_the_resnet50_preset(tmp_path):
    cfg = parse_args([*OFFICIAL_RN50_FLAGS, "--data_path", str(tmp_path)])
    preset = TrainConfig.from_preset("resnet50_imagenet", data_path=str(tmp_path))
    assert dataclasses.replace(cfg, preset="resnet50_imagenet") == preset
    assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.weight_decay_end) == (
        "resnet50",
        "sgd",
        0.03,
        1e-4,
        1e-4,
    )
    assert (cfg.global_crops_scale, cfg.local_crops_scale) == ((0.14, 1.0), (0.05, 0.14))
    cfg.validate()


def test_every_torchvision_resnet_is_an_arch():
    # The ResNet family torchvision exports by name, as the official --arch takes it.
    family = {
        name
        for name, fn in vars(torchvision.models).items()
        if callable(fn) and re.fullmatch(r"(resnet|resnext|wide_resnet)\d.*", name)
    }
    assert family == set(RESNET_ARCHS)
    for arch in family:
        assert parse_args(["--arch", arch, "--data", "synthetic"]).arch == arch
    with pytest.raises(SystemExit):
        parse_args(["--arch", "resnet51", "--data", "synthetic"])


def test_a_convnet_has_no_patches_to_fit_in_a_crop():
    cfg = parse_args(
        ["--arch", "resnet18", "--data", "synthetic", "--local_crops_size", "8", "--patch_size", "16"]
    )
    cfg.validate()  # a ViT/16 could not take 8-px crops; a ResNet can


def test_vit_small_imagenet_preset_is_the_papers_recipe():
    c = TrainConfig.from_preset("vit_small_imagenet")
    assert (c.arch, c.patch_size, c.out_dim, c.norm_last_layer) == ("vit_small", 16, 65536, True)
    assert (c.epochs, c.warmup_epochs, c.lr, c.min_lr, c.batch_size_per_gpu) == (100, 10, 5e-4, 1e-6, 64)
    assert (c.weight_decay, c.weight_decay_end, c.clip_grad, c.freeze_last_layer) == (0.04, 0.4, 3.0, 1)
    assert (c.momentum_teacher, c.teacher_temp, c.warmup_teacher_temp_epochs) == (0.996, 0.04, 0)
    assert (c.local_crops_number, c.global_crops_size, c.local_crops_size) == (8, 224, 96)
    assert c.drop_path_rate == 0.1


@pytest.mark.parametrize("name", ["vit_small_imagenet", "resnet50_imagenet", "demo", "smoke"])
def test_presets_validate(name, tmp_path):
    cfg = TrainConfig.from_preset(name, data="synthetic") if name != "demo" else TrainConfig.from_preset(name)
    cfg.validate()
    assert cfg.preset == name


def test_demo_schedule_follows_the_device_it_will_run_on(monkeypatch):
    # A GPU machine asked for --device cpu must get the CPU schedule (minutes), not the GPU one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = TrainConfig.from_preset("demo")
    cpu = TrainConfig.from_preset("demo", device="cpu")
    flags = parse_args(["--preset", "demo", "--device", "cpu"])
    assert (gpu.epochs, gpu.demo_max_per_class, gpu.batch_size_per_gpu) == (30, 0, 256)
    assert (cpu.epochs, cpu.demo_max_per_class, cpu.batch_size_per_gpu, cpu.num_workers) == (24, 200, 64, 0)
    assert (flags.epochs, flags.demo_max_per_class, flags.device) == (24, 200, "cpu")


def test_from_preset_overrides_and_rejects_unknown():
    cfg = TrainConfig.from_preset("smoke", out_dim=128, max_steps=3)
    assert (cfg.out_dim, cfg.max_steps, cfg.arch) == (128, 3, "vit_tiny")
    with pytest.raises(ConfigError, match="unknown preset"):
        TrainConfig.from_preset("vit_huge")
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainConfig.from_preset("smoke", learning_rate=1.0)


def test_preset_then_flags_override(tmp_path):
    cfg = parse_args(["--preset", "smoke", "--data", "synthetic", "--out_dim", "64", "--no-resume"])
    assert (cfg.preset, cfg.out_dim, cfg.resume, cfg.batch_size_per_gpu) == ("smoke", 64, False, 4)


@pytest.mark.parametrize(
    ("given", "expected"),
    [((None, None), "bf16"), ((None, True), "fp16"), ((None, False), "fp32"), (("fp16", True), "fp16")],
)
def test_precision_resolution(given, expected):
    precision, use_fp16 = given
    assert TrainConfig(precision=precision, use_fp16=use_fp16).resolved_precision() == expected


def test_precision_contradiction_is_an_error():
    with pytest.raises(ConfigError, match="contradicts --use_fp16"):
        TrainConfig(precision="bf16", use_fp16=True).resolved_precision()


def test_data_auto_resolves_to_a_pipeline():
    assert TrainConfig(data="synthetic").resolved_data() == "synthetic"
    # Without a GPU, auto is the torchvision pipeline whatever is installed.
    assert TrainConfig(device="cpu").resolved_data() == "torchvision"


def test_bool_flag():
    assert bool_flag("True") and bool_flag("on") and bool_flag("1")
    assert not (bool_flag("false") or bool_flag("OFF") or bool_flag("0"))
    with pytest.raises(Exception, match="boolean"):
        bool_flag("maybe")


# Bad arguments: the CLI exits with status 2 and a message that names the option and the fix.
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data_path", "/definitely/not/here"], "is not a directory"),
        (["--data", "synthetic", "--batch_size_per_gpu", "0"], "--batch_size_per_gpu must be >= 1"),
        (["--data", "synthetic", "--local_crops_number", "-1"], "--local_crops_number must be >= 0"),
        (["--data", "synthetic", "--global_crops_scale", "0.4"], "takes two numbers"),
        (["--data", "synthetic", "--local_crops_scale", "0.5", "0.2"], "0 < min <= max <= 1"),
        (["--data", "synthetic", "--warmup_epochs", "200"], "longer than --epochs"),
        (["--data", "synthetic", "--precision", "bf16", "--use_fp16", "true"], "contradicts"),
        (["--data", "synthetic", "--arch", "resnet51"], "invalid choice"),
        (
            [
                "--data",
                "synthetic",
                "--arch",
                "resnet18",
                "--batch_size_per_gpu",
                "1",
                "--local_crops_number",
                "1",
            ],
            "would normalize a single sample",
        ),
        (["--data", "synthetic", "--global_crops_size", "8"], "smaller than --patch_size"),
        (["--data", "synthetic", "--max_steps", "0"], "--max_steps must be >= 1"),
        (["--data", "synthetic", "--center_momentum", "1.5"], "--center_momentum must be in [0, 1]"),
        (["--data", "synthetic", "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    ],
)
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--preset", "smoke", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_teacher_centering_flag_takes_sinkhorn_knopp_and_refuses_another_value_in_one_line(capsys):
    assert parse_args(["--preset", "smoke", "--data", "synthetic"]).teacher_centering == "center"
    argv = ["--preset", "smoke", "--data", "synthetic", "--teacher_centering"]
    assert parse_args([*argv, "sinkhorn_knopp"]).teacher_centering == "sinkhorn_knopp"
    with pytest.raises(SystemExit) as exc:
        parse_args([*argv, "sinkhorn"])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--teacher_centering" in errors[0], errors
    assert "'sinkhorn'" in errors[0] and "center" in errors[0] and "sinkhorn_knopp" in errors[0]


def test_to_dict_is_plain():
    d = TrainConfig.from_preset("smoke").to_dict()
    assert d["global_crops_scale"] == [0.4, 1.0]
    assert all(isinstance(v, (int, float, str, bool, list, type(None))) for v in d.values())


@pytest.mark.parametrize("color_ops", ["pil", "affine"])
def test_dali_color_ops_reaches_the_dali_loader(tmp_path, color_ops):
    import shutil

    from dino_fast.distributed import DistInfo
    from dino_fast.train.loader import build_loader
    from tests.helpers.photos import photo_paths

    for photo in photo_paths()[:4]:
        shutil.copy(photo, tmp_path / photo.name)
    config = TrainConfig.from_preset(
        "smoke", data="dali", data_path=str(tmp_path), device="cpu", dali_color_ops=color_ops
    )
    config.validate()
    loader = build_loader(config, DistInfo(0, 1, 0, torch.device("cpu"), None), tmp_path)
    assert loader.color_ops == color_ops
