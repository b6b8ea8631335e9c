"""Official-style feature dumps: ``--dump_features`` writes them, ``--load_features`` reads them."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dino_fast.checkpoint import atomic_save
from dino_fast.errors import UserError
from dino_fast.eval.features import FeatureSet

logger = logging.getLogger(__name__)

_DUMP_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


class StaleFeaturesError(UserError, RuntimeError):
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
