"""Linear probe: official recipe pieces, learning on a separable problem, resume, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from dino_fast.eval import linear
from dino_fast.eval.features import FeatureSet, intermediate_features
from dino_fast.eval.splits import scan_split, train_dataset
from dino_fast.eval.weights import CheckpointError, build_backbone


def separable(num_classes: int, per_class: int, dim: int, seed: int) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = means[labels] + torch.randn(len(labels), dim, generator=g)
    return FeatureSet(x, labels, tuple(str(c) for c in range(num_classes)))


def test_official_defaults():
    cfg = linear.LinearProbeConfig()
    assert (cfg.epochs, cfg.lr, cfg.batch_size_per_gpu, cfg.momentum, cfg.weight_decay) == (
        100,
        0.001,
        128,
        0.9,
        0,
    )
    assert (cfg.n_last_blocks, cfg.avgpool_patchtokens) == (4, False)  # ViT-S/16 setting
    assert cfg.scaled_lr() == pytest.approx(0.001 * 128 / 256)
    clf = linear.LinearClassifier(64, 10)
    assert torch.all(clf.linear.bias == 0) and 0.005 < float(clf.linear.weight.detach().std()) < 0.015


@pytest.mark.parametrize(
    ("num_classes", "dim"),
    [
        (3, 16),  # fewer than 5 classes: no top-5, as in the official script
        (7, 33),  # odd sizes; top-5 reported
    ],
)
def test_probe_learns_a_separable_problem(num_classes, dim, tmp_path):
    train = separable(num_classes, 40, dim, seed=0)
    val = separable(num_classes, 15, dim, seed=1)
    cfg = linear.LinearProbeConfig(epochs=15, lr=0.5, batch_size_per_gpu=32)
    untrained = linear.LinearClassifier(dim, num_classes)
    chance_top1, _, _ = linear.evaluate_classifier(untrained, val.features, val.labels)
    result = linear.train_linear_on_features(train, val, cfg, output_dir=tmp_path)
    assert result.top1 == 100.0 and result.best_top1 == 100.0
    assert chance_top1 < 70.0  # the untrained layer does not already solve it
    assert (result.top5 is None) == (num_classes < 5)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.25 * losses[0]
    # the official per-epoch cosine schedule ends at 0; log.txt holds one JSON line per epoch
    state = torch.load(tmp_path / linear.CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 15 and state["scheduler"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 15


def test_resume_continues_exactly(tmp_path, monkeypatch):
    train = separable(4, 20, 8, seed=2)
    val = separable(4, 5, 8, seed=3)
    cfg = linear.LinearProbeConfig(epochs=4, lr=0.2, batch_size_per_gpu=16)
    straight = linear.train_linear_on_features(train, val, cfg, output_dir=tmp_path / "a")

    real_eval = linear.evaluate_classifier
    calls = {"n": 0}

    def crash_on_third_validation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during epoch 2, after epochs 0 and 1 were saved
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(linear, "evaluate_classifier", crash_on_third_validation)
    with pytest.raises(KeyboardInterrupt):
        linear.train_linear_on_features(train, val, cfg, output_dir=tmp_path / "b")
    monkeypatch.setattr(linear, "evaluate_classifier", real_eval)
    resumed = linear.train_linear_on_features(train, val, cfg, output_dir=tmp_path / "b")
    assert [h["epoch"] for h in resumed.history] == [2.0, 3.0]
    for k, v in straight.classifier.state_dict().items():
        assert torch.equal(resumed.classifier.state_dict()[k], v), k


class FakeViT(torch.nn.Module):
    """get_intermediate_layers with recognisable tokens: block i's token j is i * 100 + j."""

    embed_dim = 3

    def get_intermediate_layers(self, x, n):
        tokens = torch.arange(5, dtype=torch.float32)[None, :, None].expand(x.shape[0], 5, 3)
        return [tokens + 100 * i for i in range(n)]


def test_intermediate_features_layout():
    x = torch.zeros(2, 3, 8, 8)
    fake = FakeViT()
    # n = 4: the four CLS tokens (token 0 of each block), earliest block first
    out = intermediate_features(fake, x, 4, avgpool=False)
    assert out[0].tolist() == [0, 0, 0, 100, 100, 100, 200, 200, 200, 300, 300, 300]
    # n = 1 + avgpool: official interleaving [cls_0, avg_0, cls_1, avg_1, ...]; mean of tokens 1..4 = 2.5
    out = intermediate_features(fake, x, 1, avgpool=True)
    assert out[0].tolist() == [0, 2.5, 0, 2.5, 0, 2.5]
    layers = fake.get_intermediate_layers(x, 1)
    official = torch.cat((layers[0][:, 0].unsqueeze(-1), layers[-1][:, 1:].mean(1).unsqueeze(-1)), dim=-1)
    torch.testing.assert_close(out, official.reshape(2, -1))
    # n = 2 + avgpool (official crashes): both CLS tokens, then the last block's mean patch token
    assert (
        intermediate_features(fake, x, 2, avgpool=True)[0].tolist() == [0, 0, 0, 100, 100, 100] + [102.5] * 3
    )


def test_augmented_image_path_runs_the_official_recipe(data_root, tmp_path):
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", 16)
    cfg = linear.LinearProbeConfig(
        epochs=2, batch_size_per_gpu=3, n_last_blocks=2, image_size=32, num_workers=0
    )
    ds = train_dataset(scan_split(data_root / "train"), cfg.feature_spec(vit))
    torch.manual_seed(1)
    a, b = ds[0][0], ds[0][0]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)  # random crops and flips, per access
    result = linear.train_linear_on_images(
        vit, data_root / "train", data_root / "val", cfg, output_dir=tmp_path
    )
    assert result.classifier.linear.in_features == 2 * vit.embed_dim
    assert 0.0 <= result.top1 <= 100.0 and result.top5 is None
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()] == [0, 1]


def test_cli_cached_features_then_evaluate(data_root, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(build_backbone("vit_tiny", 16).state_dict(), weights)
    common = ["--pretrained_weights", str(weights), "--arch", "vit_tiny", "--patch_size", "16"]
    common += [
        "--data_path",
        str(data_root),
        "--image_size",
        "32",
        "--num_workers",
        "0",
        "--n_last_blocks",
        "1",
    ]
    out = tmp_path / "probe"
    trained = linear.main(
        [
            *common,
            "--epochs",
            "3",
            "--lr",
            "0.5",
            "--cached_features",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--output_dir",
            str(out),
        ]
    )
    assert (out / "linear.pth").is_file() and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    evaluated = linear.main([*common, "--evaluate", "--linear_weights", str(out / "linear.pth")])
    assert evaluated.top1 == pytest.approx(trained.top1)


def test_linear_weights_official_prefix_and_mismatch(tmp_path):
    clf = linear.LinearClassifier(6, 4)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in clf.state_dict().items()}}, tmp_path / "official.pth"
    )
    other = linear.LinearClassifier(6, 4)
    linear.load_linear_weights(other, tmp_path / "official.pth")
    assert torch.equal(other.linear.weight, clf.linear.weight)
    with pytest.raises(CheckpointError, match="n_last_blocks"):
        linear.load_linear_weights(linear.LinearClassifier(12, 4), tmp_path / "official.pth")


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="--epochs"):
        linear.LinearProbeConfig(epochs=0)
    with pytest.raises(ValueError, match="--lr"):
        linear.LinearProbeConfig(lr=-1.0)
    train = separable(3, 4, 5, seed=0)
    with pytest.raises(ValueError, match="one dim"):
        linear.train_linear_on_features(train, separable(3, 4, 6, seed=0))
