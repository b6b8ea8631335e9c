"""Which implementation runs a fused op: "triton", "native" or "torch".

Every fused op has all three behind one contract (see docs/design.md, "Backends"):

- ``triton``: dino_fast.kernels, on CUDA; on CPU only under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before the kernel modules are imported).
- ``native``: the C++/CUDA extension dino_fast._C (loaded by dino_fast.ops.native), where it has a
  kernel for the device.
- ``torch``: dino_fast.ops.reference, always available.

``backend=None`` picks the fastest available for the tensors' device (CUDA: triton, else
torch; CPU: native, else torch). The ``DINO_FAST_BACKEND`` environment variable overrides
that choice for every op; forcing a backend that cannot run raises
:class:`BackendUnavailableError` saying why and how to get it.
"""

from __future__ import annotations

import os

import torch

from dino_fast.errors import UserError
from dino_fast.kernels import runtime
from dino_fast.ops import native

BACKENDS = ("triton", "native", "torch")
ENV_VAR = "DINO_FAST_BACKEND"


class BackendUnavailableError(UserError, RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why and the fix."""


def triton_unavailable_reason(device_type: str) -> str | None:
    if not runtime.triton_installed():
        return "triton is not installed; `pip install triton` (Linux x86_64/aarch64)"
    if device_type == "cuda" or runtime.interpreting():
        return None
    return (
        f"triton kernels need a CUDA device, and {device_type} tensors run them only under the Triton "
        "interpreter: set TRITON_INTERPRET=1 before importing dino_fast"
    )


def native_unavailable_reason(device_type: str, native_op: str | None = None) -> str | None:
    module, reason = native.load()
    if module is None:
        return reason
    if device_type == "cuda" and not module.build_info()["cuda"]:
        return (
            "dino_fast._C was built without CUDA (torch without CUDA, nvcc not found, or "
            "DINO_FAST_NO_CUDA=1); put nvcc on PATH and run `pip install --no-build-isolation -e .`"
        )
    if native_op is not None and not native.has_kernel(native_op, device_type):
        return f"dino_fast._C has no {device_type} kernel for {native_op}; use backend='triton' or 'torch'"
    return None


def unavailable_reason(backend: str, device_type: str, native_op: str | None = None) -> str | None:
    """None when ``backend`` can run ops on ``device_type`` tensors, else why it cannot."""
    if backend == "triton":
        return triton_unavailable_reason(device_type)
    if backend == "native":
        return native_unavailable_reason(device_type, native_op)
    if backend == "torch":
        return None
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or None")


def available_backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Map each backend to None when usable on ``device`` (default: cuda if present, else cpu),
    or to a string saying why it is not."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {name: unavailable_reason(name, device_type) for name in BACKENDS}


def select_backend(requested: str | None, device: torch.device, *, op: str, native_op: str) -> str:
    """The backend that runs ``op`` on ``device``: the one requested (argument, else the
    DINO_FAST_BACKEND variable), or the fastest available one."""
    requested = requested or os.environ.get(ENV_VAR) or None
    if requested is not None:
        reason = unavailable_reason(requested, device.type, native_op)
        if reason is not None:
            raise BackendUnavailableError(
                f"{op}: backend {requested!r} is unavailable on {device.type}: {reason}"
            )
        return requested
    preferred = ("triton", "torch") if device.type == "cuda" else ("native", "torch")
    return next(name for name in preferred if unavailable_reason(name, device.type, native_op) is None)
