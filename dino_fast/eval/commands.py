"""The evaluation console scripts (pyproject's [project.scripts]); each returns its command's exit
status through dino_fast.errors.run_command, as ``python -m`` does."""

from __future__ import annotations

from dino_fast.errors import run_command
from dino_fast.eval import attention_maps, knn, linear


def knn_command() -> int:
    """``dino-fast-knn``: ``python -m dino_fast.eval.knn``."""
    return run_command(knn.main)


def linear_command() -> int:
    """``dino-fast-linear``: ``python -m dino_fast.eval.linear``."""
    return run_command(linear.main)


def visualize_command() -> int:
    """``dino-fast-visualize``: ``python -m dino_fast.visualize``."""
    return run_command(attention_maps.main)
