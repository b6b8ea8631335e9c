"""Checkpoint files: atomic replacement, weights-only loading, RNG round trips."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_fast import checkpoint as ckpt_mod
from dino_fast.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    all_finite,
    atomic_copy,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
)


def _state(value: float) -> dict:
    return {"teacher": {"w": torch.full((3, 5), value)}, "epoch": int(value), "args": {"lr": 0.1}}


def test_atomic_save_roundtrip_weights_only(tmp_path):
    path = atomic_save(_state(1.0), tmp_path / "sub" / "checkpoint.pth")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["teacher"]["w"], torch.ones(3, 5)) and loaded["epoch"] == 1
    assert os.listdir(path.parent) == ["checkpoint.pth"]  # no temporary left behind


@pytest.mark.parametrize("where", ["during_serialization", "before_rename"])
def test_crash_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "checkpoint.pth"
    atomic_save(_state(1.0), path)

    if where == "during_serialization":
        # A kill in the middle of torch.save: some bytes reach the temporary file, then the process dies.
        def dying_save(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 partial zip")
            raise KeyboardInterrupt("simulated kill")

        monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    else:

        def dying_replace(src, dst):
            raise OSError("simulated crash before the rename")

        monkeypatch.setattr(ckpt_mod.os, "replace", dying_replace)

    with pytest.raises((KeyboardInterrupt, OSError)):
        atomic_save(_state(2.0), path)
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["teacher"]["w"], torch.ones(3, 5))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_full_disk_is_a_clear_error_and_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save(_state(1.0), path)

    def full_disk_save(obj, f, *args, **kwargs):
        # what torch.save raises when the disk fills up halfway through the zip
        f.write(b"PK\x03\x04 partial zip")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk_save)
    with pytest.raises(CheckpointWriteError) as exc:
        atomic_save(_state(2.0), path)
    message = str(exc.value)
    assert str(path) in message and "file write failed" in message and "GiB free" in message
    assert "previous checkpoint.pth is intact" in message and "larger disk" in message
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]

    # a first save that fails says so instead of claiming a previous file
    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk_save)
    with pytest.raises(CheckpointWriteError, match=r"no fresh\.pth was written"):
        atomic_save(_state(2.0), tmp_path / "fresh.pth")
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_failed_epoch_copy_is_a_clear_error(tmp_path, monkeypatch):
    src = atomic_save(_state(3.0), tmp_path / "checkpoint.pth")

    def full_disk_copy(a, b):
        Path(b).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.shutil, "copyfile", full_disk_copy)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint0003\.pth.*No space left on device"):
        atomic_copy(src, tmp_path / "checkpoint0003.pth")
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_atomic_copy(tmp_path):
    src = atomic_save(_state(3.0), tmp_path / "checkpoint.pth")
    dst = atomic_copy(src, tmp_path / "checkpoint0003.pth")
    assert load_checkpoint(dst)["epoch"] == 3


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        load_checkpoint(tmp_path / "list.pth")


def test_load_checkpoint_accepts_official_namespace_args_without_full_unpickling(tmp_path):
    import argparse

    # The official main_dino.py pickles an argparse.Namespace under "args", next to tensors.
    args = argparse.Namespace(lr=0.1, arch="vit_small", global_crops_scale=(0.4, 1.0), data_path=None)
    torch.save(
        {
            "teacher": {"w": torch.ones(2)},
            "args": args,
            "epoch": 4,
            "dino_loss": {"center": torch.zeros(1, 8)},
        },
        tmp_path / "official.pth",
    )
    ckpt = load_checkpoint(tmp_path / "official.pth")
    assert ckpt["epoch"] == 4 and ckpt["args"] == args


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["DINO_FAST_TEST_MARKER"]),))


def test_load_checkpoint_refuses_code_unless_allowed(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("DINO_FAST_TEST_MARKER", str(marker))
    torch.save({"epoch": 1, "payload": _RunsCodeWhenUnpickled()}, tmp_path / "hostile.pth")
    with pytest.raises(CheckpointError, match=r"hostile\.pth.*run code.*--allow_pickle true"):
        load_checkpoint(tmp_path / "hostile.pth")
    assert not marker.exists()
    load_checkpoint(tmp_path / "hostile.pth", allow_pickle=True)  # the explicit opt-in
    assert marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "text"])
def test_damaged_checkpoint_is_one_error_naming_the_file(tmp_path, damage):
    path = atomic_save(_state(2.0), tmp_path / "checkpoint.pth")
    data = path.read_bytes()
    damaged = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "garbage": bytes(range(256)) * 8,
        "text": b"not a checkpoint\n",
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint\.pth is (an empty|damaged|not a)"):
        load_checkpoint(path)


def test_rng_state_roundtrip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state(torch.device("cpu"))
    expected = (random.random(), np.random.rand(), torch.rand(4), np.random.randn())
    atomic_save({"rng": state}, tmp_path / "rng.pth")
    # Move every generator elsewhere, then restore from the file.
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"], torch.device("cpu"))
    got = (random.random(), np.random.rand(), torch.rand(4), np.random.randn())
    assert got[0] == expected[0] and got[1] == expected[1] and got[3] == expected[3]
    assert torch.equal(got[2], expected[2])


def test_stale_temporaries_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    atomic_save(_state(1.0), tmp_path / "checkpoint.pth")
    stale = [tmp_path / ".checkpoint.pth.tmp.12345", tmp_path / ".checkpoint0010.pth.tmp.999"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    kept = [
        tmp_path / "checkpoint.pth",
        tmp_path / ".hidden_notes",
        tmp_path / "run.tmp.1",
        tmp_path / "log.txt",
    ]
    for path in kept[1:]:
        path.write_text("keep me")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_one_bad_value_among_many_tensors(dtype):
    tensors = [torch.randn(5, 7).to(dtype), torch.randn(300).to(dtype), torch.arange(4)]  # ints ignored
    assert all_finite(tensors) and all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = [t.clone() for t in tensors]
        poisoned[1][123] = bad
        assert not all_finite(poisoned)
