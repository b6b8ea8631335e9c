"""Checkpoint loading for evaluation: every format DINO users have, and every way it goes wrong."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from dino_fast import models
from dino_fast.eval.weights import (
    CheckpointError,
    add_model_arguments,
    build_backbone,
    build_model_from_args,
    load_pretrained_weights,
)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def fresh(arch: str = "vit_tiny", patch: int = 16, seed: int = 123) -> torch.nn.Module:
    torch.manual_seed(seed)  # a different init from the saved weights, so loading must change it
    return build_backbone(arch, patch)


@pytest.fixture(scope="module")
def trained_pair():
    """Student and teacher DINOModels with different backbone weights, as after training."""
    torch.manual_seed(0)
    student = models.DINOModel(models.vit_tiny(patch_size=16), models.DINOHead(192, 64))
    torch.manual_seed(1)
    teacher = models.DINOModel(models.vit_tiny(patch_size=16), models.DINOHead(192, 64))
    return student, teacher


def official_training_checkpoint(student, teacher) -> dict:
    """main_dino.py's save_dict: DDP student ("module.backbone.*"), bare teacher ("backbone.*")."""
    return {
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": teacher.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=64),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_official_training_checkpoint(tmp_path, trained_pair, key):
    student, teacher = trained_pair
    path = tmp_path / "checkpoint.pth"
    torch.save(official_training_checkpoint(student, teacher), path)
    model = fresh()
    info = load_pretrained_weights(model, path, key)
    source = teacher if key == "teacher" else student
    assert_same_weights(model, state_of(source.backbone))
    assert info.num_tensors == len(model.state_dict())  # the head's tensors were dropped


def test_official_released_backbone_state_dict(tmp_path, trained_pair):
    # dino_deitsmall16_pretrain.pth & co: a bare backbone state dict; checkpoint_key is ignored
    backbone = trained_pair[1].backbone
    path = tmp_path / "dino_vittiny16_pretrain.pth"
    torch.save(backbone.state_dict(), path)
    model = fresh()
    load_pretrained_weights(model, path, "teacher")
    assert_same_weights(model, state_of(backbone))


def test_compiled_and_ddp_prefixes_are_stripped(tmp_path, trained_pair):
    backbone = trained_pair[0].backbone
    path = tmp_path / "compiled.pth"
    torch.save(
        {"teacher": {f"module._orig_mod.backbone.{k}": v for k, v in backbone.state_dict().items()}}, path
    )
    model = fresh()
    load_pretrained_weights(model, path, "teacher")
    assert_same_weights(model, state_of(backbone))


def test_dino_fast_training_checkpoint(tmp_path):
    # a real checkpoint from dino_fast.train (smoke preset, synthetic data, two steps)
    from dino_fast.train import TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread avoids spinning on the shared CI cores
    try:
        cfg = TrainConfig.from_preset(
            "smoke", data="synthetic", output_dir=str(tmp_path / "run"), device="cpu", max_steps=2, seed=5
        )
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    for key in ("teacher", "student"):
        model = fresh(cfg.arch, cfg.patch_size)
        load_pretrained_weights(model, result.checkpoint, key)
        source = result.trainer.teacher if key == "teacher" else result.trainer.student
        assert_same_weights(model, state_of(source.backbone))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*checkpoint"):
        load_pretrained_weights(fresh(), tmp_path / "nope.pth", "teacher")


def test_missing_checkpoint_key_lists_the_entries(tmp_path, trained_pair):
    path = tmp_path / "checkpoint.pth"
    torch.save(official_training_checkpoint(*trained_pair), path)
    with pytest.raises(CheckpointError, match=r"'teachr' is not in .*'student', 'teacher'"):
        load_pretrained_weights(fresh(), path, "teachr")


def test_arch_mismatch_names_the_shapes_and_the_right_flags(tmp_path):
    torch.manual_seed(0)
    small = models.vit_small(patch_size=16)
    path = tmp_path / "small.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in small.state_dict().items()}}, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained_weights(fresh("vit_tiny", 16), path, arch_hint="--arch vit_tiny --patch_size 16")
    msg = str(err.value)
    assert "(1, 1, 192)" in msg and "(1, 1, 384)" in msg  # expected vs found shapes
    assert "--arch vit_tiny" in msg and "--arch vit_small --patch_size 16" in msg


def test_patch_size_mismatch(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "p8.pth"
    torch.save(models.vit_tiny(patch_size=8).state_dict(), path)
    with pytest.raises(
        CheckpointError, match=r"patch_embed.proj.weight.*\(192, 3, 16, 16\).*\(192, 3, 8, 8\)"
    ):
        load_pretrained_weights(fresh("vit_tiny", 16), path)


def test_incomplete_or_foreign_state_dicts_are_refused(tmp_path, trained_pair):
    state = trained_pair[1].backbone.state_dict()
    truncated = {k: v for k, v in state.items() if not k.startswith("blocks.11.")}
    torch.save(truncated, tmp_path / "truncated.pth")
    with pytest.raises(CheckpointError, match=r"missing from it.*blocks\.11\."):
        load_pretrained_weights(fresh(), tmp_path / "truncated.pth")
    extra = dict(state, **{"blocks.12.norm1.weight": torch.ones(192)})
    torch.save(extra, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError, match=r"tensors the model lacks.*depth=13"):
        load_pretrained_weights(fresh(), tmp_path / "deeper.pth")
    torch.save({"teacher": {"head.mlp.0.weight": torch.ones(2, 2)}}, tmp_path / "head_only.pth")
    with pytest.raises(CheckpointError, match="no backbone tensors"):
        load_pretrained_weights(fresh(), tmp_path / "head_only.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_pretrained_weights(fresh(), tmp_path / "list.pth")


def test_no_weights_keeps_random_init_and_warns_loudly(caplog):
    model = fresh()
    before = state_of(model)
    with caplog.at_level(logging.WARNING, logger="dino_fast.eval.weights"):
        info = load_pretrained_weights(model, "", "teacher")
    assert info.path is None
    assert "RANDOMLY INITIALIZED" in caplog.text
    assert_same_weights(model, before)


class NotAllowListed:
    """A Python object torch's weights-only unpickler refuses (like a pickled config class)."""


def test_checkpoint_with_python_objects_loads_only_when_pickle_is_allowed(tmp_path, trained_pair):
    backbone = trained_pair[1].backbone
    path = tmp_path / "pickled.pth"
    torch.save({"teacher": backbone.state_dict(), "config": NotAllowListed()}, path)
    with pytest.raises(CheckpointError, match=r"NotAllowListed.*run code.*--allow_pickle true"):
        load_pretrained_weights(fresh(), path, "teacher")
    model = fresh()
    load_pretrained_weights(model, path, "teacher", allow_pickle=True)
    assert_same_weights(model, state_of(backbone))


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown --arch"):
        build_backbone("deit_huge")


def _eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("stored", ["dino_fast args", "official Namespace", "weights only"])
def test_eval_commands_take_the_model_from_the_checkpoint_when_flags_are_left_out(tmp_path, stored):
    torch.manual_seed(0)
    teacher = models.DINOModel(models.vit_tiny(patch_size=8), models.DINOHead(192, 64))
    checkpoint = {"teacher": teacher.state_dict(), "epoch": 3}
    if stored == "dino_fast args":
        checkpoint["args"] = {"arch": "vit_tiny", "patch_size": 8, "out_dim": 64}
    elif stored == "official Namespace":
        checkpoint["args"] = argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=64)
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    model = build_model_from_args(_eval_args("--pretrained_weights", str(path)), torch.device("cpu"))
    assert model.embed_dim == 192 and model.patch_embed.patch_size == 8
    assert_same_weights(model, state_of(teacher.backbone))
    # Flags given explicitly win, and a wrong one still fails by name.
    with pytest.raises(
        CheckpointError, match=r"--arch vit_small --patch_size 8.*--arch vit_tiny --patch_size 8"
    ):
        build_model_from_args(
            _eval_args("--pretrained_weights", str(path), "--arch", "vit_small"), torch.device("cpu")
        )


def test_without_weights_the_official_default_model_is_built():
    model = build_model_from_args(_eval_args(), torch.device("cpu"))
    assert model.embed_dim == 384 and model.patch_embed.patch_size == 16
