"""DINOv2-family ops benchmark: Sinkhorn-Knopp teacher targets, the class-token DINO loss and the masked
iBOT patch loss (forward + backward), dinov2's eager formulations against every available dino_fast
backend, on the same inputs in one run.

    python benchmarks/bench_dinov2.py --device cpu                 # CPU-sized shapes, seconds
    python benchmarks/bench_dinov2.py --device cuda --json out.json  # dinov2's shapes (K = 65536)

``run(device, *, full) -> list[dict]`` follows benchmarks/kernels.py's suite contract (one row per
(op, shape, implementation): median_ms, p10/p90, peak_extra_mib, vs_dinov2 = the speed ratio to
dinov2's eager code in the same run), so kernels.py's SUITES runs it as
``--suites dinov2``. Memory: on CUDA the allocator's peak beyond what was allocated before the call; on a
CPU the peak of the tensors the call allocates, from the profiler's memory records (the gradient
included). Triton is timed on CUDA only.
"""

from __future__ import annotations

if not __package__:  # `python benchmarks/bench_dinov2.py`: rerun as `python -m benchmarks.bench_dinov2`
    from as_module import rerun_as_module

    rerun_as_module(__file__)

import argparse
import gc
import json
import traceback
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.timing import environment, measure, write_json
from dino_fast.official.dinov2 import dinov2_dino_loss, dinov2_ibot_forward_masked, dinov2_sinkhorn_knopp
from dino_fast.ops.backends import available_backends
from dino_fast.ops.cross_entropy import weighted_cross_entropy
from dino_fast.ops.sinkhorn import sinkhorn_knopp

TEACHER_TEMP = 0.07
STUDENT_TEMP = 0.1


def cpu_peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak of the tensors ``fn()`` allocates on the CPU, in MiB, from the profiler's memory records:
    every op's own allocations minus frees, summed in start order (a peak at op granularity; the
    kernels' per-thread row buffers, K floats each, are not tensors and not counted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def _time(fn: Callable[[], object], device: torch.device) -> dict:
    result = measure(
        fn, device=device, warmup=2 if device.type == "cpu" else 5, iters=7 if device.type == "cpu" else 30
    )
    if device.type == "cpu":
        result["peak_extra_mib"] = cpu_peak_extra_mib(fn)
    return result


def _backends(device: torch.device) -> list[str]:
    usable = [name for name, reason in available_backends(device).items() if reason is None]
    return [name for name in usable if not (name == "triton" and device.type != "cuda")]


def _sinkhorn_rows(device: torch.device, rows: int, K: int, dtype: torch.dtype) -> list[dict]:
    teacher = torch.randn(rows, K, device=device, dtype=dtype)
    shape = f"sinkhorn B={rows} K={K} {str(dtype).removeprefix('torch.')}"
    impls: dict[str, Callable[[], object]] = {
        "dinov2 eager": lambda: dinov2_sinkhorn_knopp(teacher.float(), TEACHER_TEMP)
    }
    for backend in _backends(device):
        impls[f"dino_fast {backend}"] = lambda b=backend: sinkhorn_knopp(teacher, TEACHER_TEMP, backend=b)
    return [{"impl": name, "shape": shape} | _time(fn, device) for name, fn in impls.items()]


def _dino_rows(device: torch.device, crops: int, batch: int, K: int, dtype: torch.dtype) -> list[dict]:
    students = [torch.randn(batch, K, device=device, dtype=dtype).requires_grad_() for _ in range(crops)]
    targets = list(torch.softmax(torch.randn(2 * batch, K, device=device) / TEACHER_TEMP, -1).chunk(2))
    shape = f"dino fwd+bwd {crops}x{batch} K={K} {str(dtype).removeprefix('torch.')}"

    def eager():
        dinov2_dino_loss(students, targets, STUDENT_TEMP).backward()

    def fused(backend: str):
        target = targets[0] + targets[1]  # what dino_fast.dinov2.DINOLoss.forward does for two targets
        weights = torch.full((batch,), 1.0 / batch, device=device)
        total = sum(
            weighted_cross_entropy(s, target, weights, student_temp=STUDENT_TEMP, backend=backend)
            for s in students
        )
        total.backward()

    impls: dict[str, Callable[[], object]] = {"dinov2 eager": eager}
    for backend in _backends(device):
        impls[f"dino_fast {backend}"] = lambda b=backend: fused(b)
    return [{"impl": name, "shape": shape} | _time(fn, device) for name, fn in impls.items()]


