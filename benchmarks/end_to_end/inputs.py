"""What the timed steps eat: one synthetic multi-crop batch on the device, reused, or dino_fast's
own data pipeline over an image folder; and the official loader's list of crops cut from either."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dino_fast.train import TrainConfig


@dataclass(frozen=True)
class Crops:
    """A multi-crop batch, crop-major as dino_fast's MultiCropBatch (the fields Trainer.step reads)."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor | None


def synthetic_batch(args: argparse.Namespace, device: torch.device) -> Crops:
    """Normalized-image-like fp32 crops (what the official loader delivers), made once and reused."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    b, g, s = args.batch_size_per_gpu, args.global_crops_size, args.local_crops_size
    global_crops = torch.randn(2 * b, 3, g, g, generator=gen)
    local_crops = (
        torch.randn(args.local_crops_number * b, 3, s, s, generator=gen) if args.local_crops_number else None
    )
    return Crops(global_crops.to(device), None if local_crops is None else local_crops.to(device))


def crop_list(batch: Any, batch_size: int) -> list[torch.Tensor]:
    """The official loader's ``images`` list: one ``(B, 3, S, S)`` view per crop, no copies."""
    views = list(batch.global_crops.split(batch_size))
    if batch.local_crops is not None:
        views += list(batch.local_crops.split(batch_size))
    return views


def loader_batches(
    config: TrainConfig, kind: str, device: torch.device, data_path: str, num_workers: int
) -> Iterator[Any]:
    """dino_fast's ``kind`` multi-crop pipeline over ``data_path`` as training builds it, epoch
    after epoch (crops in the compute dtype of dino_fast's default precision)."""
    from dino_fast.distributed import DistInfo
    from dino_fast.train import build_loader

    config = dataclasses.replace(config, data=kind, data_path=data_path, num_workers=num_workers)
    config.validate()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    loader = build_loader(config, info, Path(data_path))
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        produced = 0
        for batch in loader:
            produced += 1
            yield batch
        if produced == 0:
            raise RuntimeError(
                f"{data_path} yields no full batch of {config.batch_size_per_gpu} images; "
                "use a larger folder or a smaller --batch_size_per_gpu"
            )
