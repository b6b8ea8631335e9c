"""The training command line: parse the flags, train, print where the results are."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dino_fast import distributed
from dino_fast.checkpoint import CHECKPOINT_NAME, CheckpointWriteError
from dino_fast.train.command_line import parse_args
from dino_fast.train.config import ConfigError
from dino_fast.train.knn_hook import knn_evaluation
from dino_fast.train.loop import NonFiniteLossError
from dino_fast.train.run import TrainResult, train

logger = logging.getLogger(__name__)


def _setup_logging(rank: int) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dino_fast.train``: train as the flags say; returns the exit status."""
    config = parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    _setup_logging(rank)
    try:
        result = train(config, on_finish=knn_evaluation if config.eval_knn else None)
    except NonFiniteLossError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        ckpt = Path(config.output_dir) / CHECKPOINT_NAME
        if ckpt.is_file():
            logger.error("interrupted; %s is intact: run the same command again to resume from it", ckpt)
        else:
            logger.error("interrupted before the first checkpoint; nothing to resume from")
        return 130
    except (ConfigError, distributed.DistributedSetupError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    except CheckpointWriteError as exc:
        logger.error("%s Then run the same command again: it resumes from the last checkpoint written.", exc)
        return 1
    if rank == 0:
        _print_final_summary(result)
    return 0


def _print_final_summary(result: TrainResult) -> None:
    lines = [
        f"done: iteration {result.iteration} in {result.seconds:.1f}s"
        + (f", {result.images_per_s:.1f} images/s" if result.images_per_s else "")
        + (f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""),
        f"checkpoint: {result.checkpoint}",
        f"logs: {result.output_dir / 'log.jsonl'} (per interval), "
        f"{result.output_dir / 'log.txt'} (per epoch)",
    ]
    for key, value in result.extra.items():
        lines.append(f"{key}: {value}")
    print("\n".join(lines))  # the CLI's own summary on stdout