def _ibot_rows(device: torch.device, masked: int, n_images: int, K: int, dtype: torch.dtype) -> list[dict]:
    student = torch.randn(masked, K, device=device, dtype=dtype).requires_grad_()
    target = torch.softmax(torch.randn(masked, K, device=device) / TEACHER_TEMP, -1)
    weights = torch.rand(masked, device=device) / 50
    # With masks_weight given, dinov2 reads only the masks' row count (the number of images).
    masks = torch.zeros(n_images, 0, dtype=torch.bool, device=device)
    shape = f"ibot masked fwd+bwd M={masked} K={K} {str(dtype).removeprefix('torch.')}"

    def dinov2_eager() -> None:
        dinov2_ibot_forward_masked(
            student.float(), target, masks, STUDENT_TEMP, masks_weight=weights
        ).backward()

    impls: dict[str, Callable[[], object]] = {"dinov2 eager": dinov2_eager}
    for backend in _backends(device):
        impls[f"dino_fast {backend}"] = lambda b=backend: (
            weighted_cross_entropy(student, target, weights / n_images, student_temp=STUDENT_TEMP, backend=b)
        ).backward()
    return [{"impl": name, "shape": shape} | _time(fn, device) for name, fn in impls.items()]


def run(device: torch.device, *, full: bool) -> list[dict]:
    """One row per (op, shape, implementation); a failing implementation is an ``error`` row."""
    if full:  # dinov2 ViT-L/14 per-GPU shapes: 2 x 64 teacher rows, 8 local crops, ~50% of 256 patches masked
        cases = [
            (_sinkhorn_rows, (128, 65536, torch.float32)),
            (_dino_rows, (8, 64, 65536, torch.bfloat16)),
            (_ibot_rows, (64 * 128, 64, 65536, torch.bfloat16)),
        ]
    else:
        cases = [
            (_sinkhorn_rows, (128, 16384, torch.float32)),
            (_dino_rows, (8, 16, 16384, torch.float32)),
            (_ibot_rows, (1024, 16, 8192, torch.float32)),
        ]
    rows: list[dict] = []
    for make, args in cases:
        try:
            case_rows = make(device, *args)
        except Exception as err:
            traceback.print_exc()
            case_rows = [{"impl": make.__name__, "error": f"{type(err).__name__}: {err}"}]
        baseline = next((r for r in case_rows if r.get("impl") == "dinov2 eager" and "median_ms" in r), None)
        for row in case_rows:
            if baseline is not None and "median_ms" in row:
                row["vs_dinov2"] = baseline["median_ms"] / row["median_ms"]
        rows.extend(case_rows)
        gc.collect()
    return rows


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row.get('impl', '-'):<18} FAILED: {row['error']}"
    memory = f"{row['peak_extra_mib']:9.1f} MiB" if row.get("peak_extra_mib") is not None else ""
    return (
        f"{row['shape']:<42} {row['impl']:<18} {row['median_ms']:10.2f} ms "
        f"{row.get('vs_dinov2', float('nan')):6.2f}x vs dinov2 {memory}"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=None, help="dinov2's shapes")
    parser.add_argument("--json", default=None, help="also write every row and the environment here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    full = device.type == "cuda" if args.full is None else args.full
    rows = run(device, full=full)
    env = environment(device)
    print(json.dumps(env))
    for row in rows:
        print(format_row(row))
    write_json(args.json, {"environment": env, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
