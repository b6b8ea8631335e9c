"""What every multi-crop loader yields and promises: ``MultiCropBatch`` and ``MultiCropLoader``.

Epoch semantics are those of the official DINO loader (``DistributedSampler(shuffle=True)``
feeding ``DataLoader(drop_last=True)``): each epoch draws one permutation of the dataset from
``seed + epoch``, pads it by repeating its head until it divides evenly among the ranks, gives
rank r the positions r, r + world_size, ..., and drops each rank's last incomplete batch. So
``len(loader) == ceil(N / world_size) // batch_size`` on every rank, ranks see disjoint samples
whenever N is a multiple of world_size, and ``set_epoch(e)`` must be called before iterating
epoch e (as with DistributedSampler) to get a new order.
"""

from __future__ import annotations

import abc
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dino_fast.data.augment import MultiCropAugmentation
from dino_fast.data.folders import check_images, scan_image_folder

logger = logging.getLogger("dino_fast.data")


@dataclass(frozen=True)
class MultiCropBatch:
    """One batch of DINO views, crop-major, on the training device, in the compute dtype.

    ``global_crops``: ``(2 * B, 3, G, G)``, rows ``[view 0 of all B images, view 1 of all B]``.
    ``local_crops``: ``(L * B, 3, g, g)`` in the same crop-major order, or ``None`` when the
    loader makes no local crops (``local_crops_number=0``).
    ``indices``: ``(B,)`` int64 on the CPU, the dataset index of each image (after any
    substitution of unreadable files), or ``None`` for synthetic data.
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor | None
    indices: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.global_crops.shape[0] // 2

    @property
    def local_crops_number(self) -> int:
        return 0 if self.local_crops is None else self.local_crops.shape[0] // self.batch_size

    def crops(self) -> list[torch.Tensor]:
        """The views as a list of ``(B, 3, S, S)`` tensors (views of the batch, no copy), in the
        order of the official code's ``images`` list."""
        views = list(self.global_crops.split(self.batch_size))
        if self.local_crops is not None:
            views += list(self.local_crops.split(self.batch_size))
        return views


def epoch_indices(num_samples: int, epoch: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's dataset indices for one epoch, exactly as ``DistributedSampler`` draws them."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    indices = torch.randperm(num_samples, generator=generator)
    total = math.ceil(num_samples / world_size) * world_size
    padding = total - num_samples
    if padding:
        repeats = math.ceil(padding / num_samples)
        indices = torch.cat([indices, indices.repeat(repeats)[:padding]])
    return indices[rank:total:world_size]


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state >> 1


def check_loader_args(
    batch_size: int, local_crops_number: int, rank: int, world_size: int, dtype: torch.dtype
) -> None:
    """Argument errors every loader reports the same way."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (images per rank per step), got {batch_size}")
    if local_crops_number < 0:
        raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point compute dtype (bf16, fp16, fp32), got {dtype}")


class MultiCropLoader(abc.ABC):
    """Iterable over ``MultiCropBatch`` with ``len()`` (steps per epoch), ``set_epoch(e)`` and
    ``iter_from(step)``, which seeks within the epoch (a mid-epoch resume)."""

    def __init__(
        self,
        *,
        batch_size: int,
        augment: MultiCropAugmentation,
        rank: int,
        world_size: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        dataset_size: int,
    ) -> None:
        self.batch_size = batch_size
        self.augment = augment
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.dtype = dtype
        self.seed = seed
        self.dataset_size = dataset_size
        self.epoch = 0
        self.samples_per_rank = math.ceil(dataset_size / world_size)
        self.steps_per_epoch = self.samples_per_rank // batch_size

    @property
    def local_crops_number(self) -> int:
        return self.augment.local_crops_number

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling (and augmentation randomness) of epoch ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """The dataset indices this rank reads in ``epoch`` (default: the current one), batch by
        batch; the tail that does not fill a batch is dropped."""
        epoch = self.epoch if epoch is None else epoch
        indices = epoch_indices(self.dataset_size, epoch, self.seed, self.rank, self.world_size)
        return indices[: self.steps_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[MultiCropBatch]:
        return self.iter_from(0)

    @abc.abstractmethod
    def iter_from(self, start_batch: int) -> Iterator[MultiCropBatch]:
        """This epoch's batches from ``start_batch`` on, exactly as a full pass yields them there,
        without producing the skipped ones."""

    def close(self) -> None:  # noqa: B027 - a no-op unless the pipeline holds workers
        """Release worker processes / pipelines (also done when the loader is garbage collected)."""

    def __enter__(self) -> MultiCropLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderMultiCropLoader(MultiCropLoader):
    """A loader over an image folder, scanned and checked once at construction: unusable files
    are dropped (folders.py's bad-input policy) and each rank must get at least one full batch."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        check: str,
        batch_size: int,
        augment: MultiCropAugmentation,
        rank: int,
        world_size: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
    ) -> None:
        index = scan_image_folder(root)
        checked = check_images(index, mode=check)
        self.root = index.root
        self.index = checked.index
        self.sizes = checked.sizes
        self.rejected = checked.rejected
        super().__init__(
            batch_size=batch_size,
            augment=augment,
            rank=rank,
            world_size=world_size,
            device=device,
            dtype=dtype,
            seed=seed,
            dataset_size=len(self.index),
        )
        check_enough_samples(self.dataset_size, batch_size, world_size, self.root)


def check_enough_samples(dataset_size: int, batch_size: int, world_size: int, root: Path | None) -> None:
    if math.ceil(dataset_size / world_size) < batch_size:
        where = f" under {root}" if root is not None else ""
        raise ValueError(
            f"{dataset_size} usable images{where} give each of {world_size} rank(s) "
            f"{math.ceil(dataset_size / world_size)} images per epoch, fewer than batch_size={batch_size}: "
            "the epoch would have no full batch. Lower batch_size or add images."
        )


def log_skipped(epoch: int, root: Path, rejected_at_scan: int, failed_at_decode: list[str]) -> None:
    """The once-per-epoch report of unusable files."""
    if not rejected_at_scan and not failed_at_decode:
        return
    detail = ""
    if failed_at_decode:
        shown = ", ".join(failed_at_decode[:3]) + (" ..." if len(failed_at_decode) > 3 else "")
        detail = f"; {len(failed_at_decode)} image slot(s) failed to decode and were replaced ({shown})"
    logger.warning(
        "epoch %d: skipped unusable files under %s: %d rejected when the folder was checked%s",
        epoch,
        root,
        rejected_at_scan,
        detail,
    )
