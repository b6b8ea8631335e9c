"""``throughput.py --mode inference``: images/s of one backbone forward, the DINO paper's im/s
column (its Table 2, measured on a V100), for ViTs and ResNets side by side in one run.

Each row is a backbone in eval mode under ``inference_mode`` at one resolution and batch: a ViT
both as the official code builds it (explicit attention, the paper's model) and as dino_fast
builds it (its attention backend), a ResNet as torchvision builds it (both codes use that one) in
channels_last with cuDNN's autotuner on. Warm-up first, then the median of many forwards (CUDA
events on a GPU); a row that fails is a result with the reason, and a backbone whose optional
package is missing (torchvision) is skipped with the install command.
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from benchmarks.timing import cudnn_autotuner, environment, measure, rate_fields, release_memory, write_json
from dino_fast.models import build_backbone, is_convnet
from dino_fast.official import vision_transformer
from dino_fast.optional import MissingDependencyError

# Images/s the DINO paper reports on a V100, by (arch, patch size; None for a convnet).
PAPER_V100_IMAGES_PER_S = {("resnet50", None): 1237, ("vit_small", 16): 1007}


def paper_key(arch: str, patch_size: int) -> tuple[str, int | None]:
    return (arch, None if is_convnet(arch) else patch_size)


def backbones(arch: str, patch_size: int) -> list[tuple[str, Callable[[], nn.Module]]]:
    """(implementation, constructor) of every row ``arch`` gets."""
    if is_convnet(arch):
        return [("torchvision", lambda: build_backbone(arch))]
    return [
        ("official", lambda: getattr(vision_transformer, arch)(patch_size=patch_size)),
        ("dino_fast", lambda: build_backbone(arch, patch_size=patch_size)),
    ]


def _cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AMX or AVX512-BF16); elsewhere oneDNN
    emulates bf16 and autocast runs slower than fp32."""
    checks = (
        getattr(torch.cpu, "_is_amx_tile_supported", None),
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
    )
    return any(check is not None and check() for check in checks)


def choose_precision(device: torch.device, requested: str) -> tuple[str, str]:
    """The precision the forwards run in, and why, as the output says it."""
    if requested == "fp32":
        return "fp32", "fp32 (--precision fp32)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "bf16 autocast"
        if requested == "bf16":
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp32")
        return "fp32", f"fp32: {torch.cuda.get_device_name(device)} has no bf16"
    if _cpu_computes_bf16():
        return "bf16", "bf16 autocast (this CPU computes bf16 natively: AMX or AVX512-BF16)"
    if requested == "bf16":
        return "bf16", "bf16 autocast (--precision bf16; emulated on this CPU, slower than fp32)"
    return "fp32", "fp32: this CPU has no bf16 instructions (AMX, AVX512-BF16), where bf16 autocast is slower"


def time_forward(
    build: Callable[[], nn.Module], channels_last: bool, args: argparse.Namespace, precision: str
) -> dict[str, Any]:
    device = torch.device(args.device)
    model = build().to(device).eval()
    images = torch.randn(
        args.batch_size_per_gpu,
        3,
        args.image_size,
        args.image_size,
        generator=torch.Generator().manual_seed(args.seed),
    ).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def forward() -> None:
        with torch.inference_mode(), amp:
            model(images)

    with cudnn_autotuner():
        return measure(forward, device=device, warmup=args.warmup, iters=args.steps)


def run_row(
    arch: str, impl: str, build: Callable[[], nn.Module], args: argparse.Namespace, precision: str
) -> dict[str, Any]:
    paper = PAPER_V100_IMAGES_PER_S.get(paper_key(arch, args.patch_size))
    row: dict[str, Any] = {"arch": arch, "impl": impl, "paper_v100_images_per_s": paper}
    if not is_convnet(arch):
        row["patch_size"] = args.patch_size
    try:
        stats = time_forward(build, is_convnet(arch), args, precision)
        rates = rate_fields(stats, args.batch_size_per_gpu, per="batch")
        vs_paper = None if paper is None else rates["images_per_s"] / paper
        row.update(status="ok", **rates, iters=stats["iters"], vs_paper=vs_paper)
    except MissingDependencyError as err:
        row.update(status="skipped", reason=str(err))
    except Exception as err:  # a failed row is a result to report, never a reason to stop
        traceback.print_exc()
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
    finally:
        release_memory(torch.device(args.device), compiled=False)
    return row


