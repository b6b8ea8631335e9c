"""What a frozen feature is, and its extraction over a dataset.

:func:`extract_features` runs a frozen backbone over a dataset. Under ``torch.distributed`` each
rank extracts an interleaved shard (the split of ``DistributedSampler(shuffle=False)``) and an
``all_gather`` rebuilds the full matrix in dataset order on every rank; without a process group it
is a plain loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dino_fast import distributed


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature vector is: the eval transform and which tokens/layers are taken.

    ``n_last_blocks=None`` is the backbone's output: a ViT's last-layer CLS after the final norm,
    a convnet's global-average-pooled features (fc = identity); the k-NN feature, and a
    convnet's linear-probe feature. ``n_last_blocks=n`` (ViTs) concatenates the CLS tokens of the
    last n blocks (each through the final norm, as ``get_intermediate_layers`` returns them) and,
    with ``avgpool_patchtokens``, the mean of the last block's patch tokens: the ViT linear-probe
    feature.
    """

    image_size: int = 224
    resize_size: int | None = None
    n_last_blocks: int | None = None
    avgpool_patchtokens: bool = False

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size ({self.resize_size}) must be at least image_size ({self.image_size}): "
                "the image is resized, then center-cropped"
            )
        if self.n_last_blocks is not None and self.n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be at least 1, got {self.n_last_blocks}")
        if self.avgpool_patchtokens and self.n_last_blocks is None:
            raise ValueError("avgpool_patchtokens needs n_last_blocks (the linear-probe feature)")

    @property
    def effective_resize(self) -> int:
        # official: Resize(256) before CenterCrop(224); keep that ratio at other sizes.
        return self.resize_size if self.resize_size is not None else round(self.image_size * 256 / 224)

    def feature_fn(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.n_last_blocks is None:
            return model
        if not has_block_tokens(model):
            raise ValueError(
                f"n_last_blocks={self.n_last_blocks} takes a ViT's block tokens, but {type(model).__name__} "
                "has none (a convnet): use its pooled output, n_last_blocks=None"
            )
        return lambda x: intermediate_features(model, x, self.n_last_blocks or 1, self.avgpool_patchtokens)


def has_block_tokens(model: nn.Module) -> bool:
    """Whether ``model`` hands out its blocks' tokens (a ViT's ``get_intermediate_layers``)."""
    return callable(getattr(model, "get_intermediate_layers", None))


@dataclass(frozen=True)
class FeatureSet:
    """Features ``(N, dim)``, labels ``(N,)`` and class names of one split; ``key`` is its cache key."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    key: str | None = None


def intermediate_features(
    model: nn.Module, x: torch.Tensor, n_last_blocks: int, avgpool: bool
) -> torch.Tensor:
    """The official linear-probe feature of a batch.

    CLS tokens of the last ``n_last_blocks`` blocks concatenated; with ``avgpool`` the mean
    patch token of the last block is appended. For ``n_last_blocks == 1`` the official code
    interleaves the two vectors element-wise ([cls_0, avg_0, cls_1, avg_1, ...]); that layout
    is kept so linear weights trained by the official script load here. (Official crashes for
    avgpool with n > 1; here the mean patch token is simply appended.)
    """
    layers = model.get_intermediate_layers(x, n_last_blocks)
    out = torch.cat([layer[:, 0] for layer in layers], dim=-1)
    if avgpool:
        pooled = layers[-1][:, 1:].mean(dim=1)
        out = (
            torch.stack((out, pooled), dim=-1).flatten(1)
            if n_last_blocks == 1
            else torch.cat((out, pooled), -1)
        )
    return out


@torch.no_grad()
def extract_features(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    dataset: torch.utils.data.Dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    num_workers: int = 0,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Features of every sample of ``dataset`` (items ``(image, label)``), in dataset order.

    Returns ``(len(dataset), dim)`` float32 on ``device``, on every rank. Under
    ``torch.distributed`` each rank runs only its shard; the shards are all-gathered (so the
    process group's backend must handle tensors on ``device``: NCCL for CUDA, gloo for CPU).
    """
    num_samples = len(dataset)  # type: ignore[arg-type]
    if num_samples == 0:
        raise ValueError("the dataset is empty: there are no images to extract features from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    fn = feature_fn if feature_fn is not None else model
    world = distributed.get_world_size()
    shard = distributed.shard_indices(num_samples, world, distributed.get_rank())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    chunks = []
    for images, _ in loader:
        chunks.append(fn(images.to(device, non_blocking=True)).float())
    local = torch.cat(chunks)
    if world == 1:
        return local
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    # Rank r's i-th row is sample r + i * world: interleave the shards back, drop the padding.
    return torch.stack(gathered, dim=1).reshape(-1, local.shape[1])[:num_samples]
