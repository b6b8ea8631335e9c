"""The training command: parse the flags, train, print where the results are."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dino_fast.checkpoint import CHECKPOINT_NAME, CheckpointWriteError
from dino_fast.errors import UserError, run_command
from dino_fast.train.command_line import parse_args
from dino_fast.train.knn_hook import knn_evaluation
from dino_fast.train.run import TrainResult, train


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dino_fast.train`` (and ``dino-fast-train``): train as the flags say; the exit status.

    A bad flag exits with argparse's status 2; a failure the user can fix ends in one line
    ``<command>: error: <message>`` and status 1, Ctrl-C in 130, each saying how to resume.
    """
    return run_command(train_from_command_line, argv)


def train_from_command_line(argv: Sequence[str] | None = None) -> TrainResult:
    """The command's work: raises what :func:`main` reports."""
    config = parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    _setup_logging(rank)
    checkpoint = Path(config.output_dir) / CHECKPOINT_NAME
    try:
        result = train(config, on_finish=knn_evaluation if config.eval_knn else None)
    except KeyboardInterrupt as exc:
        if checkpoint.is_file():
            raise KeyboardInterrupt(f"{checkpoint} is intact: run the same command again to resume") from exc
        raise KeyboardInterrupt("before the first checkpoint; nothing to resume from") from exc
    except CheckpointWriteError as exc:
        raise UserError(
            f"{exc} Then run the same command again: it resumes from the last checkpoint written."
        ) from exc
    if rank == 0:
        print(final_summary(result))  # the command's own summary, on stdout
    return result


def _setup_logging(rank: int) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def final_summary(result: TrainResult) -> str:
    """Where the run ended, and where its checkpoint and logs are."""
    lines = [
        f"done: iteration {result.iteration} in {result.seconds:.1f}s"
        + (f", {result.images_per_s:.1f} images/s" if result.images_per_s else "")
        + (f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""),
        f"checkpoint: {result.checkpoint}",
        f"logs: {result.output_dir / 'log.jsonl'} (per interval), "
        f"{result.output_dir / 'log.txt'} (per epoch)",
    ]
    lines += [f"{key}: {value}" for key, value in result.extra.items()]
    return "\n".join(lines)
