"""The reference multi-crop pipeline: the official DINO augmentation with torchvision/PIL in
DataLoader worker processes.

``DINOTransform`` is the official ``DataAugmentationDINO`` (main_dino.py) with its numbers read
from ``MultiCropAugmentation``: the same transforms, the same order (including ColorJitter's
random order of its four steps), the same random draws (torch RNG for the torchvision
transforms, Python's ``random`` for blur and solarization).

Reproducibility: each sample's randomness is seeded from ``(seed, epoch, position in the
epoch)``, so a batch does not depend on the number of workers or on which worker made it.
Decoding follows ``dino_fast.data.folders.load_rgb``; the bad-input policy is the one in the
``dino_fast.data.folders`` docstring: a file that fails to decode mid-epoch is replaced by the
next usable image and the count is logged once per epoch.

Throughput: about 30 images/s per CPU core with 2x224 + 10x96 crops (PIL does every op), so
feeding a GPU at 1,500 images/s takes ~50 cores. Use the DALI pipeline on GPUs; this one is the
reference and the CPU fallback.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from dino_fast.data.augment import MultiCropAugmentation, ViewParams
from dino_fast.data.batch import FolderMultiCropLoader, MultiCropBatch, log_skipped, mix_seed
from dino_fast.data.folders import DECODE_ERRORS, load_rgb
from dino_fast.optional import require


class GaussianBlur:
    """Official DINO utils.GaussianBlur: with probability p, PIL Gaussian blur of radius U(min, max)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if not random.random() <= self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """Official DINO utils.Solarization: with probability p, invert the pixels >= threshold."""

    def __init__(self, p: float, threshold: int = 128) -> None:
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return ImageOps.solarize(img, threshold=self.threshold)
        return img


class DINOTransform:
    """PIL image -> list of 2 + L normalized float32 ``(3, S, S)`` views (official order)."""

    def __init__(self, aug: MultiCropAugmentation) -> None:
        transforms = require("torchvision.transforms", "the torchvision data pipeline (--data torchvision)")
        self.aug = aug
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=aug.flip_p),
                transforms.RandomApply(
                    [
                        transforms.ColorJitter(
                            brightness=aug.brightness,
                            contrast=aug.contrast,
                            saturation=aug.saturation,
                            hue=aug.hue,
                        )
                    ],
                    p=aug.color_jitter_p,
                ),
                transforms.RandomGrayscale(p=aug.grayscale_p),
            ]
        )
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(aug.mean, aug.std)])
        sigma = aug.blur_sigma
        self.transforms = []
        for view in aug.views():
            steps = [
                transforms.RandomResizedCrop(
                    view.size, scale=view.scale, ratio=aug.aspect_ratio, interpolation=bicubic
                ),
                flip_and_color_jitter,
                GaussianBlur(view.blur_p, sigma[0], sigma[1]),
            ]
            if view.solarize_p > 0:
                steps.append(Solarization(view.solarize_p, aug.solarize_threshold))
            steps.append(normalize)
            self.transforms.append(transforms.Compose(steps))

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]


class _SeededRNG:
    """Seed torch's CPU RNG and Python's ``random`` for one sample, restoring both afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.torch_state = torch.get_rng_state()
        self.py_state = random.getstate()
        torch.manual_seed(self.seed)
        random.seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.torch_state)
        random.setstate(self.py_state)


class MultiCropDataset(torch.utils.data.Dataset):
    """Indexed by ``(dataset index, sample seed)``; returns ``(views, index, failed paths)``.

    A file that fails to decode is replaced by the next image (in dataset order) that decodes.
    """

    def __init__(self, paths: list[Path], transform: DINOTransform) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int, list[str]]:
        index, sample_seed = key
        failed: list[str] = []
        for attempt in range(len(self.paths)):
            candidate = (index + attempt) % len(self.paths)
            try:
                image = load_rgb(self.paths[candidate])
            except DECODE_ERRORS:
                failed.append(str(self.paths[candidate]))
                continue
            with _SeededRNG(sample_seed):
                return self.transform(image), candidate, failed
        raise RuntimeError(f"no file of the dataset decodes any more (last tried: {failed[-1:]})")


class _EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, sample seed)`` for this rank's epoch (``batch.epoch_indices``)."""

    def __init__(self, loader: TorchvisionMultiCropLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader) * self.loader.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        loader = self.loader
        indices = loader.epoch_indices().tolist()
        for position in range(loader.start_position, len(indices)):
            yield indices[position], mix_seed(loader.seed, loader.epoch, loader.rank, position)


