"""Crash-safe checkpoint files and the RNG state that makes a resumed run continue exactly.

A checkpoint is written to a temporary file in the same directory, flushed to disk, and
then renamed over ``checkpoint.pth`` with ``os.replace`` (atomic on POSIX and Windows), so
a process killed mid-write leaves the previous checkpoint whole. Its keys are the official
DINO ones (``student``, ``teacher``, ``optimizer``, ``epoch``, ``args``, ``dino_loss``,
``fp16_scaler``), so the official eval scripts load ``teacher`` from it, plus
``iteration``, ``rng`` and ``sampler``. Everything in it is a tensor or a plain Python
value, so ``torch.load(path, weights_only=True)`` (torch's default since 2.6, and what
the official scripts get when they call ``torch.load`` on a current torch) accepts it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"


class CheckpointWriteError(OSError):
    """Writing a checkpoint (or another atomically saved file) failed; the file it would have
    replaced is untouched."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**30:.1f} GiB free"
        except OSError:
            free = "free space unknown"
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        super().__init__(
            f"could not write {path}: {cause} ({free} on its filesystem; {kept}). "
            "Free some space, or write to a directory on a larger disk."
        )
        self.path = path


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is; not every OS lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


_TEMPORARY_NAME = re.compile(r"^\..+\.tmp\.\d+$")


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries that writes killed mid-way left in ``directory``; return them.

    Call it only while no other process writes there (hold the folder's lock).
    """
    mine = f".tmp.{os.getpid()}"
    stale = [
        p
        for p in Path(directory).glob(".*.tmp.*")
        if _TEMPORARY_NAME.match(p.name) and not p.name.endswith(mine) and p.is_file()
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def _replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is renamed over ``path``.

    On any failure the temporary file is removed and ``path`` is untouched; a failed write (an
    ``OSError``, or the ``RuntimeError`` torch.save's zip writer raises for one, on a full disk
    say) becomes a :class:`CheckpointWriteError` that says so.
    """
    tmp = _temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            raise CheckpointWriteError(path, err) from err
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` such that ``path`` is always either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a finished checkpoint (e.g. to ``checkpoint0020.pth``) with the same guarantee."""
    dst = Path(dst)
    with _replaced_atomically(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded, or does not fit what it is loaded into; the message names
    the file, why, and the fix."""


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint dict without running code from the file.

    Tensors, plain containers and ``argparse.Namespace`` (the ``args`` of official main_dino.py
    checkpoints) load with ``weights_only=True``. Anything else needs the full unpickler, which
    executes code from the file: only with ``allow_pickle=True``, for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is an empty file (a write that never finished?)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        # torch names the first Python object the weights-only unpickler refused; anything else
        # it cannot parse is not a checkpoint at all.
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if refused is None:
            raise CheckpointError(f"checkpoint {path} is damaged: not a torch checkpoint") from err
        raise CheckpointError(
            f"checkpoint {path} holds Python objects beyond tensors ({refused.group(1)}); loading it would "
            "run code from the file. If you trust where it came from, pass --allow_pickle true"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"checkpoint {path} is damaged: truncated or not a torch checkpoint ({str(err).splitlines()[0]})"
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of the floating-point ``tensors`` is finite; checked before a save, so
    a checkpoint is never written from NaN or infinite weights. One host read in all."""
    maxima = [
        torch.linalg.vector_norm(t.detach(), float("inf")).float() for t in tensors if t.is_floating_point()
    ]
    return not maxima or bool(torch.stack(maxima).isfinite().all())  # NaN and inf survive the max


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (if used) CUDA generator states, as plain values."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
            "has_gauss": npst["has_gauss"],
            "gauss": npst["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
