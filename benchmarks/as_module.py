"""``python benchmarks/<script>.py`` runs as ``python -m benchmarks.<script>``.

A file run as a script has its own folder, benchmarks/, as its first import path, where the
package ``benchmarks`` its modules import each other from cannot be found. So the script hands
over to ``python -m`` with the checkout's root on PYTHONPATH (which also finds the checkout's
dino_fast when it is not installed), and the same module runs as it does under ``-m``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn


def rerun_as_module(script: str) -> NoReturn:
    """Replace this process with ``python -m benchmarks.<script's name>`` and the same arguments."""
    path = Path(script).resolve()
    root = str(path.parents[1])
    python_path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + python_path if python_path else "")}
    os.execve(sys.executable, [sys.executable, "-m", f"benchmarks.{path.stem}", *sys.argv[1:]], env)
