"""Weighted k-NN evaluation of frozen features, as in the DINO paper (Wu et al. 2018 voting).

Semantics follow the official ``eval_knn.py``:

- features are the backbone's output (a ViT's CLS token, a convnet's global-average-pooled
  features: fc = identity, 2048-d for ResNet-50), L2-normalized, so a dot product is the cosine
  similarity;
- each test sample takes its k most similar training samples; neighbour j votes for its
  label with weight ``exp(sim_j / T)`` (T = 0.07);
- the class with the largest summed weight is the top-1 prediction, the five largest are
  the top-5 (a class with no vote can never be in the top-5: with k < 5 the official code
  looks only at the first k ranked classes, and so does this one).

Deterministic tie-breaking where the official code leaves it to the sort: classes with equal
vote mass are ranked by class index (lower first). Ties between *similarities* at the k-th
neighbour are broken by ``torch.topk``, exactly like the official code.

Command line (same flags as the official script; ``torchrun`` for several GPUs)::

    python -m dino_fast.eval.knn --pretrained_weights out/checkpoint.pth --checkpoint_key teacher \
        --arch vit_small --patch_size 16 --data_path /path/to/imagenet --nb_knn 10 20 100 200
    python -m dino_fast.eval.knn --pretrained_weights dino_resnet50_pretrain.pth --data_path /path/to/imagenet
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dino_fast import distributed
from dino_fast.errors import run_command
from dino_fast.eval.cache import FeatureCache, cache_key
from dino_fast.eval.dumps import dump_features, load_dumped_features
from dino_fast.eval.features import FeatureSet, FeatureSpec
from dino_fast.eval.splits import extract_split, scan_split, split_dirs
from dino_fast.eval.weights import add_model_arguments, build_model_from_args
from dino_fast.flags import bool_flag

logger = logging.getLogger(__name__)

DEFAULT_NB_KNN = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def _check_knn_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    temperature: float,
) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            "k-NN expects 2-D feature matrices (num_samples, dim); got train "
            f"{tuple(train_features.shape)} and test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features have dim {train_features.shape[1]} but test features have dim "
            f"{test_features.shape[1]}: they must come from the same backbone and feature type"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels must have shape ({train_features.shape[0]},) to match the train features, "
            f"got {tuple(train_labels.shape)}"
        )
    if train_labels.dtype.is_floating_point or train_labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {train_labels.dtype}")
    if train_features.device != test_features.device or train_labels.device != train_features.device:
        raise ValueError(
            "train features, train labels and test features must be on one device, got "
            f"{train_features.device}, {train_labels.device} and {test_features.device}"
        )
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(
            f"k={k} must be between 1 and the number of training samples ({train_features.shape[0]})"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


@torch.no_grad()
def knn_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Summed vote weight per class, ``(num_test, num_classes)``, for already-normalized features.

    Neighbour j of a test sample contributes ``exp(sim_j / temperature)`` to its label's column.
    The whole test matrix is processed at once: chunk it (as :func:`knn_classifier` does) when
    ``num_test * num_train`` similarities would not fit in memory.
    """
    _check_knn_inputs(train_features, train_labels, test_features, k, temperature)
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    similarity = test_features @ train_features.t()
    top_sim, top_idx = similarity.topk(k, dim=1, largest=True, sorted=True)
    neighbour_labels = train_labels[top_idx]
    weights = top_sim.div(temperature).exp()
    votes = torch.zeros(test_features.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    # scatter_add over the label axis: equivalent to the official one-hot matmul, without
    # materializing the (B * k, num_classes) one-hot matrix.
    return votes.scatter_add_(1, neighbour_labels, weights)


@torch.no_grad()
def knn_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 512,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (in percent) of the weighted k-NN classifier.

    Features must already be L2-normalized (see :func:`normalize`); labels are class indices.
    ``num_classes`` defaults to one more than the largest label seen in either split.
    The test set is processed ``chunk_size`` rows at a time so memory stays
    ``O(chunk_size * num_train)``.
    """
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(
            f"test_labels must have shape ({test_features.shape[0]},) to match the test features, "
            f"got {tuple(test_labels.shape)}"
        )
    if test_features.shape[0] == 0:
        raise ValueError("the test set is empty: there is nothing to classify")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    _check_knn_inputs(train_features, train_labels, test_features, k, temperature)
    test_labels = test_labels.to(train_labels.device)
    if num_classes is None:
        num_classes = int(torch.maximum(train_labels.max(), test_labels.max())) + 1
    # A class without a vote is never a prediction, so rank at most k classes (official:
    # min(5, k)), and never more classes than exist.
    top = min(5, k, num_classes)
    correct1 = torch.zeros((), dtype=torch.long, device=train_features.device)
    correct5 = torch.zeros((), dtype=torch.long, device=train_features.device)
    for start in range(0, test_features.shape[0], chunk_size):
        votes = knn_votes(
            train_features,
            train_labels,
            test_features[start : start + chunk_size],
            k,
            temperature,
            num_classes,
        )
        # stable descending sort: equal vote mass is ranked by class index, deterministically.
        ranked = votes.sort(dim=1, descending=True, stable=True).indices[:, :top]
        hits = ranked == test_labels[start : start + chunk_size, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
    total = test_features.shape[0]
    return float(correct1) * 100.0 / total, float(correct5) * 100.0 / total


def normalize(features: torch.Tensor) -> torch.Tensor:
    """L2-normalize rows (what the official script does before the k-NN)."""
    return F.normalize(features, dim=1, p=2)


@dataclass(frozen=True)
class KNNResult:
    """Accuracies in percent per k: ``top1[k]``, ``top5[k]``."""

    top1: dict[int, float]
    top5: dict[int, float]
    num_train: int
    num_test: int

    def summary(self) -> str:
        return "\n".join(
            f"{k}-NN classifier result: Top1: {self.top1[k]:.2f}, Top5: {self.top5[k]:.2f}" for k in self.top1
        )


def knn_from_features(
    train: FeatureSet,
    test: FeatureSet,
    *,
    nb_knn: Sequence[int] = DEFAULT_NB_KNN,
    temperature: float = DEFAULT_TEMPERATURE,
    device: torch.device | str | None = None,
) -> KNNResult:
    """Run the weighted k-NN for every k on extracted (not yet normalized) features."""
    device = torch.device(device) if device is not None else train.features.device
    train_f = normalize(train.features.to(device, torch.float32))
    test_f = normalize(test.features.to(device, torch.float32))
    train_l = train.labels.to(device)
    test_l = test.labels.to(device)
    num_classes = max(
        len(train.classes), len(test.classes), int(torch.maximum(train_l.max(), test_l.max())) + 1
    )
    top1: dict[int, float] = {}
    top5: dict[int, float] = {}
    for k in nb_knn:
        # A split smaller than k cannot give k neighbours; official would crash in topk.
        if k > train_f.shape[0]:
            raise ValueError(
                f"--nb_knn {k} is larger than the training set ({train_f.shape[0]} images): "
                "pass smaller values of k"
            )
        top1[k], top5[k] = knn_classifier(train_f, train_l, test_f, test_l, k, temperature, num_classes)
    return KNNResult(top1=top1, top5=top5, num_train=train_f.shape[0], num_test=test_f.shape[0])


def evaluate_knn(
    backbone: nn.Module,
    train_root: str | os.PathLike[str],
    test_root: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    nb_knn: Sequence[int] = DEFAULT_NB_KNN,
    temperature: float = DEFAULT_TEMPERATURE,
    image_size: int = 224,
    resize_size: int | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> KNNResult:
    """Extract the features of ``backbone`` on two ImageFolders and run the weighted k-NN.

    Runs under ``torch.distributed`` when a process group is initialized (each rank extracts
    its shard; every rank gets the result). ``image_size``/``resize_size`` set the eval
    transform (resize to ``resize_size``, default ``image_size * 256 / 224``, then center crop).
    With ``cache_dir`` the features are stored there, keyed by the weights, the
    data and the transform, and reused on the next call with the same inputs.
    """
    spec = FeatureSpec(image_size=image_size, resize_size=resize_size)
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    train = extract_split(
        backbone, train_root, spec, device=device, batch_size=batch_size, num_workers=num_workers, cache=cache
    )
    test = extract_split(
        backbone, test_root, spec, device=device, batch_size=batch_size, num_workers=num_workers, cache=cache
    )
    if train.classes != test.classes:
        raise ValueError(
            f"train ({train_root}) and test ({test_root}) have different class folders: "
            f"{list(train.classes)} vs {list(test.classes)}; k-NN needs the same classes in both"
        )
    return knn_from_features(train, test, nb_knn=nb_knn, temperature=temperature, device=device)


def knn_accuracy(
    backbone: nn.Module,
    train_root: str | os.PathLike[str],
    test_root: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    nb_knn: Sequence[int] = DEFAULT_NB_KNN,
    temperature: float = DEFAULT_TEMPERATURE,
    image_size: int = 224,
    resize_size: int | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[int, float]:
    """Weighted k-NN top-1 accuracy (percent) per k of ``backbone``'s features.

    The one-call version of :func:`evaluate_knn` for training scripts and tests, e.g.::

        acc = knn_accuracy(teacher_backbone, root / "train", root / "test", device="cuda", nb_knn=(20,))
        acc[20]  # top-1 in percent
    """
    result = evaluate_knn(
        backbone,
        train_root,
        test_root,
        device=device,
        nb_knn=nb_knn,
        temperature=temperature,
        image_size=image_size,
        resize_size=resize_size,
        batch_size=batch_size,
        num_workers=num_workers,
        cache_dir=cache_dir,
    )
    return result.top1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m dino_fast.eval.knn", description="Weighted k-NN evaluation of a DINO backbone."
    )
    add_model_arguments(parser)
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Per-process batch size.")
    parser.add_argument("--nb_knn", default=list(DEFAULT_NB_KNN), nargs="+", type=int, help="Values of k.")
    parser.add_argument("--temperature", default=DEFAULT_TEMPERATURE, type=float, help="Voting temperature.")
    parser.add_argument(
        "--data_path", type=Path, default=None, help="Folder with train/ and val/ (or test/) ImageFolders."
    )
    parser.add_argument("--image_size", default=224, type=int, help="Center-crop size of the eval transform.")
    parser.add_argument(
        "--resize_size", default=None, type=int, help="Resize before the crop (default image_size * 256/224)."
    )
    parser.add_argument(
        "--dump_features",
        type=Path,
        default=None,
        help="Save the features here (official trainfeat.pth, testfeat.pth, trainlabels.pth, testlabels.pth, "
        "plus meta.json with their cache keys).",
    )
    parser.add_argument(
        "--load_features",
        type=Path,
        default=None,
        help="Use features saved by --dump_features instead of extracting; checked against the weights and "
        "data when those are given.",
    )
    parser.add_argument(
        "--cache_dir", type=Path, default=None, help="Keyed feature cache: reused only for identical inputs."
    )
    parser.add_argument("--num_workers", default=4, type=int, help="Data loading workers per process.")
    parser.add_argument(
        "--use_cuda",
        default=True,
        type=bool_flag,
        help="Run the k-NN on the GPU when there is one (false: keep features on CPU to save memory).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> KNNResult:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with distributed.distributed_context() as device:
        spec = FeatureSpec(image_size=args.image_size, resize_size=args.resize_size)
        if args.data_path is None and args.load_features is None:
            raise SystemExit(
                "give --data_path (to extract features) or --load_features (to reuse saved ones)"
            )
        model = None
        if args.data_path is not None:
            model = build_model_from_args(args, device)
        if args.load_features is not None:
            expected = None
            if model is not None:
                train_dir, test_dir = split_dirs(args.data_path)
                expected = (
                    cache_key(model, scan_split(train_dir), spec),
                    cache_key(model, scan_split(test_dir), spec),
                )
            train, test = load_dumped_features(args.load_features, expected_keys=expected)
        else:
            assert model is not None
            train_dir, test_dir = split_dirs(args.data_path)
            cache = FeatureCache(args.cache_dir) if args.cache_dir is not None else None
            common = dict(
                device=device,
                batch_size=args.batch_size_per_gpu,
                num_workers=args.num_workers,
                compute_key=args.dump_features is not None,
            )
            train = extract_split(model, train_dir, spec, cache=cache, **common)
            test = extract_split(model, test_dir, spec, cache=cache, **common)
            if args.dump_features is not None and distributed.is_main_process():
                dump_features(args.dump_features, train, test)
        knn_device = device if (args.use_cuda and device.type == "cuda") else torch.device("cpu")
        result = knn_from_features(
            train, test, nb_knn=args.nb_knn, temperature=args.temperature, device=knn_device
        )
        if distributed.is_main_process():
            logger.info("k-NN on %d train / %d test images", result.num_train, result.num_test)
            print(result.summary(), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(run_command(main))
