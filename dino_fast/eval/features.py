"""Frozen-feature plumbing shared by the k-NN, the linear probe and the attention maps.

- **Checkpoints**: :func:`load_pretrained_weights` takes a dino_fast or an official DINO
  checkpoint — a full training checkpoint (``student``/``teacher`` entries, ``module.`` and
  ``backbone.`` prefixes, the projection head dropped as the official evaluation does) or a
  plain backbone state dict (the released ``*_pretrain.pth``) — and refuses anything that does
  not fit the model exactly, naming the mismatching tensors. Without weights the model keeps
  its random initialization and a loud warning says so.
- **Extraction**: :func:`extract_features` runs a frozen backbone over a dataset. Under
  ``torch.distributed`` each rank extracts an interleaved shard (the split of
  ``DistributedSampler(shuffle=False)``) and an ``all_gather`` rebuilds the full matrix in
  dataset order on every rank; without a process group it is a plain loop.
- **Caching**: features are cached under a key hashing the weights' bytes, the image list
  (paths, labels, sizes, mtimes) and the transform/feature definition, so a different
  checkpoint, dataset or preprocessing never reuses a stale file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dino_fast.checkpoint import atomic_save

logger = logging.getLogger(__name__)

ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")
_EMBED_DIM_TO_ARCH = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}
# Prefixes wrappers put in front of backbone parameter names: DDP ("module."), the multi-crop
# wrapper / DINOModel ("backbone."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")
_CACHE_FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# models and checkpoints
# --------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded into the requested model; the message says why and the fix."""


