"""Every command ends an expected failure with one line naming the problem, and exit status 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_fast.errors import run_command
from tests.helpers.photos import make_image_folder


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    make_image_folder(root / "data" / "train", per_class=1)
    make_image_folder(root / "data" / "val", per_class=1)
    (root / "empty.pth").write_bytes(b"")
    (root / "text.pth").write_text("not a checkpoint")
    torch.save(
        {"teacher": {"backbone.x": torch.ones(1)}, "args": {"arch": "vit_tiny", "patch_size": 16}},
        root / "foreign.pth",
    )
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a signature and nothing else
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "case", "says"),
    [
        ("dino_fast.eval.knn", "empty.pth", r"empty\.pth is an empty file"),
        ("dino_fast.eval.knn", "text.pth", r"text\.pth is damaged"),
        ("dino_fast.eval.linear", "missing.pth", r"missing\.pth does not exist"),
        ("dino_fast.eval.knn", "foreign.pth", r"does not match the model"),
        ("dino_fast.visualize", "broken.png", r"broken\.png is not a usable image"),
    ],
)
def test_eval_commands_end_bad_input_with_one_line(
    bad_inputs: Path, command: str, case: str, says: str
) -> None:
    if command == "dino_fast.visualize":
        argv = [
            "--image_path",
            str(bad_inputs / case),
            "--arch",
            "vit_tiny",
            "--output_dir",
            str(bad_inputs / "out"),
        ]
    else:
        argv = ["--pretrained_weights", str(bad_inputs / case), "--data_path", str(bad_inputs / "data")]
        argv += ["--output_dir", str(bad_inputs / "out")] if command.endswith("linear") else []
    line = _one_error_line(_run("-m", command, *argv))
    assert re.search(says, line), line


def test_run_command_shows_the_traceback_on_request(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def fails(argv: object) -> None:
        raise FileNotFoundError("data folder /x does not exist:\n pass --data_path")

    assert run_command(fails) == 1
    assert capsys.readouterr().err.endswith("error: data folder /x does not exist: pass --data_path\n")
    monkeypatch.setenv("DINO_FAST_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        run_command(fails)


def test_run_command_keeps_the_traceback_of_a_bug() -> None:
    def buggy(argv: object) -> None:
        raise KeyError("a bug, not a bad input")

    with pytest.raises(KeyError):
        run_command(buggy)
