"""Self-attention maps of the last block's CLS token: the DINO paper's "emerging property".

For each image: resize (``--image_size``; two numbers are an exact (height, width), one
number the shorter side), crop to a multiple of the patch size, run the backbone's last
block with explicit attention (``get_last_selfattention``), keep the CLS query's attention
over the patch tokens, one map per head, and upsample it by the patch size (nearest, as the
official script does). Written per image:

- ``img.png``: the resized, cropped input;
- ``attn-head{j}.png``: head j's map, min-max scaled, in the viridis colormap;
- ``mask_th{t}_head{j}.png`` (with ``--threshold t``): the smallest set of patches holding a
  fraction t of head j's attention mass (official rule: sort, cumulative sum, keep what lies
  above ``1 - t``) drawn over the image with its outline;
- ``attn-grid.png``: the image and every head's map blended over it, side by side (and a
  second row with the masks when thresholding).

With one image the files go straight into ``--output_dir`` (as the official script does);
with several, each image gets a sub-folder named after its file, and ``attn-overview.png`` in
``--output_dir`` stacks every image's grid rows. ``--output_scale N`` enlarges the pictures
N times (pixel repetition) for models that run on small inputs.

    python -m dino_fast.visualize --pretrained_weights out/checkpoint.pth --arch vit_small \
        --patch_size 8 --image_path photo.jpg --output_dir attn --threshold 0.6

A convnet (``--arch resnet50``, or a checkpoint that holds one) has no self-attention: it is
refused in one line, before any model is built.
"""

from __future__ import annotations

import argparse
import colorsys
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino_fast import models
from dino_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_fast.data.folders import DECODE_ERRORS, UnusableImageError, inspect_image, load_rgb
from dino_fast.eval.weights import ModelChoice, add_model_arguments, choose_model

logger = logging.getLogger(__name__)

# matplotlib's viridis sampled at 9 evenly spaced points; linear interpolation between them
# stays within a few levels of the full 256-entry table (matplotlib is not a dependency).
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 73, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [110, 206, 88],
        [253, 231, 37],
    ],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Viridis RGB (uint8, shape ``values.shape + (3,)``) of values in [0, 1] (clipped)."""
    v = np.clip(np.nan_to_num(values.astype(np.float64)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(np.int64)
    hi = np.minimum(lo + 1, len(_VIRIDIS) - 1)
    frac = (v - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1.0 - frac) + _VIRIDIS[hi] * frac
    return np.round(rgb).astype(np.uint8)


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a, dtype=np.float64)


def load_image(
    path: str | os.PathLike[str], image_size: Sequence[int], patch_size: int
) -> tuple[torch.Tensor, np.ndarray]:
    """(normalized ``(3, H, W)`` tensor, ``(H, W, 3)`` uint8 RGB) with H, W multiples of the patch.

    ``image_size`` is (height, width) or a single shorter-side length, like torchvision's
    ``Resize`` in the official script (bilinear, antialiased).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image_path {path} does not exist (or is not a file)")
    try:
        inspect_image(path)
        img = load_rgb(path)
    except UnusableImageError as err:
        raise UnusableImageError(f"--image_path {path} is not a usable image: {err}") from err
    except DECODE_ERRORS as err:
        raise UnusableImageError(f"--image_path {path} does not decode ({err})") from err
    if len(image_size) == 2:
        height, width = int(image_size[0]), int(image_size[1])
    elif len(image_size) == 1:
        short = int(image_size[0])
        w0, h0 = img.size
        scale = short / min(w0, h0)
        height, width = (short, int(w0 * scale)) if h0 <= w0 else (int(h0 * scale), short)
    else:
        raise ValueError(f"--image_size takes one or two numbers, got {list(image_size)}")
    if min(height, width) < patch_size:
        raise ValueError(f"--image_size {height}x{width} is smaller than one {patch_size}-pixel patch")
    img = img.resize((width, height), Image.BILINEAR)
    rgb = np.asarray(img, dtype=np.uint8)
    # crop to a multiple of the patch size (official: drop the remainder at the bottom/right)
    rgb = rgb[: height - height % patch_size, : width - width % patch_size]
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std, np.ascontiguousarray(rgb)


_FOR_A_CONVNET = (
    "it has no self-attention to draw. Attention maps need a ViT "
    f"(--arch {' / '.join(models.ARCHS)}); evaluate a convnet with python -m dino_fast.eval.knn "
    "or python -m dino_fast.eval.linear"
)


