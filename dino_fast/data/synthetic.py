"""Synthetic multi-crop batches generated on the device: the data loader that costs nothing.

For benchmarks that must measure the model, not the input pipeline (the measured anchors in
docs/design.md use "synthetic crops already on the GPU"). Each batch is standard-normal noise
(the scale of normalized images) drawn on the device from a generator seeded by (seed, epoch,
rank, step), so it is reproducible and never synchronizes with the host.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dino_fast.data.augment import MultiCropAugmentation
from dino_fast.data.batch import MultiCropBatch, MultiCropLoader, check_enough_samples, mix_seed

# ImageNet-1k's training set: the default epoch length, so len() means what it means in training.
IMAGENET_TRAIN_SIZE = 1_281_167


class SyntheticMultiCropLoader(MultiCropLoader):
    """``len()`` is ``ceil(dataset_size / world_size) // batch_size``, as for a real folder."""

    def __init__(
        self,
        *,
        batch_size: int,
        augment: MultiCropAugmentation,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        dataset_size: int = IMAGENET_TRAIN_SIZE,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            augment=augment,
            rank=rank,
            world_size=world_size,
            device=device,
            dtype=dtype,
            seed=seed,
            dataset_size=dataset_size,
        )
        check_enough_samples(dataset_size, batch_size, world_size, None)
        self._generator = torch.Generator(device=device)

    def iter_from(self, start_batch: int) -> Iterator[MultiCropBatch]:
        B, aug = self.batch_size, self.augment
        g, loc, num_local = aug.global_crop_size, aug.local_crop_size, aug.local_crops_number
        epoch = self.epoch
        for step in range(start_batch, len(self)):
            self._generator.manual_seed(mix_seed(self.seed, epoch, self.rank, step))
            global_crops = torch.randn(
                (2 * B, 3, g, g), generator=self._generator, device=self.device, dtype=self.dtype
            )
            local_crops = (
                torch.randn(
                    (num_local * B, 3, loc, loc),
                    generator=self._generator,
                    device=self.device,
                    dtype=self.dtype,
                )
                if num_local
                else None
            )
            yield MultiCropBatch(global_crops, local_crops, None)
