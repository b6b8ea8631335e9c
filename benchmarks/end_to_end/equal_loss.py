"""The equal-loss check: before a variant is timed, its losses over two steps from the shared
weights on the shared batch must match the fp32 official step's within its precision's tolerance."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.end_to_end.context import Context
from benchmarks.end_to_end.inputs import Crops
from benchmarks.end_to_end.official_step import OFFICIAL_FP32
from benchmarks.end_to_end.runners import OfficialFamilyRunner, build_runner
from benchmarks.end_to_end.variants import Variant
from benchmarks.timing import release_memory

# Relative loss tolerance by the precision a variant computes in. fp32 differs from the reference
# only by summation order; fp16 keeps 11 mantissa bits, bf16 8.
CHECK_RTOL = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 5e-3}

CHECK_STEPS = 2  # the first loss checks the forward; the second also the update (clip, AdamW, EMA, center)


@contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 in matmuls and convolutions while the fp32 reference runs."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_losses(runner: Any, batch: Crops, ctx: Context) -> tuple[list[float], bool]:
    """The runner's losses over ``CHECK_STEPS`` steps on ``batch``, and whether a GradScaler
    skipped the first update (inf/nan fp16 gradients while its scale calibrates: the official
    run does the same in its first iterations, so the later losses cannot match then)."""
    prepared = runner.prepare(batch)
    scaler = runner.grad_scaler
    scale_before = None if scaler is None else scaler.get_scale()
    losses = [float(runner.step(prepared, ctx.first_iteration))]
    skipped = scaler is not None and scaler.get_scale() < scale_before
    losses += [float(runner.step(prepared, ctx.first_iteration + i)) for i in range(1, CHECK_STEPS)]
    return losses, skipped


def reference_losses(ctx: Context, batch: Crops) -> list[float]:
    """The official step in fp32 without drop path: what every variant's losses must match.
    Attention runs through SDPA, equal to the explicit form in exact arithmetic (tested), so that
    the fp32 reference does not hold fp32 N x N attention matrices for every block at B=128."""
    reference = Variant(
        "reference", "official step in fp32", dataclasses.replace(OFFICIAL_FP32, attn_impl="sdpa")
    )
    with exact_fp32():
        runner = OfficialFamilyRunner(reference, ctx, drop_path_rate=0.0)
        losses, _ = check_losses(runner, batch, ctx)
    del runner
    release_memory(ctx.device, compiled=False)
    return losses


def compare(
    losses: list[float], reference: list[float], precision: str, skipped_update: bool
) -> dict[str, Any]:
    rtol = CHECK_RTOL[precision]
    # After a skipped update only the first loss (the forward from the shared weights) is comparable.
    compared = 1 if skipped_update else len(losses)
    rel = [abs(a - b) / abs(b) for a, b in zip(losses[:compared], reference[:compared], strict=True)]
    finite = all(math.isfinite(v) for v in losses)
    return {
        "losses": losses,
        "reference": reference,
        "compared_steps": compared,
        "grad_scaler_skipped_first_update": skipped_update,
        "max_rel_diff": max(rel) if finite else None,
        "rtol": rtol,
        "precision": precision,
        "passed": finite and max(rel) <= rtol,
    }


def check_variant(
    variant: Variant, ctx: Context, batch: Crops, reference: list[float], precision: str
) -> dict:
    """Build the variant without drop path, run the check steps, compare with the reference."""
    runner = build_runner(variant, ctx, drop_path_rate=0.0)
    losses, skipped = check_losses(runner, batch, ctx)
    return compare(losses, reference, precision, skipped)
