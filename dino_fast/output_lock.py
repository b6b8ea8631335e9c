"""One run per output folder: an advisory lock that names the process holding it.

Two runs writing the same ``--output_dir`` would interleave their logs and overwrite each
other's checkpoints. The first run holds an exclusive POSIX record lock (``lockf``) on
``.dino_fast.lock`` in the folder for its whole life; the kernel drops it when the process
ends, however it ends, so a killed run never leaves the folder locked. Unlike ``flock``, the
lock is not shared with forked children (DataLoader workers), which may outlive the run.
The lock file's text says who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from dino_fast.errors import UserError

LOCK_NAME = ".dino_fast.lock"


class OutputDirError(UserError, OSError):
    """The output folder cannot be used; the message names it, why, and what to do."""


@contextlib.contextmanager
def exclusive_output_dir(directory: str | os.PathLike[str], flag: str = "--output_dir") -> Iterator[Path]:
    """Create ``directory`` if needed and hold it for this process until the block ends."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputDirError(
            f"cannot write to {flag} {directory}: {err.strerror or err}; pass a folder you can write to"
        ) from err
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that did not say"
            raise OutputDirError(
                f"{flag} {directory} is in use by another run ({holder}): wait for it to end, stop it, "
                f"or pass another {flag}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n".encode(), 0)
        yield directory
    finally:
        os.close(fd)  # closing the descriptor releases the lock
