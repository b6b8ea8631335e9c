"""One variant's result: the equal-loss check, then the timed steps (as it trains: drop path on,
warm-up first, the median of the timed steps), images/s, MFU and peak memory; a variant that fails
anywhere is a result with the reason, never a reason to stop, and one that does not apply to the
architecture (an attention backend for a convnet) is skipped with the reason."""

from __future__ import annotations

import itertools
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.end_to_end.context import Context
from benchmarks.end_to_end.equal_loss import check_variant
from benchmarks.end_to_end.inputs import Crops
from benchmarks.end_to_end.runners import build_runner
from benchmarks.end_to_end.variants import Variant, precision_of, skip_reason
from benchmarks.timing import measure, rate_fields, release_memory


def time_variant(
    variant: Variant, ctx: Context, batch: Crops, timing_batches: Callable[[], Iterator[Any]] | None
) -> dict[str, Any]:
    """Build the variant as it trains (drop path on), then warm up and time it."""
    runner = build_runner(variant, ctx, drop_path_rate=ctx.config.drop_path_rate)
    iterations = itertools.count(ctx.first_iteration)
    if timing_batches is None:
        prepared = runner.prepare(batch)
        fn = lambda: runner.step(prepared, next(iterations))
    else:
        source = timing_batches()
        fn = lambda: runner.step(runner.prepare(next(source)), next(iterations))
    stats = measure(fn, device=ctx.device, warmup=ctx.args.warmup, iters=ctx.args.steps)
    if ctx.device.type == "cuda":
        # measure() resets the peak after the warm-up: this is the steady state of the timed steps.
        stats["peak_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    return stats


def run_variant(
    variant: Variant,
    ctx: Context,
    batch: Crops,
    reference: list[float],
    timing_batches: Callable[[], Iterator[Any]] | None,
    flops_per_image: int,
    peak_tflops: float | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {"name": variant.name, "description": variant.description}
    reason = skip_reason(variant, ctx)
    if reason is not None:
        return {**result, "status": "skipped", "reason": reason}
    try:
        result["precision"] = precision_of(variant, ctx)
        started = time.perf_counter()
        check = result["check"] = check_variant(variant, ctx, batch, reference, result["precision"])
        result["check_s"] = time.perf_counter() - started
        release_memory(ctx.device, variant.compiles)
        if not check["passed"]:
            raise AssertionError(
                f"loss mismatch: {check['losses']} vs fp32 official {check['reference']} "
                f"(max relative difference {check['max_rel_diff']} over the first {check['compared_steps']} "
                f"step(s), tolerance {check['rtol']} for {check['precision']})"
            )
        started = time.perf_counter()
        stats = time_variant(variant, ctx, batch, timing_batches)
        result["build_warmup_and_timing_s"] = time.perf_counter() - started
        rates = rate_fields(stats, ctx.args.batch_size_per_gpu, per="step")
        mfu = None if peak_tflops is None else flops_per_image * rates["images_per_s"] / (peak_tflops * 1e12)
        result.update(status="ok", **rates, steps=stats["iters"], mfu=mfu, peak_gib=stats.get("peak_gib"))
    except Exception as err:  # a failed variant is a result to report, never a reason to stop
        traceback.print_exc()
        result.update(status="failed", error=f"{type(err).__name__}: {err}")
    finally:
        release_memory(ctx.device, variant.compiles)
    return result
