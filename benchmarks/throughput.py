"""End-to-end DINO training throughput: dino_fast against the official way of training, in one run.

    python benchmarks/throughput.py --device cuda --preset anchor --json results/throughput_b128.json
    python benchmarks/throughput.py --device cuda --preset anchor --batch_size_per_gpu 64 \\
        --json results/throughput_b64.json
    python benchmarks/throughput.py --device cuda --preset anchor --data dali --data_path DIR --json ...
    python benchmarks/throughput.py --device cpu --preset tiny --json /tmp/throughput_tiny.json

Presets: ``anchor`` is docs/design.md's measurement (ViT-S/16, 2x224 + 10x96 crops, K=65536,
B=128), ``tiny`` a full-depth ViT-tiny on 32/16-px crops with K=256 and B=4 that exercises every
code path on a CPU. Every variant times the official ``train_one_epoch`` body's work (teacher
forward, student forward and backward, loss, clipping, AdamW, EMA) from the same weights on the
same batch, and must first reproduce the fp32 official loss. The JSON is rewritten after every
variant; exit status 1 when any variant failed. docs/benchmarks.md explains the variants, the
equal-loss check, the timing and how to read MFU.
"""

from __future__ import annotations

if not __package__:  # `python benchmarks/throughput.py`: rerun as `python -m benchmarks.throughput`
    from as_module import rerun_as_module

    rerun_as_module(__file__)

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.end_to_end.context import STEPS_PER_EPOCH, Context, bench_config
from benchmarks.end_to_end.equal_loss import CHECK_RTOL, CHECK_STEPS, reference_losses
from benchmarks.end_to_end.flops import device_peak_tflops, step_flops
from benchmarks.end_to_end.inputs import loader_batches, synthetic_batch
from benchmarks.end_to_end.official_step import ModelSpec, official_state_dict
from benchmarks.end_to_end.timed_run import run_variant
from benchmarks.end_to_end.variants import DEFAULT_VARIANTS, VARIANTS
from benchmarks.timing import environment, write_json
from dino_fast.errors import run_command
from dino_fast.models import ARCHS

