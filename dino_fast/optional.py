"""Optional dependencies: imported where first needed, or one error saying how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

# What to run for each optional package, by the top-level name it is imported under.
INSTALL_COMMANDS = {
    "torchvision": "pip install torchvision (the release built for your torch)",
    "nvidia": "pip install nvidia-dali-cuda130 (or the wheel for your CUDA; benchmarks/dali_bundle.sh "
    "carries it to an offline machine)",
    "triton": "pip install triton",
}


class MissingDependencyError(ImportError):
    """An optional package is not installed; the message names what needs it and the install command."""


def require(module: str, needed_for: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingDependencyError` naming the fix."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        install = INSTALL_COMMANDS.get(package, f"pip install {package}")
        raise MissingDependencyError(
            f"{needed_for} needs {package}, which is not installed: {install}"
        ) from err
