"""The variants a throughput run can time: the official step, its tuned forms, and dino_fast's
Trainer.step in several settings (docs/benchmarks.md describes each)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.end_to_end.context import Context
from benchmarks.end_to_end.official_step import OFFICIAL, TUNED, StepOptions
from dino_fast.models import is_convnet


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    options: StepOptions | None = None  # the official-step family (end_to_end/official_step.py)
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of a dino_fast variant

    @property
    def is_dino_fast(self) -> bool:
        return self.options is None

    @property
    def vit_only(self) -> bool:
        """What it changes is the ViT's attention, which a convnet does not have."""
        return "attn_backend" in self.overrides

    @property
    def compiles(self) -> bool:
        return bool(self.overrides.get("compile")) or (
            self.options is not None and self.options.compile_backbones
        )


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "official", "official DINO step: fp16+GradScaler, explicit attention, per-param loops", OFFICIAL
        ),
        Variant("tuned", "official step + SDPA, bf16, fused AdamW, foreach clip/EMA", TUNED),
        Variant(
            "tuned+compile",
            "tuned + torch.compile of both backbones",
            dataclasses.replace(TUNED, compile_backbones=True),
        ),
        Variant("dino_fast", "dino_fast Trainer.step, default settings"),
        Variant("dino_fast+compile", "dino_fast Trainer.step, compile=True", overrides={"compile": True}),
        Variant(
            "dino_fast+cudagraphs",
            "dino_fast Trainer.step, compile mode reduce-overhead (CUDA graphs)",
            overrides={"compile": True, "compile_mode": "reduce-overhead"},
        ),
        Variant(
            "dino_fast+fp16", "dino_fast Trainer.step, fp16 + GradScaler", overrides={"precision": "fp16"}
        ),
        Variant(
            "dino_fast+explicit",
            "dino_fast Trainer.step, the official explicit attention (what the attention kernels buy)",
            overrides={"attn_backend": "explicit"},
        ),
    )
}
DEFAULT_VARIANTS = (
    "official",
    "tuned",
    "tuned+compile",
    "dino_fast",
    "dino_fast+compile",
    "dino_fast+cudagraphs",
)


def official_options(variant: Variant, device: torch.device) -> StepOptions:
    assert variant.options is not None
    if device.type != "cuda" and variant.options.amp_dtype == torch.float16:
        # The official code turns autocast on only with a (CUDA) GradScaler; on a CPU it trains in fp32.
        return dataclasses.replace(variant.options, amp_dtype=None, grad_scaler=False)
    return variant.options


def precision_of(variant: Variant, ctx: Context) -> str:
    if variant.is_dino_fast:
        return dataclasses.replace(ctx.config, **variant.overrides).resolved_precision()
    dtype = official_options(variant, ctx.device).amp_dtype
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def skip_reason(variant: Variant, ctx: Context) -> str | None:
    """Why ``variant`` has nothing to measure in this run, in one line; None when it applies."""
    if variant.vit_only and is_convnet(ctx.config.arch):
        return f"it changes the ViT's attention backend, and {ctx.config.arch} is a convnet"
    return None