def refuse_convnet(choice: ModelChoice) -> None:
    """Raise when the backbone the flags or the checkpoint name is a convnet (ResNet)."""
    if not models.is_convnet(choice.arch):
        return
    if choice.arch_origin == "--arch":
        raise ValueError(f"--arch {choice.arch} is a convnet: {_FOR_A_CONVNET}")
    raise ValueError(f"{choice.arch_origin} holds a {choice.arch}, a convnet: {_FOR_A_CONVNET}")


def _require_attention(model: nn.Module) -> None:
    if not callable(getattr(model, "get_last_selfattention", None)):
        raise ValueError(f"the {type(model).__name__} given is not a ViT: {_FOR_A_CONVNET}")


@torch.no_grad()
def cls_attention(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Last block's CLS-to-patch attention, ``(num_heads, H / patch, W / patch)``, float32 on CPU."""
    _require_attention(model)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one normalized (3, H, W) image, got shape {tuple(image.shape)}")
    patch = int(model.patch_size)
    h, w = image.shape[1] // patch, image.shape[2] // patch
    device = next(model.parameters()).device
    attn = model.get_last_selfattention(image[None].to(device))
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] < 1 + h * w:
        raise ValueError(
            f"get_last_selfattention returned shape {tuple(attn.shape)} for a {h}x{w} patch grid"
        )
    # Registers or other extra tokens, if a model had any, sit between CLS and the patches.
    patches = attn[0, :, 0, attn.shape[-1] - h * w :]
    return patches.float().reshape(attn.shape[1], h, w).cpu()


def threshold_masks(attention: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per head, the patches that hold ``threshold`` of the attention mass (official rule).

    ``attention`` is ``(heads, ...)``; returns a bool tensor of the same shape. A patch is
    kept when the mass of the patches ranked at or below it exceeds ``1 - threshold``, i.e.
    the kept set is the highest-attention patches whose total just reaches ``threshold``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--threshold is a fraction of the attention mass in (0, 1], got {threshold}")
    flat = attention.reshape(attention.shape[0], -1).double()
    values, order = flat.sort(dim=1, stable=True)
    cum = (values / values.sum(dim=1, keepdim=True)).cumsum(dim=1)
    keep_sorted = cum > (1.0 - threshold)
    keep = torch.empty_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep.reshape(attention.shape)


def _upsample(a: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(a, factor, axis=-2), factor, axis=-1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (image borders count as outside), 2 px wide."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (
        padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )
    edge = mask & ~interior
    grown = np.pad(edge, 1, constant_values=False)
    return edge | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]


def head_colors(num_heads: int) -> list[tuple[int, int, int]]:
    """Distinct saturated colours, fixed per head index (the official script shuffles at random)."""
    return [
        tuple(round(255 * c) for c in colorsys.hsv_to_rgb(j / max(num_heads, 1), 1.0, 1.0))
        for j in range(num_heads)
    ]  # type: ignore[misc]


def overlay_heatmap(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``heat`` (values in [0, 1], same H x W) in viridis blended over ``rgb``."""
    blended = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colormap(heat).astype(np.float64)
    return np.round(blended).astype(np.uint8)


def overlay_mask(rgb: np.ndarray, mask: np.ndarray, color: Sequence[int], alpha: float = 0.5) -> np.ndarray:
    """Official ``apply_mask`` plus the mask's outline in the full colour."""
    out = rgb.astype(np.float64)
    m = mask.astype(np.float64)[..., None]
    out = out * (1.0 - alpha * m) + alpha * m * np.asarray(color, dtype=np.float64)
    out[_outline(mask.astype(bool))] = color
    return np.round(out).astype(np.uint8)


def make_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 4) -> np.ndarray:
    """uint8 RGB tiles laid out row by row on a white background (cells sized to the largest tile)."""
    h = max(tile.shape[0] for row in rows for tile in row)
    w = max(tile.shape[1] for row in rows for tile in row)
    ncols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return grid


def _save(arr: np.ndarray, path: Path) -> Path:
    Image.fromarray(arr).save(path)
    return path


@dataclass
class AttentionPictures:
    """Everything drawn for one image (uint8 RGB arrays), before anything is written."""

    image: np.ndarray
    heatmaps: list[np.ndarray]
    masks: list[np.ndarray] = field(default_factory=list)
    rows: list[list[np.ndarray]] = field(default_factory=list)
    threshold: float | None = None  # the attention mass the masks keep


