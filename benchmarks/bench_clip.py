"""Gradient clipping benchmark: the official per-parameter rule with its host syncs, the same rule
computed on the device (dino_fast's ``clip_gradients_``, what training runs), and the global-norm
clip (``clip_grad_norm_(foreach=True)``, ``--clip_grad_mode global``), in the same run.

    python benchmarks/kernels.py --suites clip --device cuda         # ViT-S/16 + DINO head, 44.0M params
    python benchmarks/kernels.py --suites clip --device cpu          # small set, seconds

Every parameter's gradient has norm 1, below the threshold 3.0 as in a typical DINO step (the
largest per-parameter norm of the first steps in tests/official/test_official_fidelity.py is about 2), so
the official code multiplies nothing and pays only for the norms and two host syncs per
parameter; the sync-free rule always multiplies (by 1 where nothing is clipped). Each
implementation works on its own copy of the gradients. ``vs_global`` is the speed ratio to the
global-norm clip measured in the same run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from benchmarks.bench_ema import FULL_CONFIG, SMALL_CONFIG, ParameterSet, vit_dino_shapes
from benchmarks.timing import measure
from dino_fast.official.training import clip_gradients as official_clip_gradients
from dino_fast.train import clip_gradients_

CLIP = 3.0  # the official --clip_grad default


def _with_unit_gradients(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.grad = torch.ones_like(p) / p.numel() ** 0.5
    return module


def run(
    device: torch.device, *, full: bool, warmup: int = 5, iters: int = 30, rounds: int | None = None
) -> list[dict]:
    """Rows for every implementation; ``rounds`` (default 1 on CUDA, 3 on CPU) interleaves them in
    round-robin passes, as bench_ema does, so that a shared CPU's drifting load hits all alike."""
    rounds = (1 if device.type == "cuda" else 3) if rounds is None else rounds
    shapes = vit_dino_shapes(**(FULL_CONFIG if full else SMALL_CONFIG))
    models = {
        impl: _with_unit_gradients(ParameterSet(shapes, torch.float32, device, seed=0))
        for impl in ("official", "sync-free", "global")
    }
    n_params = sum(p.numel() for p in models["official"].parameters())
    shape = f"{len(shapes)} tensors, {n_params / 1e6:.1f}M fp32"
    cases: list[tuple[str, Callable[[], object]]] = [
        ("official (.item() per param)", lambda: official_clip_gradients(models["official"], CLIP)),
        ("dino_fast per-param, no sync", lambda: clip_gradients_(models["sync-free"].parameters(), CLIP)),
        (
            "global clip_grad_norm_",
            lambda: torch.nn.utils.clip_grad_norm_(models["global"].parameters(), CLIP, foreach=True),
        ),
    ]
    per_round = max(1, iters // rounds)
    stats_by_impl: dict[str, list[dict]] = {impl: [] for impl, _ in cases}
    for _ in range(rounds):
        for impl, fn in cases:
            stats_by_impl[impl].append(measure(fn, device=device, warmup=warmup, iters=per_round))
    rows = [
        {
            "impl": impl,
            "shape": shape,
            "n_tensors": len(shapes),
            "n_params": n_params,
            "median_ms": statistics.median(run["median_ms"] for run in runs),
            "p10_ms": min(run["p10_ms"] for run in runs),
            "p90_ms": max(run["p90_ms"] for run in runs),
            "peak_extra_mib": runs[-1]["peak_extra_mib"],
            "iters": per_round * rounds,
            "rounds": rounds,
        }
        for impl, runs in stats_by_impl.items()
    ]
    global_ms = rows[-1]["median_ms"]
    for row in rows:
        row["vs_global"] = global_ms / row["median_ms"]
    return rows
