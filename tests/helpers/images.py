"""Images made for the data tests: solid colors that identify their source after any crop, a
coordinate ramp that reveals a crop's box, the bad files of the input policy; and the inverse of
the normalization, to read pipeline outputs as pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def solid_color_folder(root: Path, n: int, size: tuple[int, int] = (40, 30)) -> tuple[Path, np.ndarray]:
    """``n`` PNGs of one distinct color each (flat folder, sorted names = index order).

    Every crop, flip and blur of a constant image is the same constant, so with color
    augmentation off each output view identifies its source image.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    colors = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
    for i, color in enumerate(colors):
        Image.fromarray(np.broadcast_to(color, (*size, 3)).copy()).save(root / f"{i:04d}.png")
    return root, colors


def coordinate_image(width: int = 240, height: int = 180) -> np.ndarray:
    """RGB uint8 image with R = x, G = y (pixel-center coordinates) and B = 128.

    A linear ramp survives antialiased resampling exactly away from the borders, so the output
    of a crop reveals its box (R and G at the output corners) and flips (R decreasing).
    """
    x = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :], (height, width))
    y = np.broadcast_to(np.arange(height, dtype=np.uint8)[:, None], (height, width))
    b = np.full((height, width), 128, dtype=np.uint8)
    return np.stack([x, y, b], axis=-1)


def denormalize(views: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """(N, 3, S, S) normalized views -> 0..255 values as float64."""
    m = np.asarray(mean, dtype=np.float64)[None, :, None, None]
    s = np.asarray(std, dtype=np.float64)[None, :, None, None]
    return (views.astype(np.float64) * s + m) * 255.0


def write_bad_files(folder: Path, source_jpeg: Path) -> dict[str, str]:
    """The bad-input cases of the policy, next to usable-but-awkward files.

    Returns {file name: "skip" | "keep"}.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = source_jpeg.read_bytes()
    image = Image.open(source_jpeg).convert("RGB")
    cases: dict[str, str] = {}
    # An interrupted download: the first 60% of a JPEG.
    (folder / "truncated.jpg").write_bytes(data[: len(data) * 6 // 10])
    cases["truncated.jpg"] = "skip"
    (folder / "notes.jpg").write_text("this is a text file with an image extension\n")
    cases["notes.jpg"] = "skip"
    (folder / "empty.jpeg").write_bytes(b"")
    cases["empty.jpeg"] = "skip"
    image.convert("CMYK").save(folder / "cmyk.jpg")
    cases["cmyk.jpg"] = "keep"
    image.convert("L").save(folder / "gray.png")
    cases["gray.png"] = "keep"
    image.convert("L").save(folder / "gray.jpg")
    cases["gray.jpg"] = "keep"
    image.convert("RGBA").save(folder / "alpha.png")
    cases["alpha.png"] = "keep"
    image.resize((20, 20)).save(folder / "tiny.jpg")
    cases["tiny.jpg"] = "keep"
    # Not an image extension: ignored by the scan, not counted as bad.
    (folder / "README.txt").write_text("ignored\n")
    return cases
