"""The training data of a run: where it is, its augmentation, its loader, and resuming mid-epoch."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dino_fast import distributed
from dino_fast.data import MultiCropAugmentation, make_loader
from dino_fast.data.demo import prepare_fashion_mnist
from dino_fast.train.config import TrainConfig
from dino_fast.train.precision import DATA_DTYPES

logger = logging.getLogger(__name__)


def resolve_data_path(config: TrainConfig) -> Path | None:
    """The ImageFolder to train on; the demo prepares Fashion-MNIST on first use."""
    if config.data == "synthetic":
        return None
    if config.preset == "demo" and not config.data_path:
        return Path(prepare_fashion_mnist(max_per_class=config.demo_max_per_class or None)) / "train"
    return Path(config.data_path)


def build_augmentation(config: TrainConfig) -> MultiCropAugmentation:
    """The ``MultiCropAugmentation`` a run with ``config`` trains on."""
    return MultiCropAugmentation(
        global_crop_size=config.global_crops_size,
        local_crop_size=config.local_crops_size,
        global_crops_scale=tuple(config.global_crops_scale),
        local_crops_scale=tuple(config.local_crops_scale),
        local_crops_number=config.local_crops_number,
        blur_sigma=tuple(config.blur_sigma),
    )


def build_loader(config: TrainConfig, info: distributed.DistInfo, data_root: Path | None) -> Any:
    """This rank's multi-crop loader (``config.data`` already resolved from ``auto``)."""
    augment = build_augmentation(config)
    kwargs: dict[str, Any] = {}
    if config.data == "synthetic":
        kwargs["dataset_size"] = config.synthetic_size
    return make_loader(
        config.data,
        None if data_root is None else str(data_root),
        batch_size=config.batch_size_per_gpu,
        local_crops_number=config.local_crops_number,
        augment=augment,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        dtype=DATA_DTYPES[config.resolved_precision()],
        num_workers=config.num_workers,
        seed=config.seed,
        **kwargs,
    )


def iterate_epoch(loader: Any, epoch: int, start_batch: int) -> Iterator[Any]:
    """The batches of ``epoch`` from index ``start_batch`` on (resuming mid-epoch)."""
    loader.set_epoch(epoch)
    if start_batch == 0:
        yield from loader
        return
    if hasattr(loader, "iter_from"):
        yield from loader.iter_from(start_batch)
        return
    # The loader cannot seek: produce and drop the batches already trained on (same order, same RNG).
    logger.warning("data loader cannot seek; skipping %d batches to reach the resume position", start_batch)
    for index, batch in enumerate(loader):
        if index >= start_batch:
            yield batch
