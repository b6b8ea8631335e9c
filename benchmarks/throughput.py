"""End-to-end DINO training throughput: dino_fast against the official way of training, in one run;
and (``--mode inference``) backbone forward images/s beside the DINO paper's V100 figures.

    python benchmarks/throughput.py --device cuda --preset anchor --json results/throughput_b128.json
    python benchmarks/throughput.py --device cuda --preset anchor --batch_size_per_gpu 64 \\
        --json results/throughput_b64.json
    python benchmarks/throughput.py --device cuda --preset rn50 --json results/throughput_rn50.json
    python benchmarks/throughput.py --device cuda --preset anchor --data dali --data_path DIR --json ...
    python benchmarks/throughput.py --device cpu --preset tiny --json /tmp/throughput_tiny.json
    python benchmarks/throughput.py --mode inference --device cuda --arch vit_small resnet50 \\
        --json results/inference.json

Training presets: ``anchor`` is docs/design.md's measurement (ViT-S/16, 2x224 + 10x96 crops,
K=65536, B=128), ``rn50`` the same shapes for the official ResNet-50 recipe (SGD, lr 0.03, weight
decay 1e-4, its crop scales; main_dino.py's 8 local crops); ``tiny`` (a full-depth ViT-tiny on
32/16-px crops) and ``rn_tiny`` (ResNet-18 on 96/48-px crops), with K=256 and B=4, exercise every
code path on a CPU. ``--arch`` runs a preset's shapes for another backbone (a convnet takes the
RN50 recipe). Every variant times the official ``train_one_epoch`` body's work (teacher forward,
student forward and backward, loss, clipping, optimizer, EMA) from the same weights on the same
batch, and must first reproduce the fp32 official loss. The JSON is rewritten after every
variant; exit status 1 when any variant failed. Inference presets: ``anchor`` (ViT-S/16 and
ResNet-50, 224 px, B=128) and ``tiny`` (ViT-tiny and ResNet-18, 32 px, B=4). docs/benchmarks.md
explains the variants, the equal-loss check, the timing, MFU and the inference rows.
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

from benchmarks.end_to_end import inference
from benchmarks.end_to_end.context import STEPS_PER_EPOCH, Context, bench_config
from benchmarks.end_to_end.equal_loss import CHECK_RTOL, CHECK_STEPS, reference_losses
from benchmarks.end_to_end.flops import device_peak_tflops, step_flops
from benchmarks.end_to_end.inputs import loader_batches, synthetic_batch
from benchmarks.end_to_end.official_step import ModelSpec, official_state_dict
from benchmarks.end_to_end.report import add_ratios, format_table, status_line
from benchmarks.end_to_end.timed_run import run_variant
from benchmarks.end_to_end.variants import DEFAULT_VARIANTS, VARIANTS
from benchmarks.timing import environment, write_json
from dino_fast.errors import run_command
from dino_fast.models import BACKBONE_ARCHS, is_convnet

# Shapes shared by a ViT preset and its ResNet counterpart.
_ANCHOR_SHAPES = {
    "patch_size": 16,
    "batch_size_per_gpu": 128,
    "out_dim": 65536,
    "global_crops_size": 224,
    "local_crops_size": 96,
    "steps": 20,
    "warmup": 5,
}
_TINY_SHAPES = {
    "patch_size": 16,
    "batch_size_per_gpu": 4,
    "local_crops_number": 2,
    "out_dim": 256,
    "global_crops_size": 32,
    "local_crops_size": 16,
    "steps": 3,
    "warmup": 1,
}
PRESETS: dict[str, dict[str, Any]] = {
    # docs/design.md's anchor: ViT-S/16, 2 x 224 + 10 x 96 crops, K = 65536, 128 images per step
    # (run it again with --batch_size_per_gpu 64 for the B=64 anchor).
    "anchor": {"arch": "vit_small", "local_crops_number": 10, **_ANCHOR_SHAPES},
    # The paper's RN50 row at the anchor's shapes: the official RN50 command sets no crop count,
    # so main_dino.py's default of 8 local crops.
    "rn50": {"arch": "resnet50", "local_crops_number": 8, **_ANCHOR_SHAPES},
    # Every code path at CPU-test size: a full-depth ViT-tiny on 2 x 2 and 1 x 1 patch grids.
    "tiny": {"arch": "vit_tiny", **_TINY_SHAPES},
    # The same for a convnet: ResNet-18 on 96/48-px crops, whose last stage sees 3 x 3 and 2 x 2
    # maps. Smaller crops fail the bf16 check: batch norms over a few values per channel amplify
    # rounding (ResNet-50 on 64/32 px: the official step's bf16 loss is 1.6% off), and at 16 px a
    # stride-2 convolution meets a 1 x 1 map, whose bf16 weight gradient torch's CPU kernels
    # (oneDNN, torch 2.14) return as NaN in some runs.
    "rn_tiny": {"arch": "resnet18", **_TINY_SHAPES, "global_crops_size": 96, "local_crops_size": 48},
}
INFERENCE_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's im/s column: ViT-S/16 and ResNet-50 at 224 px.
    "anchor": {
        "arch": ["vit_small", "resnet50"],
        "patch_size": 16,
        "image_size": 224,
        "batch_size_per_gpu": 128,
        "steps": 50,
        "warmup": 10,
    },
    "tiny": {
        "arch": ["vit_tiny", "resnet18"],
        "patch_size": 16,
        "image_size": 32,
        "batch_size_per_gpu": 4,
        "steps": 3,
        "warmup": 1,
    },
}
# Flags of one mode only: (flag, the mode that uses it).
_MODE_FLAGS = {
    **{f: "train" for f in ("local_crops_number", "global_crops_size", "local_crops_size", "out_dim")},
    **{f: "train" for f in ("variants", "optimizer", "data_path", "peak_tflops")},
    **{f: "inference" for f in ("image_size", "precision")},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--mode",
        choices=("train", "inference"),
        default="train",
        help="train: full DINO steps against the official step; inference: backbone forward images/s",
    )
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--preset",
        default=None,
        help=f"train: {', '.join(PRESETS)}; inference: {', '.join(INFERENCE_PRESETS)} (default: anchor on "
        "cuda, tiny on cpu; rn50 / rn_tiny when --arch names a convnet)",
    )
    p.add_argument(
        "--arch",
        nargs="+",
        choices=BACKBONE_ARCHS,
        default=None,
        metavar="ARCH",
        help=f"one of {', '.join(BACKBONE_ARCHS)}; several with --mode inference",
    )
    p.add_argument("--patch_size", type=int, default=None)
    p.add_argument("--batch_size_per_gpu", type=int, default=None, help="images per step / forward")
    p.add_argument("--local_crops_number", type=int, default=None)
    p.add_argument("--global_crops_size", type=int, default=None)
    p.add_argument("--local_crops_size", type=int, default=None)
    p.add_argument("--out_dim", type=int, default=None, help="DINO head output size K")
    p.add_argument(
        "--optimizer",
        choices=("adamw", "sgd", "lars"),
        default=None,
        help="the official --optimizer (default: adamw for a ViT, the RN50 recipe's sgd for a convnet)",
    )
    p.add_argument("--image_size", type=int, default=None, help="inference: image side in pixels")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default=None,
        help="inference: bf16 autocast, or fp32; auto (default): bf16 where the device computes it natively",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps / forwards (the median is reported)")
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

    for flag, mode in _MODE_FLAGS.items():
        if getattr(args, flag) is not None and args.mode != mode:
            p.error(f"--{flag} is only used with --mode {mode}")
    if args.mode == "inference" and args.data != "synthetic":
        p.error("--data is only used with --mode train")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device; run --device cpu --preset tiny here")
    _apply_preset(p, args)
    positive = ["batch_size_per_gpu", "patch_size", "steps"]
    if args.mode == "train":
        _check_train_args(p, args)
        positive += ["out_dim", "global_crops_size", "local_crops_size"]
    else:
        positive.append("image_size")
        args.precision = args.precision or "auto"
        if len(set(args.arch)) != len(args.arch):
            p.error(f"--arch names a backbone twice: {args.arch}")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def _apply_preset(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill every flag not given from the preset (chosen by device and architecture if not given)."""
    presets = PRESETS if args.mode == "train" else INFERENCE_PRESETS
    if args.preset is None:
        on_cpu = args.device == "cpu"
        if args.mode == "train" and args.arch is not None and is_convnet(args.arch[0]):
            args.preset = "rn_tiny" if on_cpu else "rn50"
        else:
            args.preset = "tiny" if on_cpu else "anchor"
    if args.preset not in presets:
        p.error(f"--preset {args.preset!r} with --mode {args.mode}: choose {', '.join(presets)}")
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _check_train_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if isinstance(args.arch, list):
        if len(args.arch) != 1:
            p.error(
                f"--mode train times one backbone; --arch {' '.join(args.arch)} only with --mode inference"
            )
        args.arch = args.arch[0]
    if args.variants is None:
        args.variants = list(DEFAULT_VARIANTS)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"--variants lists a variant twice: {args.variants}")
    if args.local_crops_number < 0:
        p.error("--local_crops_number must be >= 0")
    if args.data != "synthetic":
        if not args.data_path:
            p.error(f"--data {args.data} needs --data_path DIR (an ImageFolder root: class folders of JPEGs)")
        if not Path(args.data_path).is_dir():
            p.error(f"--data_path {args.data_path!r} is not a directory")
    elif args.data_path:
        p.error("--data_path is only used with --data dali or --data torchvision")
    if args.num_workers < 0:
        p.error(f"--num_workers must be >= 0 (got {args.num_workers})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
    if args.mode == "inference":
        return inference.run(args, command)
    return train(args, command)


def train(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every variant's training step: the equal-loss check, then the timed steps."""
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
    backbone = config.arch if is_convnet(config.arch) else f"{config.arch}/{config.patch_size}"
    shape = (
        f"{backbone}, 2x{config.global_crops_size}+{config.local_crops_number}x"
        f"{config.local_crops_size}, K={config.out_dim}, B={config.batch_size_per_gpu}, "
        f"{config.optimizer} lr {config.lr}"
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
        "command": command,
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
            "optimizer": config.optimizer,
            "lr_per_256_images": config.lr,
            "weight_decay": [config.weight_decay, config.weight_decay_end],
            "crops_scale": {
                "global": list(config.global_crops_scale),
                "local": list(config.local_crops_scale),
            },
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
        print(f"  {name}: {status_line(result)}", flush=True)
        add_ratios(results)
        # Written after every variant: a run cut short (a time limit) still leaves what it measured.
        write_json(args.json, payload)
    print(format_table(results), flush=True)
    payload["complete"] = True
    payload["all_ok"] = all(r["status"] != "failed" for r in results)
    write_json(args.json, payload)
    return payload


def command(argv: list[str] | None = None) -> int:
    """The exit status: 1 when a variant or an inference row failed (a result, reported in the
    table) or a bad flag or path ended the run in one line (dino_fast.errors.run_command)."""
    payload: dict[str, Any] = {}
    status = run_command(lambda args: payload.update(main(args)), argv)
    return status or (0 if payload["all_ok"] else 1)


if __name__ == "__main__":
    sys.exit(command())