def build_backbone(arch: str, patch_size: int = 16, attn_backend: str = "auto") -> nn.Module:
    """A dino_fast ViT (official parameter names) in eval mode with frozen parameters."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    from dino_fast import models

    model = getattr(models, arch)(patch_size=patch_size, drop_path_rate=0.0, attn_backend=attn_backend)
    model.eval()
    model.requires_grad_(False)
    return model


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` on CPU, refusing arbitrary code where the file allows it.

    Tensors, containers and ``argparse.Namespace`` (the official checkpoints' ``args``) load
    with ``weights_only=True``. A file holding other Python objects (a config dataclass, a
    numpy scalar) can only be read with the full unpickler, which can run code: that fallback
    is logged, so only evaluate checkpoints from sources you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--pretrained_weights {path} does not exist (or is not a file): pass the path of a dino_fast "
            "checkpoint.pth or of an official DINO *_pretrain.pth / checkpoint.pth"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        logger.warning(
            "%s holds Python objects beyond tensors (%s); loading it with the full unpickler, which runs "
            "code from the file: only do this for checkpoints you trust",
            path,
            str(err).splitlines()[0],
        )
        return torch.load(path, map_location="cpu", weights_only=False)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def backbone_state_dict(
    checkpoint: Any, checkpoint_key: str | None = "teacher", *, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """The backbone weights inside ``checkpoint`` with wrapper prefixes stripped and the head dropped.

    ``checkpoint`` is either a training checkpoint (a dict with ``checkpoint_key`` among its
    entries) or a plain state dict. Like the official ``load_pretrained_weights``, a plain
    state dict is used as it is whatever ``checkpoint_key`` says.
    """
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(checkpoint).__name__}, not a dict of weights or a training checkpoint"
        )
    if checkpoint_key is not None and checkpoint_key in checkpoint:
        state = checkpoint[checkpoint_key]
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if not _is_state_dict(state):
            raise CheckpointError(
                f"{source}[{checkpoint_key!r}] is a {type(state).__name__}, not a state dict of tensors"
            )
    elif _is_state_dict(checkpoint):
        state = checkpoint
    else:
        candidates = sorted(str(k) for k, v in checkpoint.items() if _is_state_dict(v))
        raise CheckpointError(
            f"--checkpoint_key {checkpoint_key!r} is not in {source}; its entries are "
            f"{sorted(map(str, checkpoint))}. Pass --checkpoint_key with one of the entries holding weights: "
            f"{candidates or 'none found'}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = _strip_prefixes(str(key))
        if key.startswith("head."):
            # The DINO projection head is not part of the evaluated backbone (official: dropped).
            continue
        out[key] = value
    if not out:
        raise CheckpointError(f"{source} has no backbone tensors once the DINO head is dropped")
    return out


def describe_vit_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """Best-effort description of the ViT a state dict was saved from (for error messages)."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return "it does not look like a ViT backbone (no patch_embed.proj.weight)"
    dim, patch = proj.shape[0], proj.shape[-1]
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    arch = _EMBED_DIM_TO_ARCH.get(dim)
    guess = f" -> --arch {arch} --patch_size {patch}" if arch else ""
    return f"it was saved from a ViT with embed_dim={dim}, patch_size={patch}, depth={depth}{guess}"


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_pretrained_weights` loaded (``path`` is None for a random init)."""

    path: Path | None
    checkpoint_key: str | None
    num_tensors: int


def load_pretrained_weights(
    model: nn.Module,
    pretrained_weights: str | os.PathLike[str] | None,
    checkpoint_key: str | None = "teacher",
    *,
    arch_hint: str = "",
) -> LoadedWeights:
    """Load a dino_fast / official DINO checkpoint into ``model`` (a backbone), strictly.

    Every tensor of the model must be in the checkpoint with the same shape, and the
    checkpoint may hold nothing else besides the DINO head: a partly loaded backbone would
    evaluate silently wrong numbers. ``pretrained_weights`` None or "" keeps the random
    initialization, with a loud warning. ``arch_hint`` (e.g. "--arch vit_small --patch_size
    16") is echoed in errors.
    """
    if pretrained_weights is None or str(pretrained_weights) == "":
        logger.warning(
            "NO PRETRAINED WEIGHTS GIVEN: evaluating a RANDOMLY INITIALIZED %s. Pass --pretrained_weights "
            "PATH to evaluate a trained model.",
            type(model).__name__,
        )
        return LoadedWeights(path=None, checkpoint_key=None, num_tensors=0)
    path = Path(pretrained_weights)
    state = backbone_state_dict(read_checkpoint(path), checkpoint_key, source=str(path))
    own = model.state_dict()
    hint = f" (model built with {arch_hint})" if arch_hint else ""
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        details = "; ".join(
            f"{k}: model expects {tuple(own[k].shape)}, checkpoint has {tuple(state[k].shape)}"
            for k in mismatched[:4]
        )
        more = f" (and {len(mismatched) - 4} more)" if len(mismatched) > 4 else ""
        raise CheckpointError(
            f"{path} does not match the model{hint}: {details}{more}. {describe_vit_state_dict(state)}."
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model tensors are missing from it (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"it has {len(unexpected)} tensors the model lacks (e.g. {unexpected[:3]})")
        raise CheckpointError(
            f"{path} does not match the model{hint}: {' and '.join(parts)}. {describe_vit_state_dict(state)}."
        )
    model.load_state_dict(state, strict=True)
    used_key = checkpoint_key if checkpoint_key is not None else None
    logger.info("loaded %d tensors from %s (checkpoint key %r)", len(state), path, used_key)
    return LoadedWeights(path=path, checkpoint_key=used_key, num_tensors=len(state))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The official evaluation scripts' model flags."""
    parser.add_argument(
        "--pretrained_weights", default="", type=str, help="Checkpoint to evaluate (empty: random init)."
    )
    parser.add_argument(
        "--checkpoint_key",
        default="teacher",
        type=str,
        help='Training-checkpoint entry to use ("teacher" or "student"); ignored for a plain state dict.',
    )
    parser.add_argument("--arch", default="vit_small", choices=ARCHS, help="Architecture.")
    parser.add_argument("--patch_size", default=16, type=int, help="Patch resolution of the model.")
    parser.add_argument(
        "--attn_backend",
        default="auto",
        type=str,
        help="Attention backend of the ViT (see dino_fast.models).",
    )


def build_model_from_args(args: argparse.Namespace, device: torch.device) -> nn.Module:
    model = build_backbone(args.arch, args.patch_size, args.attn_backend)
    load_pretrained_weights(
        model,
        args.pretrained_weights,
        args.checkpoint_key,
        arch_hint=f"--arch {args.arch} --patch_size {args.patch_size}",
    )
    return model.to(device)


def bool_flag(value: str) -> bool:
    """argparse type for on/off flags (official ``bool_flag``)."""
    if value.lower() in {"off", "false", "0"}:
        return False
    if value.lower() in {"on", "true", "1"}:
        return True
    raise argparse.ArgumentTypeError(f"invalid value {value!r} for a boolean flag: use true/false")


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _dist_on() else 1


def rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def is_main_process() -> bool:
    return rank() == 0


@contextlib.contextmanager
def distributed_context(device: str = "auto") -> Iterator[torch.device]:
    """Join the process group torchrun describes (if any) and yield this process's device.

    ``torchrun --nproc_per_node=N`` sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU.
    A plain ``python -m`` run is one process on the first GPU, else the CPU.
    """
    from dino_fast import distributed

    created = not distributed.is_initialized()
    info = distributed.init_distributed(device)
    try:
        yield info.device
    finally:
        if created:
            distributed.cleanup()


def _shard_indices(num_samples: int, world: int, rank_: int) -> list[int]:
    """Rank ``rank_``'s interleaved shard, padded by wrapping around (``DistributedSampler`` order)."""
    per_rank = -(-num_samples // world)
    padded = list(range(num_samples)) + list(range(per_rank * world - num_samples))
    return padded[rank_::world]


# --------------------------------------------------------------------------------------------
# feature definitions and extraction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature vector is: the eval transform and which tokens/layers are taken.

    ``n_last_blocks=None`` is the backbone's output (last-layer CLS after the final norm), the
    k-NN feature. ``n_last_blocks=n`` concatenates the CLS tokens of the last n blocks (each
    through the final norm, as ``get_intermediate_layers`` returns them) and, with
    ``avgpool_patchtokens``, the mean of the last block's patch tokens: the linear-probe feature.
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
        return lambda x: intermediate_features(model, x, self.n_last_blocks or 1, self.avgpool_patchtokens)


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
    world, rank_ = world_size(), rank()
    shard = _shard_indices(num_samples, world, rank_)
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


# --------------------------------------------------------------------------------------------
# datasets, cache keys and the cache
# --------------------------------------------------------------------------------------------


def scan_split(root: str | os.PathLike[str]) -> Any:
    """Index of an ImageFolder split (see ``dino_fast.data.folders.scan_image_folder``)."""
    from dino_fast.data.folders import scan_image_folder

    return scan_image_folder(root)


def eval_dataset(index: Any, spec: FeatureSpec) -> torch.utils.data.Dataset:
    """The official evaluation transform over an indexed split: resize, center crop, normalize."""
    from dino_fast.data.folders import EvalImageDataset

    return EvalImageDataset(index, image_size=spec.image_size, resize_size=spec.effective_resize)


def train_dataset(index: Any, spec: FeatureSpec) -> torch.utils.data.Dataset:
    """The official linear-probe training transform: RandomResizedCrop, horizontal flip, normalize."""
    from torchvision import transforms

    from dino_fast.data.folders import EvalImageDataset

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(spec.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return EvalImageDataset(index, image_size=spec.image_size, transform=transform)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(index: Any) -> str:
    """sha256 over the split's root, classes and each file's path, label, size and mtime."""
    digest = hashlib.sha256()
    root = Path(index.root).resolve()
    digest.update(f"{root}|{list(index.classes)}".encode())
    for path, label in zip(index.paths, index.labels, strict=True):
        st = os.stat(path)
        digest.update(f"{Path(path).resolve()}|{int(label)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(model: nn.Module, index: Any, spec: FeatureSpec) -> str:
    """Key of the features of ``model`` on the split ``index`` under ``spec``."""
    parts = {
        "format": _CACHE_FORMAT_VERSION,
        "weights": weights_fingerprint(model),
        "model": type(model).__name__,
        "data": dataset_fingerprint(index),
        "spec": asdict(spec),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class FeatureSet:
    """Features ``(N, dim)``, labels ``(N,)`` and class names of one split; ``key`` is its cache key."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    key: str | None = None


class FeatureCache:
    """A folder of ``<key>.pt`` feature files (see :func:`cache_key`)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> FeatureSet | None:
        path = self.path(key)
        if not path.is_file():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") != key:
            logger.warning("ignoring %s: it was written for key %s", path, blob.get("key"))
            return None
        return FeatureSet(blob["features"], blob["labels"], tuple(blob["classes"]), key)

    def save(self, fs: FeatureSet) -> Path:
        if fs.key is None:
            raise ValueError("a FeatureSet needs its cache key to be cached")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(fs.key)
        blob = {
            "key": fs.key,
            "features": fs.features.cpu(),
            "labels": fs.labels.cpu(),
            "classes": list(fs.classes),
        }
        atomic_save(blob, path)
        return path


def _broadcast_from_main(
    tensor: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Rank 0's tensor on every rank (others pass None): shape first, then data."""
    shape = torch.zeros(2, dtype=torch.long, device=device)
    if rank() == 0:
        assert tensor is not None
        shape.copy_(torch.tensor(tensor.reshape(tensor.shape[0], -1).shape))
    dist.broadcast(shape, 0)
    buf = (
        tensor.reshape(tensor.shape[0], -1).to(device, dtype)
        if rank() == 0 and tensor is not None
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
        cached = cache.load(key) if cache is not None and key is not None and is_main_process() else None
        if world_size() > 1 and cache is not None:
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
        if cache is not None and is_main_process():
            logger.info("features of %s cached at %s", root, cache.save(result))
        return result
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# official-style dumps (--dump_features / --load_features)
# --------------------------------------------------------------------------------------------

_DUMP_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


class StaleFeaturesError(RuntimeError):
    """Saved features were computed from different weights, data or preprocessing."""


def dump_features(directory: str | os.PathLike[str], train: FeatureSet, test: FeatureSet) -> None:
    """Write the official file set (L2-normalized features, labels) plus ``meta.json`` with the keys."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    normalize = torch.nn.functional.normalize
    tensors = (
        normalize(train.features.float(), dim=1).cpu(),
        normalize(test.features.float(), dim=1).cpu(),
        train.labels.cpu(),
        test.labels.cpu(),
    )
    for name, tensor in zip(_DUMP_FILES, tensors, strict=True):
        atomic_save(tensor, directory / name)
    meta = {"train_key": train.key, "test_key": test.key, "classes": list(train.classes)}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))


def load_dumped_features(
    directory: str | os.PathLike[str], *, expected_keys: Sequence[str | None] | None = None
) -> tuple[FeatureSet, FeatureSet]:
    """Read a ``--dump_features`` folder (ours or the official script's).

    With ``expected_keys`` (train, test) the keys recorded in ``meta.json`` must match, else
    :class:`StaleFeaturesError`; an official dump has no ``meta.json`` and cannot be checked.
    """
    directory = Path(directory)
    missing = [name for name in _DUMP_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--load_features {directory} lacks {missing}: point it at a folder written by --dump_features"
        )
    train_f, test_f, train_l, test_l = (
        torch.load(directory / name, map_location="cpu", weights_only=True) for name in _DUMP_FILES
    )
    meta_path = directory / "meta.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if expected_keys is not None:
        if not meta:
            logger.warning(
                "%s has no meta.json: cannot check the features match the given weights/data", directory
            )
        else:
            for split, want, have in zip(
                ("train", "test"), expected_keys, (meta.get("train_key"), meta.get("test_key")), strict=True
            ):
                if want is not None and want != have:
                    raise StaleFeaturesError(
                        f"the {split} features in {directory} were computed from other weights, images or "
                        f"preprocessing (key {have}, expected {want}): re-extract them (drop "
                        "--load_features) or point --load_features at the right folder"
                    )
    num_classes = int(max(train_l.max(), test_l.max())) + 1
    classes = tuple(meta.get("classes", [str(i) for i in range(num_classes)]))
    return (
        FeatureSet(train_f, train_l.long(), classes, meta.get("train_key")),
        FeatureSet(test_f, test_l.long(), classes, meta.get("test_key")),
    )
