"""Per-op benchmarks: fused DINO ops against the official formulations, in one run.

    python benchmarks/kernels.py --device cuda --json benchmarks/results/kernels.json
    python benchmarks/kernels.py --device cpu --suites dino_loss ema clip

Each suite lives in its own module (bench_<suite>.py beside this file) exposing
``run(device, *, full) -> list[dict]``: one row per (shape, implementation), with the
median time and, on CUDA, peak extra memory. ``full`` selects the anchor shapes of
docs/design.md; without it a suite uses small shapes that finish in seconds on a CPU. A suite
that fails is reported as a failure row with the reason, never dropped.
"""

from __future__ import annotations

if not __package__:  # `python benchmarks/kernels.py`: rerun as `python -m benchmarks.kernels`
    from as_module import rerun_as_module

    rerun_as_module(__file__)

import argparse
import importlib
import traceback

import torch

from benchmarks import timing
from benchmarks.timing import environment, write_json

SUITES = {
    "dino_loss": "benchmarks.bench_dino_loss",
    "ema": "benchmarks.bench_ema",
    "clip": "benchmarks.bench_clip",
    "vit": "benchmarks.bench_vit",
    "dinov2": "benchmarks.bench_dinov2",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda for the anchor comparisons; cpu runs small shapes unless --full",
    )
    parser.add_argument(
        "--suites", nargs="+", default=list(SUITES), choices=list(SUITES), help="which op families to time"
    )
    parser.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="anchor shapes (default on CUDA) instead of quick CPU-sized ones",
    )
    parser.add_argument("--json", default=None, help="also write every row and the environment here")
    parser.add_argument(
        "--once",
        action="store_true",
        help="call every implementation once, no warm-up (a dry run of the script: the times mean nothing)",
    )
    return parser.parse_args(argv)


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['suite']:<10} {row.get('impl', '-'):<28} FAILED: {row['error']}"
    extra = f"{row['peak_extra_mib']:9.1f} MiB" if row.get("peak_extra_mib") is not None else ""
    rate = f"{row['gbps']:8.1f} GB/s" if row.get("gbps") is not None else ""
    ratio = f"{row['vs_global']:6.2f}x vs global" if row.get("vs_global") is not None else ""
    return (
        f"{row['suite']:<10} {row['impl']:<28} {row['shape']:<34} {row['median_ms']:10.3f} ms "
        f"{rate}{ratio} {extra}"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    full = device.type == "cuda" if args.full is None else args.full
    if args.once:  # before the suites import it
        timed = timing.measure
        timing.measure = lambda fn, *, device, warmup=0, iters=1: timed(fn, device=device, warmup=0, iters=1)
    rows: list[dict] = []
    for suite in args.suites:
        try:
            suite_rows = importlib.import_module(SUITES[suite]).run(device, full=full)
        except Exception as err:  # a broken suite is a result to report, not a reason to stop
            traceback.print_exc()
            suite_rows = [{"error": f"{type(err).__name__}: {err}"}]
        for row in suite_rows:
            row["suite"] = suite
            print(format_row(row), flush=True)
        rows.extend(suite_rows)
        # Written after every suite: a run cut short (a time limit) still leaves what it measured.
        write_json(args.json, {"environment": environment(device), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