def ratios(rows: list[dict[str, Any]], patch_size: int) -> list[dict[str, Any]]:
    """Every measured convnet's images/s over every measured ViT row's, beside the paper's ratio
    (RN50 / ViT-S/16: 1237 / 1007 = 1.23) where the paper has both."""
    ok = [r for r in rows if r["status"] == "ok"]
    out = []
    for conv in (r for r in ok if is_convnet(r["arch"])):
        for vit in (r for r in ok if not is_convnet(r["arch"])):
            paper_conv = PAPER_V100_IMAGES_PER_S.get(paper_key(conv["arch"], patch_size))
            paper_vit = PAPER_V100_IMAGES_PER_S.get(paper_key(vit["arch"], patch_size))
            out.append(
                {
                    "numerator": conv["arch"],
                    "denominator": f"{vit['arch']}/{patch_size} ({vit['impl']})",
                    "measured": conv["images_per_s"] / vit["images_per_s"],
                    "paper_v100": None if not (paper_conv and paper_vit) else paper_conv / paper_vit,
                }
            )
    return out


def format_table(rows: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], device_name: str) -> str:
    head = (
        f"{'backbone':<16} {'impl':<12} {'im/s':>9} {'ms/batch':>9} {'paper V100 im/s':>16} "
        f"{'this / V100':>11}"
    )
    lines = [f"images/s on {device_name}", head, "-" * len(head)]
    for r in rows:
        name = r["arch"] if is_convnet(r["arch"]) else f"{r['arch']}/{r['patch_size']}"
        if r["status"] == "skipped":
            lines.append(f"{name:<16} {r['impl']:<12} skipped: {r['reason']}")
            continue
        if r["status"] != "ok":
            lines.append(f"{name:<16} {r['impl']:<12} FAILED: {r['error']}")
            continue
        paper = f"{r['paper_v100_images_per_s']:,}" if r["paper_v100_images_per_s"] else "-"
        vs = f"{r['vs_paper']:.2f}x" if r["vs_paper"] else "-"
        timing = f"{r['images_per_s']:9.1f} {r['ms_per_batch']:9.2f}"
        lines.append(f"{name:<16} {r['impl']:<12} {timing} {paper:>16} {vs:>11}")
    for q in ratio_rows:
        paper = f"{q['paper_v100']:.2f}" if q["paper_v100"] else "-"
        lines.append(f"{q['numerator']} / {q['denominator']}: {q['measured']:.2f} (paper, V100: {paper})")
    return "\n".join(lines)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every row of ``args.arch``, printed and written to ``args.json`` as each is measured."""
    device = torch.device(args.device)
    env = environment(device)
    precision, why = choose_precision(device, args.precision)
    print(
        f"inference: {' '.join(args.arch)} at {args.image_size} px, B={args.batch_size_per_gpu}, {why}, "
        f"on {env['device']} (torch {env['torch']}); {args.warmup} warm-up + median of {args.steps} forwards",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "benchmark": "inference",
        "command": command,
        "environment": env,
        "config": {
            "preset": args.preset,
            "arch": list(args.arch),
            "patch_size": args.patch_size,
            "image_size": args.image_size,
            "batch_size_per_gpu": args.batch_size_per_gpu,
            "warmup": args.warmup,
            "steps": args.steps,
            "seed": args.seed,
        },
        "precision": precision,
        "precision_reason": why,
        "paper_v100_images_per_s": {
            (arch if patch is None else f"{arch}/{patch}"): ips
            for (arch, patch), ips in PAPER_V100_IMAGES_PER_S.items()
        },
        "rows": rows,
        "complete": False,
    }
    for arch in args.arch:
        for impl, build in backbones(arch, args.patch_size):
            row = run_row(arch, impl, build, args, precision)
            rows.append(row)
            print(f"  {arch} ({impl}): {_status(row)}", flush=True)
            write_json(args.json, payload)  # a run cut short still leaves what it measured
    payload["ratios"] = ratios(rows, args.patch_size)
    print(format_table(rows, payload["ratios"], env["device"]), flush=True)
    payload["complete"] = True
    payload["all_ok"] = all(r["status"] != "failed" for r in rows)
    write_json(args.json, payload)
    return payload


def _status(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return f"{row['images_per_s']:.1f} im/s"
    return f"skipped: {row['reason']}" if row["status"] == "skipped" else f"FAILED: {row['error']}"
