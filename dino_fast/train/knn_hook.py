"""After training: the teacher's k-NN accuracy against the same network at its random init."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from dino_fast.eval.knn import knn_accuracy
from dino_fast.train.model import build_backbone
from dino_fast.train.run import TrainResult

logger = logging.getLogger(__name__)


def knn_evaluation(result: TrainResult, *, k: int = 20) -> None:
    """k-NN top-1 of the trained teacher's backbone vs the same network at its random init.

    Runs when the training folder's parent also holds a ``test/`` or ``val/`` split (the demo's
    Fashion-MNIST, or an ImageNet-style ``.../train`` + ``.../val``); the accuracies go into
    ``result.extra``. Every rank takes part (feature extraction is sharded under torchrun).
    """
    if result.data_root is None:
        logger.warning("k-NN evaluation skipped: synthetic data has no labels")
        return
    root = result.data_root.parent
    test = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if test is None:
        logger.warning("k-NN evaluation skipped: %s has no test/ or val/ split beside train/", root)
        return
    trainer = result.trainer
    config = trainer.config
    torch.manual_seed(config.seed)  # the student backbone is the first thing a run draws
    random_init = build_backbone(config, drop_path_rate=0.0).to(trainer.device)
    kwargs: dict[str, Any] = {
        "device": trainer.device,
        "nb_knn": (k,),
        "image_size": config.global_crops_size,
        "resize_size": config.global_crops_size,
        "batch_size": 256,
        "num_workers": min(config.num_workers, 4),
    }
    started = time.perf_counter()
    trained = knn_accuracy(trainer.teacher.backbone, result.data_root, test, **kwargs)[k]
    baseline = knn_accuracy(random_init, result.data_root, test, **kwargs)[k]
    result.extra[f"k-NN top-1 (k={k}) on {test}"] = (
        f"teacher {trained:.2f}% vs random init {baseline:.2f}% ({time.perf_counter() - started:.0f}s)"
    )
