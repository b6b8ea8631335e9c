"""How a variant runs: built from the shared weights, fed a batch, stepped at an iteration. The
official family runs on end_to_end.official_step, the dino_fast variants on Trainer.step."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from benchmarks.end_to_end.context import STEPS_PER_EPOCH, Context
from benchmarks.end_to_end.inputs import crop_list
from benchmarks.end_to_end.official_step import TrainStep
from benchmarks.end_to_end.variants import Variant, official_options
from benchmarks.timing import cudnn_autotuner


class OfficialFamilyRunner:
    """A variant built on end_to_end.official_step.TrainStep."""

    def __init__(self, variant: Variant, ctx: Context, drop_path_rate: float) -> None:
        self.ctx = ctx
        self.options = official_options(variant, ctx.device)
        self.train_step = TrainStep(
            ctx.model_spec(drop_path_rate),
            self.options,
            ctx.state_dict,
            ctx.device,
            ctx.config.ncrops,
            loss=ctx.loss_spec(),
            optimizer=ctx.config.optimizer,
        )

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self.train_step.scaler

    def prepare(self, batch: Any) -> list[torch.Tensor]:
        views = crop_list(batch, self.ctx.config.batch_size_per_gpu)
        if self.options.amp_dtype is None and views[0].dtype != torch.float32:
            views = [v.float() for v in views]  # without autocast the weights are fp32
        return views

    def step(self, prepared: list[torch.Tensor], iteration: int) -> float:
        # main_dino.py's cudnn.benchmark, scoped so that dino_fast runs with its own setting.
        with cudnn_autotuner():
            return self.train_step.step(prepared, self.ctx.hyper(iteration))


class DinoFastRunner:
    """A variant that runs ``dino_fast.train.Trainer.step`` as training does."""

    def __init__(self, variant: Variant, ctx: Context, drop_path_rate: float) -> None:
        from dino_fast.data import MultiCropBatch
        from dino_fast.train import DATA_DTYPES, Trainer

        self._batch_type = MultiCropBatch
        config = dataclasses.replace(ctx.config, drop_path_rate=drop_path_rate, **variant.overrides)
        config.validate()
        self.trainer = Trainer(config, ctx.device, steps_per_epoch=STEPS_PER_EPOCH)
        # Official names on both sides, so the shared weights load strictly.
        self.trainer.student.load_state_dict(ctx.state_dict)
        self.trainer.teacher.load_state_dict(ctx.state_dict)
        self.input_dtype = DATA_DTYPES[config.resolved_precision()]

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self.trainer.scaler

    def prepare(self, batch: Any) -> Any:
        # dino_fast's loaders deliver crops in the compute dtype; the synthetic batch is fp32.
        local = batch.local_crops
        return self._batch_type(
            global_crops=batch.global_crops.to(self.input_dtype),
            local_crops=None if local is None else local.to(self.input_dtype),
        )

    def step(self, prepared: Any, iteration: int) -> torch.Tensor:
        return self.trainer.step(prepared, iteration)


def build_runner(
    variant: Variant, ctx: Context, drop_path_rate: float
) -> OfficialFamilyRunner | DinoFastRunner:
    if variant.is_dino_fast:
        return DinoFastRunner(variant, ctx, drop_path_rate)
    return OfficialFamilyRunner(variant, ctx, drop_path_rate)
