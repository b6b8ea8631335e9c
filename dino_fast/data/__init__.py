"""Multi-crop data for DINO: one loader API over three pipelines.

    loader = dino_fast.data.make_loader("dali", "/data/imagenet/train", batch_size=128,
                                        local_crops_number=10, rank=rank, world_size=world)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # MultiCropBatch
            batch.global_crops         # (2B, 3, 224, 224), crop-major, on the device, bf16
            batch.local_crops          # (LB, 3, 96, 96), or None when local_crops_number == 0

Pipelines (``kind``):
- ``"dali"``: NVIDIA DALI decodes on the GPU and augments every view there (``dali.py``); on a
  CPU device it runs DALI's CPU operators.
- ``"torchvision"``: the official DINO augmentation with PIL in DataLoader workers, the
  reference (``torchvision_pipeline.py``).
- ``"synthetic"``: noise generated on the device, for benchmarks (``synthetic.py``; ``root``
  may be None).
Every number of the augmentation lives in ``MultiCropAugmentation`` (``augment.py``); folder
discovery, validation and the bad-input policy in ``folders.py``; the Fashion-MNIST demo
dataset in ``demo.py``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dino_fast.data.augment import MultiCropAugmentation, ViewSpec
from dino_fast.data.batch import MultiCropBatch, MultiCropLoader, epoch_indices
from dino_fast.data.folders import (
    CheckedImages,
    EvalImageDataset,
    ImageFolderIndex,
    UnusableImageError,
    check_images,
    eval_transform,
    scan_image_folder,
)

KINDS = ("dali", "torchvision", "synthetic")

__all__ = [
    "KINDS",
    "CheckedImages",
    "EvalImageDataset",
    "ImageFolderIndex",
    "MultiCropAugmentation",
    "MultiCropBatch",
    "MultiCropLoader",
    "UnusableImageError",
    "ViewSpec",
    "check_images",
    "epoch_indices",
    "eval_transform",
    "make_loader",
    "scan_image_folder",
]


def make_loader(
    kind: str,
    root: str | os.PathLike[str] | None,
    *,
    batch_size: int,
    local_crops_number: int,
    augment: MultiCropAugmentation | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    num_workers: int | None = None,
    seed: int = 0,
    **options: Any,
) -> MultiCropLoader:
    """A multi-crop loader yielding ``MultiCropBatch`` (see the module docstring).

    ``batch_size`` is per rank. ``local_crops_number`` overrides ``augment.local_crops_number``
    (``augment`` defaults to the official DINO numbers); with 0, batches carry
    ``local_crops=None``. ``num_workers``: DataLoader worker processes for "torchvision", DALI
    CPU threads for "dali" (default: a per-pipeline share of the cores), unused by "synthetic".
    ``options`` go to the pipeline's class: ``check`` ("header" | "full") for folders,
    ``prefetch_queue_depth`` / ``hw_decoder_load`` for DALI, ``prefetch_factor`` for
    torchvision, ``dataset_size`` for synthetic.
    """
    from dino_fast.data.batch import check_loader_args

    if kind not in KINDS:
        raise ValueError(f"unknown data pipeline {kind!r}: choose one of {', '.join(KINDS)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} was requested but torch sees no CUDA device; pass device='cpu'")
    check_loader_args(batch_size, local_crops_number, rank, world_size, dtype)
    augment = (augment or MultiCropAugmentation()).replace(local_crops_number=local_crops_number)
    common = dict(
        batch_size=batch_size,
        augment=augment,
        rank=rank,
        world_size=world_size,
        device=device,
        dtype=dtype,
        seed=seed,
    )
    if kind == "synthetic":
        from dino_fast.data.synthetic import SyntheticMultiCropLoader

        return SyntheticMultiCropLoader(**common, **options)
    if root is None:
        raise ValueError(f"the {kind!r} pipeline reads images: pass root= an image folder")
    if kind == "dali":
        from dino_fast.data.dali import DALIMultiCropLoader

        return DALIMultiCropLoader(root, num_threads=num_workers, **common, **options)
    from dino_fast.data.torchvision_pipeline import TorchvisionMultiCropLoader

    return TorchvisionMultiCropLoader(root, num_workers=num_workers, **common, **options)
