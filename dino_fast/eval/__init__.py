"""Evaluation of DINO backbones: weighted k-NN, linear probe, attention maps.

    from dino_fast.eval import knn_accuracy, load_pretrained_weights, build_backbone

    vit = build_backbone("vit_small", 16)
    load_pretrained_weights(vit, "runs/x/checkpoint.pth", "teacher")
    knn_accuracy(vit, "imagenet/train", "imagenet/val", device="cuda")   # {10: ..., 20: ..., ...}
    rn50 = build_backbone("resnet50")   # torchvision ResNet-50, fc = identity: 2048-d pooled features
    load_pretrained_weights(rn50, "dino_resnet50_pretrain.pth")

Command lines: ``python -m dino_fast.eval.knn``, ``python -m dino_fast.eval.linear``,
``python -m dino_fast.visualize`` (flags as in the official eval_knn.py, eval_linear.py and
visualize_attention.py). Submodules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_backbone": "weights",
    "load_pretrained_weights": "weights",
    "CheckpointError": "weights",
    "extract_features": "features",
    "FeatureSet": "features",
    "FeatureSpec": "features",
    "FeatureCache": "cache",
    "extract_split": "splits",
    "StaleFeaturesError": "dumps",
    "knn_accuracy": "knn",
    "evaluate_knn": "knn",
    "knn_classifier": "knn",
    "knn_from_features": "knn",
    "KNNResult": "knn",
    "LinearClassifier": "classifier",
    "LinearProbeConfig": "linear",
    "LinearProbeResult": "linear",
    "train_linear_on_features": "linear",
    "train_linear_on_images": "linear",
    "visualize_image": "attention_maps",
    "cls_attention": "attention_maps",
    "threshold_masks": "attention_maps",
}
_SUBMODULES = {
    "arch_inference",
    "weights",
    "features",
    "cache",
    "splits",
    "dumps",
    "knn",
    "classifier",
    "linear",
    "attention_maps",
}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dino_fast.eval.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"dino_fast.eval.{name}")
    raise AttributeError(f"module 'dino_fast.eval' has no attribute {name!r}")
