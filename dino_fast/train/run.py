"""One training run: set up the processes, data and trainer, resume, run the loop, say where it ended."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino_fast import distributed, models
from dino_fast.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
)
from dino_fast.output_lock import OutputDirError, exclusive_output_dir
from dino_fast.train.config import ConfigError, TrainConfig
from dino_fast.train.loader import build_loader, resolve_data_path
from dino_fast.train.loop import TrainingLoop
from dino_fast.train.metrics import AsyncMetrics
from dino_fast.train.progress import ProgressReporter
from dino_fast.train.summary import run_summary
from dino_fast.train.trainer import Trainer
from dino_fast.watchdog import StallWatchdog

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    trainer: Trainer
    output_dir: Path
    checkpoint: Path | None
    iteration: int
    last_loss: float | None
    stopped_early: bool
    seconds: float
    images_per_s: float | None
    dataset_size: int
    data_root: Path | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def train(
    config: TrainConfig,
    *,
    on_finish: Callable[[TrainResult], None] | None = None,
) -> TrainResult:
    """Run (or resume) a DINO training as ``config`` says; returns where it ended.

    ``on_finish(result)`` runs on every rank after the last checkpoint is written and before the
    process group is torn down (e.g. the demo's k-NN evaluation of the teacher).
    """
    config.validate()
    config = dataclasses.replace(config, data=config.resolved_data())
    info = distributed.init_distributed(config.device, timeout_minutes=config.dist_timeout_minutes)
    try:
        result = _train(config, info)
        if on_finish is not None:
            on_finish(result)
        return result
    finally:
        distributed.cleanup()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_data(config: TrainConfig, info: distributed.DistInfo) -> tuple[Path | None, Any]:
    """The data folder (None for synthetic data) and this rank's loader."""
    # Rank 0 prepares the data (the demo builds its folder once); every rank learns the outcome,
    # so a failure stops all of them instead of leaving the others waiting in a collective.
    data_root, error = None, None
    if info.is_main:
        try:
            data_root = resolve_data_path(config)
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    data_root, error = distributed.broadcast_object((data_root, error))
    if error is not None:
        raise ConfigError(f"cannot prepare the training data: {error}")
    try:
        loader = build_loader(config, info, data_root)
    except (OSError, ValueError) as exc:
        where = "synthetic data" if data_root is None else str(data_root)
        raise ConfigError(f"--data {config.data} cannot read {where}: {exc}") from exc
    if len(loader) < 1:
        raise ConfigError(
            f"the data set has {getattr(loader, 'dataset_size', '?')} images, fewer than one step of "
            f"{config.batch_size_per_gpu} x {info.world_size} processes (the last partial batch is "
            "dropped, as in the official code): lower --batch_size_per_gpu or add images"
        )
    return data_root, loader


# The flags that decide the shapes of the weights a checkpoint holds.
MODEL_FLAGS = ("arch", "patch_size", "out_dim", "use_bn_in_head", "norm_last_layer")


def _check_same_model(config: TrainConfig, ckpt: dict[str, Any], ckpt_path: Path) -> None:
    stored = ckpt.get("args")
    stored = vars(stored) if isinstance(stored, argparse.Namespace) else stored
    if not isinstance(stored, dict):
        return  # no record of the flags: the strict state-dict load still checks every shape
    # A convnet has no patches: its --patch_size is not part of its weights.
    flags = [f for f in MODEL_FLAGS if not (f == "patch_size" and models.is_convnet(config.arch))]
    differ = [name for name in flags if name in stored and stored[name] != getattr(config, name)]
    if differ:
        theirs = " ".join(f"--{name} {stored[name]}" for name in differ)
        ours = " ".join(f"--{name} {getattr(config, name)}" for name in differ)
        raise ConfigError(
            f"{ckpt_path} was trained with {theirs}, but this run asks for {ours}: pass the checkpoint's "
            "values to resume it, or start a new run with another --output_dir (or --no-resume)"
        )


def _resume(config: TrainConfig, info: distributed.DistInfo, trainer: Trainer, ckpt_path: Path) -> int:
    """Load ``ckpt_path`` if the run resumes; returns the iteration to start at."""
    if not (config.resume and ckpt_path.is_file()):
        if ckpt_path.is_file() and info.is_main:
            logger.warning("--no-resume: starting over; %s will be overwritten", ckpt_path)
        # Different drop-path draws on each rank from here on (the init before is shared).
        _seed_everything(config.seed + info.rank)
        return 0
    try:
        ckpt = load_checkpoint(ckpt_path, map_location=info.device, allow_pickle=config.allow_pickle)
    except CheckpointError as exc:
        raise CheckpointError(
            f"cannot resume: {exc}. To start over instead, pass --no-resume (it will be overwritten) "
            "or move the file away"
        ) from exc
    _check_same_model(config, ckpt, ckpt_path)
    start_iteration = trainer.load_state_dict(ckpt)
    rng = ckpt.get("rng")
    if isinstance(rng, list) and len(rng) == info.world_size and start_iteration == ckpt.get("iteration"):
        restore_rng_state(rng[info.rank], info.device)
    else:
        _seed_everything(config.seed + 1000 * info.rank + start_iteration)
        if info.is_main:
            logger.warning(
                "checkpoint RNG state not usable here (other world size or epoch restart); reseeded"
            )
    if info.is_main:
        logger.info("resumed from %s at iteration %d (epoch %d)", ckpt_path, start_iteration, ckpt["epoch"])
    return start_iteration


def _claim_output_dir(out_dir: Path, info: distributed.DistInfo, stack: contextlib.ExitStack) -> None:
    """Rank 0 holds the folder's lock for the run and removes what killed writes left; every rank
    learns whether that worked, so a refusal stops all of them."""
    error = None
    if info.is_main:
        try:
            stack.enter_context(exclusive_output_dir(out_dir))
        except OutputDirError as exc:
            error = str(exc)
        else:
            stale = remove_stale_temporaries(out_dir)
            if stale:
                logger.warning(
                    "removed %d temporary file(s) of interrupted checkpoint writes in %s", len(stale), out_dir
                )
    error = distributed.broadcast_object(error)
    if error is not None:
        raise OutputDirError(error)


def _train(config: TrainConfig, info: distributed.DistInfo) -> TrainResult:
    with contextlib.ExitStack() as stack:
        out_dir = Path(config.output_dir)
        _claim_output_dir(out_dir, info, stack)
        watchdog = StallWatchdog.for_process_group(stall_s=config.dist_timeout_minutes * 30.0)
        if watchdog is not None:
            stack.enter_context(watchdog)
        return _train_in(config, info, out_dir, watchdog)


def _train_in(
    config: TrainConfig, info: distributed.DistInfo, out_dir: Path, watchdog: StallWatchdog | None
) -> TrainResult:
    ckpt_path = out_dir / CHECKPOINT_NAME

    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official code (the patch-embedding conv)
    _seed_everything(config.seed)
    data_root, loader = _prepare_data(config, info)
    trainer = Trainer(
        config, info.device, world_size=info.world_size, rank=info.rank, steps_per_epoch=len(loader)
    )
    start_iteration = _resume(config, info, trainer, ckpt_path)
    total = trainer.total_iterations
    end_iteration = total if config.max_steps is None else min(total, config.max_steps)
    if info.is_main:
        logger.info(
            "%s", run_summary(config, info, trainer, loader, data_root, start_iteration, end_iteration)
        )

    reporter = ProgressReporter(
        total_iterations=end_iteration,
        start_iteration=start_iteration,
        steps_per_epoch=trainer.steps_per_epoch,
        jsonl_path=out_dir / "log.jsonl",
        enabled=info.is_main,
    )
    metrics = AsyncMetrics(info.device, config.batch_size_per_gpu * info.world_size)
    loop = TrainingLoop(config, info, trainer, reporter, metrics, out_dir, loader, watchdog)
    loop.last_saved_iteration = start_iteration if start_iteration else None
    start_wall = time.perf_counter()
    try:
        loop.run(start_iteration, end_iteration)
    finally:
        reporter.close()
    return TrainResult(
        trainer=trainer,
        output_dir=out_dir,
        checkpoint=ckpt_path if ckpt_path.is_file() else None,
        iteration=loop.iteration,
        last_loss=loop.last_loss,
        stopped_early=loop.iteration < end_iteration,
        seconds=time.perf_counter() - start_wall,
        images_per_s=loop.images_per_s(),
        dataset_size=int(getattr(loader, "dataset_size", 0) or 0),
        data_root=data_root,
    )
