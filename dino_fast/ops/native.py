"""Loading dino_fast._C safely.

The extension is compiled against one torch build; loading it into another can fail on
missing symbols or, worse, crash. So the build writes ``_C_build.json`` next to the module
and it is compared with the running torch *before* the shared object is loaded. Any problem
turns into a reason string (native backend unavailable) and, for a version mismatch, one
warning; importing dino_fast never fails because of the extension.
"""

from __future__ import annotations

import functools
import importlib
import json
import warnings
from pathlib import Path
from types import ModuleType

import torch

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` in this environment"
_MANIFEST = Path(__file__).parents[1] / "_C_build.json"  # written by setup.py beside dino_fast._C


@functools.cache
def load() -> tuple[ModuleType | None, str | None]:
    """(module, None) when dino_fast._C is usable, else (None, why not)."""
    if not _MANIFEST.exists():
        return None, (
            "the native extension dino_fast._C is not built (installed with DINO_FAST_NO_EXT=1, "
            f"or its build failed); {REBUILD_HINT}"
        )
    built_for = json.loads(_MANIFEST.read_text()).get("torch_version")
    if built_for != torch.__version__:
        reason = (
            f"dino_fast._C was built against torch {built_for} but torch {torch.__version__} is "
            f"imported; {REBUILD_HINT}"
        )
        warnings.warn(f"dino_fast: native backend disabled: {reason}", RuntimeWarning, stacklevel=2)
        return None, reason
    try:
        module = importlib.import_module("dino_fast._C")
    except (ImportError, OSError) as err:
        return None, f"dino_fast._C failed to load ({err}); {REBUILD_HINT}"
    return module, None


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether torch.ops.dino_fast_native.<op_name> has a kernel for this device type."""
    module, _ = load()
    if module is None:
        return False
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if dispatch_key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dino_fast_native::{op_name}", dispatch_key)
    except RuntimeError:  # the op is not registered at all (built from older sources)
        return False
