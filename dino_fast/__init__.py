"""dino_fast: fast DINO self-supervised ViT training and drop-in fused SSL kernels.

Public API (imported on first use, so ``import dino_fast.models`` stays light):

- ``dino_fast.DINOLoss``: drop-in for the official DINO loss module, fused kernels inside.
- ``dino_fast.TeacherEMA``: momentum-teacher update at flat-buffer speed.
- ``dino_fast.ops``: the fused ops themselves (``dino_loss``, ``ema_update_``) and
  ``available_backends()``.
- ``dino_fast.models``: ViTs with official DINO parameter names, ``DINOHead``,
  ``multicrop_forward``.
- ``dino_fast.data``: ``make_loader`` for DALI, torchvision and synthetic multi-crop batches.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY_ATTRIBUTES = {
    "DINOLoss": "dino_fast.ops.loss",
    "TeacherEMA": "dino_fast.ops.ema",
}
_LAZY_MODULES = {"ops", "models", "data", "eval"}

__all__ = ["DINOLoss", "TeacherEMA", "__version__", *sorted(_LAZY_MODULES)]


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"dino_fast.{name}")
    raise AttributeError(f"module 'dino_fast' has no attribute {name!r}")
