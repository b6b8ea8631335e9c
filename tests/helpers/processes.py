"""Commands of the package run as a user runs them: a fresh Python process from the checkout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_python(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """``python *args`` in the checkout with one thread per process; fails the test (killing the
    process and every worker it started) after ``timeout`` seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # Own process group: on a timeout the launcher AND the workers it started are killed.
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish in {timeout}s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
