"""What the kernels ask of the machine: is Triton installed, does it interpret, how many SMs.

Imports neither triton nor dino_fast, so dino_fast asks these questions where triton is absent.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` runs Triton programs on the host. Triton reads the variable when
    a kernel module is imported, so it must be set before that."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors a launch on ``device`` spreads over: 1 off CUDA and under the
    interpreter, which runs programs one at a time."""
    if device.type != "cuda" or interpreting():
        return 1
    return _cuda_sm_count(device.index or 0)
