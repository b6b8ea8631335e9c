"""A cache of extracted features, keyed by everything they depend on.

The key hashes the weights' bytes, the image list (paths, labels, sizes, mtimes) and the
transform/feature definition, so a different checkpoint, dataset or preprocessing never reuses a
stale file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from dino_fast.checkpoint import atomic_save
from dino_fast.data.folders import ImageFolderIndex
from dino_fast.eval.features import FeatureSet, FeatureSpec

logger = logging.getLogger(__name__)

_CACHE_FORMAT_VERSION = 1


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(index: ImageFolderIndex) -> str:
    """sha256 over the split's root, classes and each file's path, label, size and mtime."""
    digest = hashlib.sha256()
    root = Path(index.root).resolve()
    digest.update(f"{root}|{list(index.classes)}".encode())
    for path, label in zip(index.paths, index.labels, strict=True):
        st = os.stat(path)
        digest.update(f"{Path(path).resolve()}|{int(label)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(model: nn.Module, index: ImageFolderIndex, spec: FeatureSpec) -> str:
    """Key of the features of ``model`` on the split ``index`` under ``spec``."""
    parts = {
        "format": _CACHE_FORMAT_VERSION,
        "weights": weights_fingerprint(model),
        "model": type(model).__name__,
        "data": dataset_fingerprint(index),
        "spec": asdict(spec),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


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
