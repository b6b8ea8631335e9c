"""The ImageFolder splits an evaluation reads: where they are, their datasets, and
:func:`extract_split`, their features through the feature cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dino_fast import distributed
from dino_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_fast.data.folders import EvalImageDataset, ImageFolderIndex, check_images, scan_image_folder
from dino_fast.eval.cache import FeatureCache, cache_key
from dino_fast.eval.features import FeatureSet, FeatureSpec, extract_features
from dino_fast.optional import require

logger = logging.getLogger(__name__)


def split_dirs(data_path: Path) -> tuple[Path, Path]:
    """``data_path/train`` and its evaluation split, ``data_path/val`` or else ``data_path/test``."""
    train = data_path / "train"
    if not train.is_dir():
        raise FileNotFoundError(
            f"{train} does not exist: --data_path must hold a train/ folder and a val/ (or test/) folder, "
            "each with one subfolder per class"
        )
    for name in ("val", "test"):
        if (data_path / name).is_dir():
            return train, data_path / name
    raise FileNotFoundError(f"{data_path} has train/ but neither val/ nor test/: add the evaluation split")


def scan_split(root: str | os.PathLike[str]) -> ImageFolderIndex:
    """The usable images of an ImageFolder split: unreadable files (empty, truncated, not an
    image) are left out with one warning that counts and names them, as training does."""
    return check_images(scan_image_folder(root)).index


def eval_dataset(index: ImageFolderIndex, spec: FeatureSpec) -> torch.utils.data.Dataset:
    """The official evaluation transform over an indexed split: resize, center crop, normalize."""
    return EvalImageDataset(index, image_size=spec.image_size, resize_size=spec.effective_resize)


def train_dataset(index: ImageFolderIndex, spec: FeatureSpec) -> torch.utils.data.Dataset:
    """The official linear-probe training transform: RandomResizedCrop, horizontal flip, normalize."""
    transforms = require("torchvision.transforms", "the linear probe's training transform")
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(spec.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return EvalImageDataset(index, image_size=spec.image_size, transform=transform)


def _broadcast_from_main(
    tensor: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Rank 0's tensor on every rank (others pass None): shape first, then data."""
    shape = torch.zeros(2, dtype=torch.long, device=device)
    if distributed.is_main_process():
        assert tensor is not None
        shape.copy_(torch.tensor(tensor.reshape(tensor.shape[0], -1).shape))
    dist.broadcast(shape, 0)
    buf = (
        tensor.reshape(tensor.shape[0], -1).to(device, dtype)
        if distributed.is_main_process() and tensor is not None
        else torch.empty(*shape.tolist(), dtype=dtype, device=device)
    )
    dist.broadcast(buf, 0)
    return buf


def extract_split(
    model: nn.Module,
    root: str | os.PathLike[str],
    spec: FeatureSpec,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    num_workers: int = 0,
    cache: FeatureCache | None = None,
    compute_key: bool = False,
) -> FeatureSet:
    """Features of the ImageFolder at ``root`` (dataset order), reusing ``cache`` when it has them.

    The result's ``key`` (:func:`cache_key`) is computed with a cache or ``compute_key``; it
    hashes the weights and stats every image file, which is worth skipping when not needed.

    Under ``torch.distributed`` rank 0 decides whether the cache has the entry (and reads it;
    the other ranks receive it by broadcast, so the cache need not be on a shared disk) and
    writes new entries.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        index = scan_split(root)
        labels = torch.as_tensor(list(index.labels), dtype=torch.long)
        classes = tuple(index.classes)
        key = cache_key(model, index, spec) if cache is not None or compute_key else None
        cached = (
            cache.load(key)
            if cache is not None and key is not None and distributed.is_main_process()
            else None
        )
        if distributed.get_world_size() > 1 and cache is not None:
            hit = torch.tensor([cached is not None], dtype=torch.long, device=device)
            dist.broadcast(hit, 0)
            if bool(hit):
                features = _broadcast_from_main(cached.features if cached else None, device, torch.float32)
                return FeatureSet(features, labels, classes, key)
        if cached is not None:
            logger.info("features of %s loaded from the cache (%s)", root, cache.path(cached.key or ""))
            return FeatureSet(cached.features.to(device), labels, classes, key)
        dataset = eval_dataset(index, spec)
        features = extract_features(
            model,
            dataset,
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            feature_fn=spec.feature_fn(model),
        )
        result = FeatureSet(features, labels, classes, key)
        if cache is not None and distributed.is_main_process():
            logger.info("features of %s cached at %s", root, cache.save(result))
        return result
    finally:
        model.train(was_training)