class _CollateCropMajor:
    """Stack the views crop-major in the worker and cast to the compute dtype there (halves
    the bytes that cross process boundaries for 16-bit dtypes)."""

    def __init__(self, num_global: int, dtype: torch.dtype) -> None:
        self.num_global, self.dtype = num_global, dtype

    def __call__(
        self, samples: list[tuple[list[torch.Tensor], int, list[str]]]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[str]]:
        num_views = len(samples[0][0])
        views = [torch.stack([s[0][v] for s in samples]) for v in range(num_views)]
        global_crops = torch.cat(views[: self.num_global]).to(self.dtype)
        local_crops = (
            torch.cat(views[self.num_global :]).to(self.dtype) if num_views > self.num_global else None
        )
        indices = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        failed = [path for s in samples for path in s[2]]
        return global_crops, local_crops, indices, failed


class TorchvisionMultiCropLoader(FolderMultiCropLoader):
    """Multi-crop batches from an image folder with the official torchvision augmentation.

    ``num_workers`` DataLoader processes (default: all cores but one, at least 1; 0 = in the
    calling process). ``check``: the ``check_images`` mode run on the folder at construction.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        batch_size: int,
        augment: MultiCropAugmentation,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device,
        dtype: torch.dtype,
        num_workers: int | None = None,
        seed: int = 0,
        check: str = "header",
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__(
            root,
            check=check,
            batch_size=batch_size,
            augment=augment,
            rank=rank,
            world_size=world_size,
            device=device,
            dtype=dtype,
            seed=seed,
        )
        if num_workers is None:
            num_workers = max(1, (os.cpu_count() or 2) - 1)
        self.num_workers = num_workers
        self.dataset = MultiCropDataset(self.index.paths, DINOTransform(augment))
        self.start_position = 0  # the first sample of the epoch to load (iter_from)
        self._loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=_EpochSampler(self),
            # Each iterator draws its workers' base seed from this generator: from the global one,
            # it would shift the RNG the training step uses (drop path) and break exact resumes.
            # The samples need no worker seed: each is seeded by its position (_EpochSampler).
            generator=torch.Generator(),
            num_workers=num_workers,
            collate_fn=_CollateCropMajor(2, dtype),
            pin_memory=device.type == "cuda",
            drop_last=True,
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    def iter_from(self, start_batch: int) -> Iterator[MultiCropBatch]:
        failed: list[str] = []
        epoch = self.epoch
        non_blocking = self.device.type == "cuda"
        self.start_position = start_batch * self.batch_size
        try:
            for global_crops, local_crops, indices, batch_failed in self._loader:
                failed += batch_failed
                yield MultiCropBatch(
                    global_crops=global_crops.to(self.device, non_blocking=non_blocking),
                    local_crops=None
                    if local_crops is None
                    else local_crops.to(self.device, non_blocking=non_blocking),
                    indices=indices,
                )
        finally:  # also when the consumer stops early (--max_steps): the report is still owed
            log_skipped(epoch, self.root, len(self.rejected), failed)

    def close(self) -> None:
        # Dropping the iterator shuts persistent workers down.
        self._loader = None  # type: ignore[assignment]


def replay_view(image: Image.Image, params: ViewParams, sample: int, size: int, aug: MultiCropAugmentation):
    """One view made by the official ops from given parameters (a DALI plan's, say): the
    torchvision transforms of ``DINOTransform`` with their random draws replaced by ``params``
    for ``sample``. Returns the uint8 ``(size, size, 3)`` image before normalization."""
    functional = require("torchvision.transforms.functional", "replaying a view with torchvision")
    bicubic = functional.InterpolationMode.BICUBIC
    top, left, height, width = params.boxes[sample].tolist()
    img = functional.resized_crop(image, top, left, height, width, [size, size], bicubic)
    if params.flip[sample]:
        img = functional.hflip(img)
    if params.jitter[sample]:
        steps = (
            lambda x: functional.adjust_brightness(x, float(params.brightness[sample])),
            lambda x: functional.adjust_contrast(x, float(params.contrast[sample])),
            lambda x: functional.adjust_saturation(x, float(params.saturation[sample])),
            lambda x: functional.adjust_hue(x, float(params.hue[sample])),
        )
        for step in params.order[sample]:
            img = steps[step](img)
    if params.grayscale[sample]:
        img = functional.rgb_to_grayscale(img, num_output_channels=3)
    if params.blur[sample]:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(params.sigma[sample])))
    if params.solarize[sample]:
        img = ImageOps.solarize(img, threshold=aug.solarize_threshold)
    return np.asarray(img)