PRESETS: dict[str, dict[str, Any]] = {
    # docs/design.md's anchor: ViT-S/16, 2 x 224 + 10 x 96 crops, K = 65536, 128 images per step
    # (run it again with --batch_size_per_gpu 64 for the B=64 anchor).
    "anchor": {
        "arch": "vit_small",
        "patch_size": 16,
        "batch_size_per_gpu": 128,
        "local_crops_number": 10,
        "out_dim": 65536,
        "global_crops_size": 224,
        "local_crops_size": 96,
        "steps": 20,
        "warmup": 5,
    },
    # Every code path at CPU-test size: a full-depth ViT-tiny on 2 x 2 and 1 x 1 patch grids.
    "tiny": {
        "arch": "vit_tiny",
        "patch_size": 16,
        "batch_size_per_gpu": 4,
        "local_crops_number": 2,
        "out_dim": 256,
        "global_crops_size": 32,
        "local_crops_size": 16,
        "steps": 3,
        "warmup": 1,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="anchor: ViT-S/16, 2x224+10x96, K=65536, B=128; tiny: seconds on a CPU "
        "(default: anchor on cuda, tiny on cpu)",
    )
    p.add_argument("--arch", choices=sorted(ARCHS), default=None)
    p.add_argument("--patch_size", type=int, default=None)
    p.add_argument("--batch_size_per_gpu", type=int, default=None, help="images per step")
    p.add_argument("--local_crops_number", type=int, default=None)
    p.add_argument("--global_crops_size", type=int, default=None)
    p.add_argument("--local_crops_size", type=int, default=None)
    p.add_argument("--out_dim", type=int, default=None, help="DINO head output size K")
    p.add_argument("--steps", type=int, default=None, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation happens here)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"which to run, in order (default: {' '.join(DEFAULT_VARIANTS)}; "
        f"also available: {' '.join(sorted(set(VARIANTS) - set(DEFAULT_VARIANTS)))})",
    )
    p.add_argument(
        "--data",
        choices=("synthetic", "dali", "torchvision"),
        default="synthetic",
        help="synthetic: one batch already on the device, reused (no loading cost); dali / "
        "torchvision: every timed step takes the next batch of dino_fast's pipeline over --data_path, "
        "so a step waits when loading does not keep up",
    )
    p.add_argument("--data_path", default=None, help="ImageFolder root (class folders of images)")
    p.add_argument("--num_workers", type=int, default=8, help="DALI CPU threads / torchvision loader workers")
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak for MFU (default: from the device name)",
    )
    p.add_argument("--seed", type=int, default=0, help="initial weights and the synthetic batch")
    p.add_argument("--json", default=None, help="also write every result and the environment here")
    args = p.parse_args(argv)

    if args.preset is None:
        args.preset = "anchor" if args.device == "cuda" else "tiny"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.variants is None:
        args.variants = list(DEFAULT_VARIANTS)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"--variants lists a variant twice: {args.variants}")
    for name in (
        "batch_size_per_gpu",
        "patch_size",
        "out_dim",
        "steps",
        "global_crops_size",
        "local_crops_size",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.local_crops_number < 0 or args.warmup < 0:
        p.error("--local_crops_number and --warmup must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device; run --device cpu --preset tiny here")
    if args.data != "synthetic":
        if not args.data_path:
            p.error(f"--data {args.data} needs --data_path DIR (an ImageFolder root: class folders of JPEGs)")
        if not Path(args.data_path).is_dir():
            p.error(f"--data_path {args.data_path!r} is not a directory")
    elif args.data_path:
        p.error("--data_path is only used with --data dali or --data torchvision")
    if args.num_workers < 0:
        p.error(f"--num_workers must be >= 0 (got {args.num_workers})")
    return args


def _check_text(check: dict[str, Any] | None) -> str:
    if check is None:
        return "-"
    if check["max_rel_diff"] is None:
        return "FAIL (non-finite loss)"
    verdict = "pass" if check["passed"] else "FAIL"
    return f"{verdict} ({check['max_rel_diff']:.1e} vs rtol {check['rtol']:.0e})"


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'variant':<22} {'prec':<5} {'im/s':>9} {'ms/step':>9} {'vs official':>11} "
        f"{'peak GiB':>9} {'MFU':>6}  check (max rel. loss diff)"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        check_txt = _check_text(r.get("check"))
        if r["status"] != "ok":
            lines.append(f"{r['name']:<22} {r.get('precision', '-'):<5} FAILED: {r['error']}  [{check_txt}]")
            continue
        ratio = f"{r['ratio_vs_official']:.2f}x" if r.get("ratio_vs_official") else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"{r['name']:<22} {r['precision']:<5} {r['images_per_s']:9.1f} {r['ms_per_step']:9.2f} "
            f"{ratio:>11} {peak:>9} {mfu:>6}  {check_txt}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = bench_config(args)
    ctx = Context(
        args=args,
        device=device,
        config=config,
        state_dict=official_state_dict(
            ModelSpec(
                arch=config.arch,
                patch_size=config.patch_size,
                out_dim=config.out_dim,
                norm_last_layer=config.norm_last_layer,
            ),
            seed=args.seed,
        ),
        first_iteration=config.freeze_last_layer * STEPS_PER_EPOCH,
    )
    env = environment(device)
    flops = step_flops(
        config.arch,
        config.patch_size,
        config.global_crops_size,
        config.local_crops_size,
        config.local_crops_number,
        config.out_dim,
    )
    peak_tflops, peak_source = device_peak_tflops(device, args.peak_tflops)
    shape = (
        f"{config.arch}/{config.patch_size}, 2x{config.global_crops_size}+{config.local_crops_number}x"
        f"{config.local_crops_size}, K={config.out_dim}, B={config.batch_size_per_gpu}"
    )
    print(
        f"throughput: {shape} on {env['device']} (torch {env['torch']}, triton {env['triton']}), "
        f"data={args.data}, {args.warmup} warm-up + {args.steps} timed steps",
        flush=True,
    )
    print(
        "matmul GFLOP per image: "
        + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in flops.items() if k != "total")
        + f"; total {flops['total'] / 1e9:.2f}"
    )
    print(f"MFU peak: {peak_tflops} TFLOP/s ({peak_source})", flush=True)

    batch = synthetic_batch(args, device)
    reference = reference_losses(ctx, batch)
    print(f"fp32 official reference losses (drop path off): {reference}", flush=True)
    timing_batches = None
    if args.data != "synthetic":
        timing_batches = lambda: loader_batches(config, args.data, device, args.data_path, args.num_workers)

    results: list[dict[str, Any]] = []
    payload = {
        "benchmark": "throughput",
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "environment": env,
        "config": {
            "preset": args.preset,
            "arch": config.arch,
            "patch_size": config.patch_size,
            "batch_size_per_gpu": config.batch_size_per_gpu,
            "global_crops": [2, config.global_crops_size],
            "local_crops": [config.local_crops_number, config.local_crops_size],
            "out_dim": config.out_dim,
            "drop_path_rate": config.drop_path_rate,
            "data": args.data,
            "data_path": args.data_path,
            "warmup": args.warmup,
            "steps": args.steps,
            "seed": args.seed,
            "first_iteration": ctx.first_iteration,
            "hyper_at_first_iteration": dataclasses.asdict(ctx.hyper(ctx.first_iteration)),
        },
        "flops_per_image": flops,
        "peak_tflops": peak_tflops,
        "peak_tflops_source": peak_source,
        "check": {"reference_losses": reference, "steps": CHECK_STEPS, "rtol": CHECK_RTOL},
        "variants": results,
        "variants_requested": list(args.variants),
        "complete": False,
    }
    for name in args.variants:
        result = run_variant(
            VARIANTS[name], ctx, batch, reference, timing_batches, flops["total"], peak_tflops
        )
        results.append(result)
        status = (
            f"{result['images_per_s']:.1f} im/s" if result["status"] == "ok" else f"FAILED: {result['error']}"
        )
        print(f"  {name}: {status}", flush=True)
        _add_ratios(results)
        # Written after every variant: a run cut short (a time limit) still leaves what it measured.
        write_json(args.json, payload)
    print(format_table(results), flush=True)
    payload["complete"] = True
    payload["all_ok"] = all(r["status"] == "ok" for r in results)
    write_json(args.json, payload)
    return payload


def _add_ratios(results: list[dict[str, Any]]) -> None:
    official = next((r for r in results if r["name"] == "official" and r["status"] == "ok"), None)
    for r in results:
        if r["status"] == "ok" and official is not None:
            r["ratio_vs_official"] = r["images_per_s"] / official["images_per_s"]


def command(argv: list[str] | None = None) -> int:
    """The exit status: 1 when a variant failed its check (a result, reported in the table) or a
    bad flag or path ended the run in one line (dino_fast.errors.run_command)."""
    payload: dict[str, Any] = {}
    status = run_command(lambda args: payload.update(main(args)), argv)
    return status or (0 if payload["all_ok"] else 1)


if __name__ == "__main__":
    sys.exit(command())