def render_attention(
    model: nn.Module,
    image_path: str | os.PathLike[str],
    *,
    image_size: Sequence[int] = (480, 480),
    threshold: float | None = None,
    output_scale: int = 1,
) -> AttentionPictures:
    """The pictures of one image: input, per-head heat maps, masks, and the grid's rows.

    ``output_scale`` enlarges every picture by pixel repetition (for models that run on small
    images, e.g. the 32-px Fashion-MNIST demo); the model input is not affected.
    """
    if output_scale < 1:
        raise ValueError(f"--output_scale must be a positive integer, got {output_scale}")
    _require_attention(model)
    patch = int(model.patch_size)
    image, rgb = load_image(image_path, image_size, patch)
    attn = cls_attention(model, image)
    num_heads = attn.shape[0]
    rgb = np.ascontiguousarray(_upsample(rgb.transpose(2, 0, 1), output_scale).transpose(1, 2, 0))
    patch *= output_scale
    maps = _upsample(attn.numpy().astype(np.float64), patch)
    heats = [_minmax(maps[j]) for j in range(num_heads)]
    pictures = AttentionPictures(image=rgb, heatmaps=[colormap(h) for h in heats])
    pictures.rows.append([rgb, *(overlay_heatmap(rgb, heat) for heat in heats)])
    if threshold is not None:
        masks = _upsample(threshold_masks(attn, threshold).numpy(), patch)
        colors = head_colors(num_heads)
        pictures.threshold = threshold
        pictures.masks = [overlay_mask(rgb, masks[j], colors[j]) for j in range(num_heads)]
        union = rgb
        for j in range(num_heads):
            union = overlay_mask(union, masks[j], colors[j], alpha=0.5 / num_heads)
        pictures.rows.append([union, *pictures.masks])
    return pictures


def visualize_image(
    model: nn.Module,
    image_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    image_size: Sequence[int] = (480, 480),
    threshold: float | None = None,
    output_scale: int = 1,
) -> list[Path]:
    """Write the attention PNGs of one image into ``output_dir``; returns the files written."""
    pictures = render_attention(
        model, image_path, image_size=image_size, threshold=threshold, output_scale=output_scale
    )
    written = write_pictures(pictures, output_dir)
    logger.info("%s: wrote %d files to %s", image_path, len(written), output_dir)
    return written


def write_pictures(pictures: AttentionPictures, output_dir: str | os.PathLike[str]) -> list[Path]:
    """``img.png``, ``attn-head{j}.png``, ``mask_th{t}_head{j}.png`` and ``attn-grid.png``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [_save(pictures.image, out / "img.png")]
    written += [_save(heat, out / f"attn-head{j}.png") for j, heat in enumerate(pictures.heatmaps)]
    for j, mask in enumerate(pictures.masks):
        written.append(_save(mask, out / f"mask_th{pictures.threshold}_head{j}.png"))
    written.append(_save(make_grid(pictures.rows), out / "attn-grid.png"))
    return written


def _output_dirs(image_paths: Sequence[Path], output_dir: Path) -> list[Path]:
    if len(image_paths) == 1:
        return [output_dir]
    seen: dict[str, int] = {}
    dirs = []
    for p in image_paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        dirs.append(output_dir / (p.stem if n == 0 else f"{p.stem}_{n}"))
    return dirs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m dino_fast.visualize", description="Self-attention maps of a DINO ViT's last block."
    )
    add_model_arguments(parser)
    parser.add_argument("--image_path", type=Path, nargs="+", required=True, help="Image file(s).")
    parser.add_argument(
        "--image_size",
        default=[480, 480],
        type=int,
        nargs="+",
        help="Resize to (height, width) or shorter side.",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("."), help="Where to write the PNGs.")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="Also draw masks keeping this fraction of each head's attention mass (e.g. 0.6).",
    )
    parser.add_argument(
        "--output_scale",
        default=1,
        type=int,
        help="Enlarge the written pictures by this factor (for small inputs); the model input is unchanged.",
    )
    parser.add_argument("--device", default=None, help="Device (default: cuda if available, else cpu).")
    return parser


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    missing = [str(p) for p in args.image_path if not p.is_file()]
    if missing:
        raise SystemExit(f"--image_path: no such file(s): {', '.join(missing)}")
    choice = choose_model(args)
    refuse_convnet(choice)
    model = choice.build(device, args.attn_backend)
    options = dict(image_size=args.image_size, threshold=args.threshold, output_scale=args.output_scale)
    written: list[Path] = []
    overview: list[list[np.ndarray]] = []
    for path, out in zip(args.image_path, _output_dirs(args.image_path, args.output_dir), strict=True):
        pictures = render_attention(model, path, **options)
        written += write_pictures(pictures, out)
        overview += pictures.rows
    if len(args.image_path) > 1:
        written.append(_save(make_grid(overview), args.output_dir / "attn-overview.png"))
    print(f"wrote {len(written)} files under {args.output_dir}", flush=True)
    return written
