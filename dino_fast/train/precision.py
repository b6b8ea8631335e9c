"""The precisions a run trains in (``--precision``) and the dtypes each one means."""

from __future__ import annotations

import torch

# The dtype of the crops the loader delivers, and the one autocast computes in.
DATA_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISIONS = tuple(DATA_DTYPES)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision``; None for fp32, which runs without autocast."""
    return None if precision == "fp32" else DATA_DTYPES[precision]
