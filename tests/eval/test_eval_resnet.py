"""ResNet backbones in the evaluations (the paper's RN50 row): every checkpoint form loads, the arch
is read off the weights exactly, k-NN and the linear probe run end to end on the pooled feature,
and what cannot apply to a convnet is refused in one line. Small: resnet18 on 32-px crops."""

from __future__ import annotations

import argparse

import pytest
import torch
import torchvision
from torch import nn

from dino_fast.errors import run_command
from dino_fast.eval import attention_maps, knn, linear
from dino_fast.eval.arch_inference import arch_from_weights, describe_state_dict
from dino_fast.eval.features import FeatureSpec
from dino_fast.eval.splits import extract_split
from dino_fast.eval.weights import (
    backbone_state_dict,
    build_backbone,
    build_model_from_args,
    load_pretrained_weights,
)
from dino_fast.models import RESNET_ARCHS
from dino_fast.official import training as official
from dino_fast.train import TrainConfig, Trainer
from dino_fast.train.knn_hook import knn_evaluation
from dino_fast.train.run import TrainResult
from tests.helpers.photos import imagenet_photos

SIZE = ["--image_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "4"]


def perturb_(module: nn.Module, seed: int) -> None:
    """Scale every float tensor (weights and batch-norm statistics) a little, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.mul_(1.0 + 0.2 * torch.rand(tensor.shape, generator=g))


def backbone_part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v.clone() for k, v in state.items() if k.startswith(prefix)}


def torchvision_resnet18(state: dict[str, torch.Tensor]) -> nn.Module:
    """The reference: torchvision's resnet18 with these weights and fc = identity, as official."""
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(state)
    return model.eval()


def one_line_error(capsys, main, argv: list[str]) -> str:
    capsys.readouterr()
    assert run_command(main, argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


@pytest.fixture(scope="module")
def dino_fast_run(tmp_path_factory):
    """A dino_fast resnet18 run's checkpoint (teacher moved away from the student) and its trainer."""
    config = TrainConfig.from_preset("smoke", arch="resnet18", data="synthetic", device="cpu")
    trainer = Trainer(config, "cpu", steps_per_epoch=1)
    perturb_(trainer.teacher.backbone, seed=1)
    path = tmp_path_factory.mktemp("dino_fast_rn") / "checkpoint.pth"
    torch.save(trainer.state_dict(0), path)
    return path, trainer


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """main_dino.py's save_dict for --arch resnet18: argparse.Namespace args, DDP student."""
    args = argparse.Namespace(
        arch="resnet18", patch_size=16, drop_path_rate=0.1, out_dim=64, use_bn_in_head=False
    )
    args.norm_last_layer = True
    torch.manual_seed(7)
    student, teacher = official.build_student_teacher(args)
    perturb_(teacher, seed=2)
    checkpoint = {
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": teacher.state_dict(),
        "epoch": 800,
        "args": args,
    }
    path = tmp_path_factory.mktemp("official_rn") / "checkpoint.pth"
    torch.save(checkpoint, path)
    return path, checkpoint


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    """A plain torchvision resnet18 state dict, fc included (dino_resnet50_pretrain.pth's form)."""
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("tv_rn") / "dino_resnet18_pretrain.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("arch", RESNET_ARCHS)
def test_every_resnet_arch_is_recognized_exactly_from_its_weights(arch):
    state = backbone_state_dict(getattr(torchvision.models, arch)().state_dict())  # fc dropped
    assert arch_from_weights(state) == {"arch": arch}
    assert describe_state_dict(state).endswith(f"-> --arch {arch}")
    # Weights saved before torch had batch-norm step counters are the same network.
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert arch_from_weights(old) == {"arch": arch}


def test_a_resnet_unlike_any_named_one_is_described_not_guessed():
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    state = backbone_state_dict(model.state_dict())
    assert arch_from_weights(state) == {}
    assert "basic blocks, (1, 1, 1, 1) per stage, which is none of resnet18" in describe_state_dict(state)


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_dino_fast_resnet_checkpoint_loads_by_its_stored_arch(dino_fast_run, key):
    path, _ = dino_fast_run
    saved = torch.load(path, weights_only=True)
    prefix = "backbone." if key == "teacher" else "module.backbone."
    expected = backbone_part(saved[key], prefix)
    model = build_model_from_args(
        knn.build_parser().parse_args(["--pretrained_weights", str(path), "--checkpoint_key", key]), "cpu"
    )
    assert model.embed_dim == 512 and not model.training
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_official_full_resnet_checkpoint_loads_with_its_namespace_args(official_checkpoint):
    path, checkpoint = official_checkpoint
    model = build_model_from_args(knn.build_parser().parse_args(["--pretrained_weights", str(path)]), "cpu")
    expected = backbone_part(checkpoint["teacher"], "backbone.")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert not torch.equal(model.conv1.weight, checkpoint["student"]["module.backbone.conv1.weight"])


@pytest.mark.parametrize("form", ["with fc", "without fc", "without batch-norm step counters"])
def test_plain_torchvision_state_dict_loads_with_the_arch_read_off_its_shapes(
    torchvision_weights, tmp_path, form
):
    _, state = torchvision_weights
    if form != "with fc":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if form == "without batch-norm step counters":
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pth")
    model = build_model_from_args(
        knn.build_parser().parse_args(["--pretrained_weights", str(tmp_path / "w.pth")]), "cpu"
    )
    assert type(model).__name__ == "ResNet" and model.embed_dim == 512
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(model.state_dict()[k], v), k


def test_loaded_resnet_features_are_torchvisions_pooled_features(dino_fast_run):
    path, trainer = dino_fast_run
    model = build_backbone("resnet18")
    load_pretrained_weights(model, path, "teacher")
    reference = torchvision_resnet18(trainer.teacher.backbone.state_dict())
    x = torch.randn(3, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    assert ours.shape == (3, 512)
    assert torch.equal(ours, theirs)


def test_wrong_arch_for_the_weights_fails_in_one_line_naming_the_right_one(
    dino_fast_run, capsys, data_root, tmp_path
):
    path = str(dino_fast_run[0])
    data = ["--data_path", str(data_root), *SIZE]
    deeper = one_line_error(capsys, knn.main, ["--pretrained_weights", path, "--arch", "resnet34", *data])
    assert "model built with --arch resnet34" in deeper and "missing from it" in deeper
    assert "It was saved from a resnet18 (basic blocks, (2, 2, 2, 2) per stage) -> --arch resnet18" in deeper
    bottleneck = one_line_error(capsys, knn.main, ["--pretrained_weights", path, "--arch", "resnet50", *data])
    assert "model expects (64, 64, 1, 1), checkpoint has (64, 64, 3, 3)" in bottleneck
    assert bottleneck.endswith("-> --arch resnet18.")
    vit = one_line_error(capsys, knn.main, ["--pretrained_weights", path, "--arch", "vit_tiny", *data])
    assert "--arch vit_tiny --patch_size 16" in vit and "-> --arch resnet18" in vit
    torch.manual_seed(0)
    vit_weights = tmp_path / "vit_tiny.pth"
    torch.save(build_backbone("vit_tiny", 16).state_dict(), vit_weights)
    resnet = one_line_error(
        capsys, knn.main, ["--pretrained_weights", str(vit_weights), "--arch", "resnet18", *data]
    )
    assert "-> --arch vit_tiny --patch_size 16" in resnet


def teacher_backbone_weights(form: str, fixture) -> dict[str, torch.Tensor]:
    """The backbone weights each checkpoint form must load (its teacher's, or the plain state dict)."""
    if form == "dino_fast_run":
        return fixture[1].teacher.backbone.state_dict()
    if form == "official_checkpoint":
        return backbone_part(fixture[1]["teacher"], "backbone.")
    return {k: v for k, v in fixture[1].items() if not k.startswith("fc.")}


@pytest.mark.parametrize("form", ["dino_fast_run", "official_checkpoint", "torchvision_weights"])
def test_knn_cli_on_every_resnet_checkpoint_form_uses_the_pooled_features(request, form, data_root, tmp_path):
    fixture = request.getfixturevalue(form)
    dump = tmp_path / "dump"
    argv = [
        "--pretrained_weights",
        str(fixture[0]),
        "--data_path",
        str(data_root),
        *SIZE,
        "--nb_knn",
        "1",
        "3",
    ]
    result = knn.main([*argv, "--dump_features", str(dump)])
    assert (result.num_train, result.num_test) == (4, 4) and set(result.top1) == {1, 3}
    reference = torchvision_resnet18(teacher_backbone_weights(form, fixture))
    expected = extract_split(reference, data_root / "train", FeatureSpec(image_size=32)).features
    assert expected.shape == (4, 512)
    torch.testing.assert_close(torch.load(dump / "trainfeat.pth"), knn.normalize(expected))
    # The dump's keys fingerprint these weights and images: reused, and it gives the same numbers.
    assert knn.main([*argv, "--load_features", str(dump)]).top1 == result.top1


def test_linear_probe_runs_the_official_recipe_on_an_official_resnet_checkpoint(
    official_checkpoint, data_root, tmp_path
):
    path, _ = official_checkpoint
    argv = ["--pretrained_weights", str(path), "--data_path", str(data_root), *SIZE]
    out = tmp_path / "probe"
    trained = linear.main([*argv, "--epochs", "2", "--lr", "0.5", "--output_dir", str(out)])
    assert trained.classifier.linear.in_features == 512 and len(trained.history) == 2
    evaluated = linear.main([*argv, "--evaluate", "--linear_weights", str(out / "linear.pth")])
    assert evaluated.top1 == pytest.approx(trained.top1)


def test_linear_cached_features_of_a_resnet_are_the_knn_features(
    torchvision_weights, data_root, tmp_path, caplog
):
    path, _ = torchvision_weights
    argv = ["--pretrained_weights", str(path), "--data_path", str(data_root), *SIZE]
    cache = ["--cache_dir", str(tmp_path / "cache")]
    result = linear.main([*argv, *cache, "--cached_features", "--epochs", "3", "--output_dir", str(tmp_path)])
    assert result.classifier.linear.in_features == 512
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    # A convnet's probe feature is its pooled output, the k-NN's: the k-NN reuses the cached files.
    with caplog.at_level("INFO", logger="dino_fast.eval.splits"):
        knn.main([*argv, *cache, "--nb_knn", "1"])
    assert caplog.text.count("loaded from the cache") == 2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--n_last_blocks", "1"], "--n_last_blocks 1: ViT-only flags"),
        (["--avgpool_patchtokens", "true"], "--avgpool_patchtokens true: ViT-only flags"),
    ],
)
def test_linear_refuses_the_vit_token_flags_for_a_convnet(dino_fast_run, data_root, capsys, flags, named):
    argv = ["--pretrained_weights", str(dino_fast_run[0]), "--data_path", str(data_root), *SIZE, *flags]
    line = one_line_error(capsys, linear.main, argv)
    assert named in line and "ResNet under evaluation is a convnet" in line


def test_visualize_refuses_a_convnet_named_by_arch_or_by_its_checkpoint(dino_fast_run, capsys, tmp_path):
    photo = str(imagenet_photos()[0])
    common = ["--image_path", photo, "--output_dir", str(tmp_path)]
    by_flag = one_line_error(capsys, attention_maps.main, ["--arch", "resnet50", *common])
    assert "--arch resnet50 is a convnet: it has no self-attention to draw" in by_flag
    assert "python -m dino_fast.eval.knn" in by_flag
    path = dino_fast_run[0]
    by_checkpoint = one_line_error(capsys, attention_maps.main, ["--pretrained_weights", str(path), *common])
    assert f"{path} holds a resnet18, a convnet" in by_checkpoint
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="ResNet given is not a ViT"):
        attention_maps.render_attention(build_backbone("resnet18"), photo, image_size=(32, 32))


def test_end_of_training_knn_hook_evaluates_a_resnet_teacher(dino_fast_run, data_root):
    _, trainer = dino_fast_run
    result = TrainResult(
        trainer=trainer,
        output_dir=data_root,
        checkpoint=None,
        iteration=0,
        last_loss=None,
        stopped_early=False,
        seconds=0.0,
        images_per_s=None,
        dataset_size=4,
        data_root=data_root / "train",
    )
    knn_evaluation(result, k=1)
    (line,) = result.extra.values()
    assert line.startswith("teacher ") and "% vs random init " in line
