"""Weighted k-NN (dino_fast.eval.knn) against a brute-force float64 reference."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from dino_fast.eval import knn
from dino_fast.eval.dumps import StaleFeaturesError
from dino_fast.eval.features import FeatureSet
from dino_fast.eval.weights import build_backbone


def brute_force_votes(train_f, train_l, test_f, k, temperature, num_classes):
    """Per test sample: sort all similarities, take the k largest, add exp(sim / T) to each label."""
    votes = torch.zeros(test_f.shape[0], num_classes, dtype=torch.float64)
    for i in range(test_f.shape[0]):
        sims = [float(test_f[i].double() @ train_f[j].double()) for j in range(train_f.shape[0])]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        for j in order:
            votes[i, int(train_l[j])] += math.exp(sims[j] / temperature)
    return votes


def brute_force_accuracy(votes, test_l, k):
    top = min(5, k, votes.shape[1])
    top1 = top5 = 0
    for i in range(votes.shape[0]):
        # rank classes by vote mass, equal mass by class index (the documented tie rule)
        ranked = sorted(range(votes.shape[1]), key=lambda c: (-float(votes[i, c]), c))[:top]
        top1 += ranked[0] == int(test_l[i])
        top5 += int(test_l[i]) in ranked
    n = votes.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n


def random_problem(num_train, num_test, dim, num_classes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # class-dependent means so that the k-NN is right often but not always
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    train_l = torch.randint(0, num_classes, (num_train,), generator=g)
    test_l = torch.randint(0, num_classes, (num_test,), generator=g)
    train_f = means[train_l] + 1.5 * torch.randn(num_train, dim, generator=g, dtype=torch.float64)
    test_f = means[test_l] + 1.5 * torch.randn(num_test, dim, generator=g, dtype=torch.float64)
    train_f = knn.normalize(train_f).to(dtype)
    test_f = knn.normalize(test_f).to(dtype)
    return train_f, train_l, test_f, test_l


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("num_train", "num_test", "dim", "num_classes", "k"),
    [
        (50, 17, 8, 3, 10),  # typical: k larger than the class count
        (50, 17, 8, 3, 1),  # k = 1: nearest neighbour, top-5 collapses to top-1
        (40, 9, 5, 7, 40),  # k = every training sample
        (37, 23, 3, 12, 4),  # more classes than neighbours: at most k classes can get votes
        (64, 5, 33, 1, 20),  # one class: everything is right
    ],
)
def test_votes_and_accuracy_match_brute_force(num_train, num_test, dim, num_classes, k, dtype):
    train_f, train_l, test_f, test_l = random_problem(num_train, num_test, dim, num_classes, dtype)
    expected_votes = brute_force_votes(train_f, train_l, test_f, k, 0.07, num_classes)
    votes = knn.knn_votes(train_f, train_l, test_f, k, 0.07, num_classes)
    assert votes.dtype == dtype
    # exp(1/0.07) ~ 1.6e6: compare relative to the row's total mass
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(votes.double(), expected_votes, rtol=rtol, atol=0.0)

    expected_acc = brute_force_accuracy(expected_votes, test_l, k)
    # chunk_size 4 leaves a partial last chunk for every num_test here
    acc = knn.knn_classifier(train_f, train_l, test_f, test_l, k, 0.07, num_classes, chunk_size=4)
    assert acc == pytest.approx(expected_acc)


def test_temperature_weights_the_votes():
    # one very close neighbour of class 0 against two farther ones of class 1
    train_f = knn.normalize(torch.tensor([[1.0, 0.05], [0.5, 1.0], [0.5, -1.0]], dtype=torch.float64))
    train_l = torch.tensor([0, 1, 1])
    test_f = knn.normalize(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    # sharp weights (T = 0.07): the close neighbour outweighs the two far ones
    assert knn.knn_classifier(train_f, train_l, test_f, torch.tensor([0]), 3, 0.07)[0] == 100.0
    # flat weights (T large): it becomes a plain majority vote
    assert knn.knn_classifier(train_f, train_l, test_f, torch.tensor([1]), 3, 1e4)[0] == 100.0


def test_equal_votes_rank_the_lower_class_first():
    # two identical training points of classes 3 and 1: exactly equal vote mass
    train_f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    train_l = torch.tensor([3, 1, 0])
    test_f = torch.tensor([[1.0, 0.0]])
    assert knn.knn_classifier(train_f, train_l, test_f, torch.tensor([1]), 2)[0] == 100.0
    top1, top5 = knn.knn_classifier(train_f, train_l, test_f, torch.tensor([3]), 2)
    assert (top1, top5) == (0.0, 100.0)


def test_tied_similarities_at_the_kth_neighbour_with_one_label():
    # five duplicates of class 2 tie at the boundary for k = 3; whichever topk keeps, votes agree
    train_f = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 3)
    train_l = torch.tensor([2] * 5 + [0] * 3)
    votes = knn.knn_votes(train_f, train_l, torch.tensor([[1.0, 0.0]]), 3, 0.07, 3)
    torch.testing.assert_close(votes, torch.tensor([[0.0, 0.0, 3 * math.exp(1 / 0.07)]]))


def test_classes_without_votes_are_not_in_the_top5():
    # k = 2 with 10 classes: only two classes get votes; the test label (9) has none
    train_f = knn.normalize(torch.randn(30, 4, generator=torch.Generator().manual_seed(1)))
    train_l = torch.arange(30) % 9  # class 9 never appears in train
    top1, top5 = knn.knn_classifier(train_f, train_l, train_f[:5], torch.full((5,), 9), 2, num_classes=10)
    assert (top1, top5) == (0.0, 0.0)


def test_knn_from_features_normalizes_and_reports_every_k():
    train_f, train_l, test_f, test_l = random_problem(60, 20, 6, 4, torch.float32, seed=3)
    # un-normalized inputs: knn_from_features must normalize them first
    scale = torch.rand(60, 1) * 10 + 0.1
    train = FeatureSet(train_f * scale, train_l, tuple("abcd"))
    test = FeatureSet(test_f * 3.0, test_l, tuple("abcd"))
    result = knn.knn_from_features(train, test, nb_knn=(1, 7, 60))
    for k in (1, 7, 60):
        expected = knn.knn_classifier(train_f, train_l, test_f, test_l, k, 0.07, 4)
        assert (result.top1[k], result.top5[k]) == pytest.approx(expected)
    assert "7-NN classifier result" in result.summary()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(k=0), "between 1 and"),
        (dict(k=11), "between 1 and"),  # more neighbours than training samples
        (dict(temperature=0.0), "temperature"),
        (dict(test_f=torch.randn(3, 5)), "dim"),
        (dict(train_l=torch.zeros(9, dtype=torch.long)), "train_labels must have shape"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = dict(
        train_f=torch.randn(10, 4), train_l=torch.zeros(10, dtype=torch.long), test_f=torch.randn(3, 4), k=2
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        knn.knn_votes(
            args["train_f"], args["train_l"], args["test_f"], args["k"], kwargs.get("temperature", 0.07)
        )


def test_float_labels_raise():
    with pytest.raises(TypeError, match="integer"):
        knn.knn_votes(torch.randn(4, 2), torch.zeros(4), torch.randn(1, 2), 1)


# ---------------------------------------------------------------------------------------------
# the command line, end to end on real photos
# ---------------------------------------------------------------------------------------------


def _write_weights(path, seed):
    torch.manual_seed(seed)
    vit = build_backbone("vit_tiny", 16)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, path)
    return vit


def test_cli_dump_load_and_stale_features(tmp_path):
    from tests.helpers.photos import make_image_folder

    data = tmp_path / "data"
    make_image_folder(data / "train", per_class=3)
    make_image_folder(data / "test", per_class=1)  # test/ accepted in place of val/
    _write_weights(tmp_path / "a.pth", seed=0)
    _write_weights(tmp_path / "b.pth", seed=1)
    common = ["--arch", "vit_tiny", "--patch_size", "16", "--image_size", "32", "--num_workers", "0"]
    common += ["--data_path", str(data), "--nb_knn", "1", "6", "--batch_size_per_gpu", "4"]
    dump = tmp_path / "dump"
    first = knn.main([*common, "--pretrained_weights", str(tmp_path / "a.pth"), "--dump_features", str(dump)])
    assert (first.num_train, first.num_test) == (6, 2)
    assert set(first.top1) == {1, 6} and all(0.0 <= v <= 100.0 for v in first.top1.values())

    # same weights and data: the dump is accepted and gives the same numbers
    again = knn.main([*common, "--pretrained_weights", str(tmp_path / "a.pth"), "--load_features", str(dump)])
    assert again.top1 == first.top1 and again.top5 == first.top5
    # other weights: refused instead of silently reporting the old features' accuracy
    with pytest.raises(StaleFeaturesError, match="other weights"):
        knn.main([*common, "--pretrained_weights", str(tmp_path / "b.pth"), "--load_features", str(dump)])
    # only the dump (no data, no weights): used as it is, like the official script
    only = knn.main(["--load_features", str(dump), "--nb_knn", "1", "6"])
    assert only.top1 == first.top1

    with pytest.raises(ValueError, match="larger than the training set"):
        knn.main([*common, "--pretrained_weights", str(tmp_path / "a.pth"), "--nb_knn", "7"])


def test_cli_missing_eval_split(tmp_path):
    from tests.helpers.photos import make_image_folder

    make_image_folder(tmp_path / "data" / "train", per_class=1)
    with pytest.raises(FileNotFoundError, match=r"neither val/ nor test/"):
        knn.main(["--data_path", str(tmp_path / "data"), "--arch", "vit_tiny"])
    with pytest.raises(FileNotFoundError, match="must hold a train/"):
        knn.main(["--data_path", str(tmp_path / "nowhere"), "--arch", "vit_tiny"])


def test_knn_accuracy_api_separates_two_kinds_of_photos(tmp_path):
    # Two visually distinct groups of real photos: even a random ViT's CLS features cluster
    # them a little; the API must run end to end and return one top-1 per k, in percent.
    from tests.helpers.photos import make_image_folder

    root = make_image_folder(tmp_path / "train", per_class=3)
    vit = _write_weights(tmp_path / "w.pth", seed=0)
    acc = knn.knn_accuracy(vit, root, root, nb_knn=(1, 3), image_size=32, batch_size=4)
    assert set(acc) == {1, 3}
    assert acc[1] == 100.0  # train == test: each image's nearest neighbour is itself


def test_cli_skips_a_truncated_image_and_counts_it(tmp_path, caplog):
    from tests.helpers.photos import make_image_folder

    data = tmp_path / "data"
    make_image_folder(data / "train", per_class=3)
    make_image_folder(data / "val", per_class=1)
    broken = data / "train" / "class_0" / "truncated_download.jpg"
    whole = next((data / "train" / "class_0").iterdir()).read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])
    _write_weights(tmp_path / "a.pth", seed=0)
    with caplog.at_level(logging.WARNING):
        weights = ["--pretrained_weights", str(tmp_path / "a.pth")]
        result = knn.main(
            [*weights, "--image_size", "32", "--num_workers", "0", "--data_path", str(data), "--nb_knn", "1"]
        )
    assert (result.num_train, result.num_test) == (6, 2)
    assert "1 of 7 files are not usable images and are skipped" in caplog.text
    assert "truncated_download.jpg" in caplog.text
