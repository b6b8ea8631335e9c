"""One run per output folder: the lock names its holder and dies with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino_fast.output_lock import OutputDirError, exclusive_output_dir

HOLD_LOCK = """
import sys, time
from dino_fast.output_lock import exclusive_output_dir
with exclusive_output_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _claim(directory: Path) -> None:
    with exclusive_output_dir(directory):
        pass


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(
            OutputDirError, match=rf"in use by another run \(pid {holder.pid} on .*another --output_dir"
        ):
            _claim(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_run_leaves_the_folder_free(tmp_path: Path) -> None:
    holder = _holder(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with exclusive_output_dir(tmp_path / "run") as directory:
        assert f"pid {os.getpid()}" in (directory / ".dino_fast.lock").read_text()


def test_the_same_process_can_take_the_folder_again_after_releasing_it(tmp_path: Path) -> None:
    _claim(tmp_path / "run")
    _claim(tmp_path / "run")


def test_unwritable_parent_is_one_error_naming_the_folder() -> None:
    # sysfs refuses new folders even to root, which CI runs as (a chmod would not stop root).
    with pytest.raises(
        OutputDirError, match=r"cannot write to --output_dir /sys/dino_fast_run: .*a folder you can"
    ):
        _claim(Path("/sys/dino_fast_run"))


def test_a_file_where_the_folder_should_be_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(OutputDirError, match=r"cannot write to --output_dir .*run"):
        _claim(tmp_path / "run")


def test_children_forked_during_the_run_do_not_keep_the_folder_locked(tmp_path: Path) -> None:
    with exclusive_output_dir(tmp_path / "run"):
        child = os.fork()  # like a DataLoader worker that outlives the run
        if child == 0:
            time.sleep(30)
            os._exit(0)
    try:
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from dino_fast.output_lock import exclusive_output_dir\n"
                f"with exclusive_output_dir({str(tmp_path / 'run')!r}): pass",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode == 0, probe.stderr
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
