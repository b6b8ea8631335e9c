"""Statistical agreement of the DALI pipeline (CPU operators) with the torchvision reference.

Both pipelines read the same files in the same order (same seed) with different random
streams, so their statistics are compared as two samples: rates within 4.5 standard errors,
distributions by a two-sample Kolmogorov-Smirnov test at alpha = 1e-3. Seeds are fixed, so a
pass is reproducible; the margins make it robust to harmless changes of the random streams.
Special images make each effect observable (crop sizes are small to keep this fast):
- a coordinate image (R = x, G = y): a crop's output reveals its box and whether it flipped;
- a uniform pastel image: grayscale views have R = G = B, solarized views drop below 128
  (every channel stays >= 128 under any jitter), and the mean tracks brightness;
- real photos with the full default augmentation: output mean and std.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.data import MultiCropAugmentation, make_loader
from tests.helpers.images import coordinate_image, denormalize
from tests.helpers.photos import photo_folder

KS_C = math.sqrt(-0.5 * math.log(1e-3 / 2))  # alpha = 1e-3


def ks_statistic(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS distance and its alpha = 1e-3 critical value."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = np.abs(
        np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)
    )
    return float(d.max()), KS_C * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def assert_same_rate(a: np.ndarray, b: np.ndarray, expected: float | None = None) -> None:
    pa, pb = a.mean(), b.mean()
    p = (a.sum() + b.sum()) / (len(a) + len(b))
    se = math.sqrt(max(p * (1 - p), 1e-4) * (1 / len(a) + 1 / len(b)))
    assert abs(pa - pb) < 4.5 * se, (pa, pb)
    if expected is not None:
        for rate, n in ((pa, len(a)), (pb, len(b))):
            assert abs(rate - expected) < 4.5 * math.sqrt(max(expected * (1 - expected), 1e-4) / n), (
                rate,
                expected,
            )


def collect(
    kind: str, root: Path, aug: MultiCropAugmentation, epochs: int, batch_size: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """All views, denormalized to 0..255: one (N, 3, S, S) array per view position, and the
    (N,) dataset index of each row."""
    loader = make_loader(
        kind,
        root,
        batch_size=batch_size,
        local_crops_number=aug.local_crops_number,
        augment=aug,
        device="cpu",
        dtype=torch.float32,
        num_workers=0 if kind == "torchvision" else 2,
        seed=11,
    )
    per_view: list[list[np.ndarray]] = [[] for _ in range(aug.num_views)]
    indices = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            indices.append(batch.indices.numpy())
            for v, crops in enumerate(batch.crops()):
                per_view[v].append(denormalize(crops.numpy(), aug.mean, aug.std))
    return [np.concatenate(chunks) for chunks in per_view], np.concatenate(indices)


def _copies(folder: Path, image: np.ndarray, n: int, prefix: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(image).save(folder / f"{prefix}{i:03d}.png")
    return folder


def crop_geometry(views: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area fraction, log aspect ratio and flip of each crop of the coordinate image.

    Output column j of a crop [x0, x0 + w) of size S samples x = x0 + (j + 0.5) w / S, so the
    least-squares slope of R over the columns is w / S (negative when flipped); same for G, h.
    """
    size = views.shape[-1]
    j = np.arange(size) - (size - 1) / 2
    r_cols = views[:, 0].mean(axis=1)  # (N, S): R averaged over rows
    g_rows = views[:, 1].mean(axis=2)  # (N, S): G averaged over columns
    slope_x = (r_cols * j).sum(axis=1) / (j * j).sum()
    slope_y = (g_rows * j).sum(axis=1) / (j * j).sum()
    w, h = np.abs(slope_x) * size, slope_y * size
    return w * h / (width * height), np.log(w / h), slope_x < 0


@pytest.mark.slow
def test_crop_areas_aspect_ratios_and_flips_agree(tmp_path: Path) -> None:
    width, height = 240, 180
    root = _copies(tmp_path / "coords", coordinate_image(width, height), 48)
    # Color ops and blur off: the ramp must reach the output intact to be read back.
    aug = MultiCropAugmentation(
        global_crop_size=32,
        local_crop_size=16,
        local_crops_number=2,
        color_jitter_p=0.0,
        grayscale_p=0.0,
        solarize_p=0.0,
        blur_p=(0.0, 0.0, 0.0),
    )
    stats = {}
    for kind in ("dali", "torchvision"):
        views, _ = collect(kind, root, aug, epochs=8, batch_size=16)
        stats[kind] = {
            "global": crop_geometry(np.concatenate(views[:2]), width, height),
            "local": crop_geometry(np.concatenate(views[2:]), width, height),
        }
    for group, scale in (("global", aug.global_crops_scale), ("local", aug.local_crops_scale)):
        (area_d, aspect_d, flip_d), (area_t, aspect_t, flip_t) = (
            stats["dali"][group],
            stats["torchvision"][group],
        )
        assert len(area_d) == len(area_t) >= 768
        assert_same_rate(flip_d, flip_t, expected=0.5)
        for a, b in ((area_d, area_t), (aspect_d, aspect_t)):
            d, critical = ks_statistic(a, b)
            assert d < critical, (group, d, critical)
        # And both follow the spec: areas within the scale range (up to estimation error at
        # the image border; large areas are rarer than U(scale) since boxes must fit), log
        # aspect within log(3/4)..log(4/3).
        for area in (area_d, area_t):
            assert np.quantile(area, 0.01) > scale[0] - 0.02 and np.quantile(area, 0.99) < scale[1] + 0.02
        assert np.abs(aspect_d).max() < math.log(4 / 3) + 0.05


@pytest.mark.slow
def test_grayscale_solarize_and_brightness_agree(tmp_path: Path) -> None:
    # Pastel: every channel stays >= 128 under any jitter, so a view is solarized iff it drops
    # below 128 (but a bright factor can clamp it to white, which looks gray).
    # Brown: no jitter clamps or grays it (saturation >= 0.8), so it is gray iff grayscaled.
    pastel = np.broadcast_to(np.array([245, 235, 228], dtype=np.uint8), (16, 16, 3)).copy()
    brown = np.broadcast_to(np.array([150, 100, 60], dtype=np.uint8), (16, 16, 3)).copy()
    root = _copies(tmp_path / "uniform", pastel, 32, prefix="a")
    _copies(root, brown, 32, prefix="b")
    aug = MultiCropAugmentation(global_crop_size=8, local_crop_size=8, local_crops_number=1)
    results = {kind: collect(kind, root, aug, epochs=24, batch_size=64) for kind in ("dali", "torchvision")}
    for v, solarize_p in enumerate((0.0, aug.solarize_p, 0.0)):
        (views_d, idx_d), (views_t, idx_t) = results["dali"], results["torchvision"]
        dali, ref = views_d[v], views_t[v]
        assert len(dali) == len(ref) == 1536
        is_gray = lambda x: np.abs(x - x[:, :1]).max(axis=(1, 2, 3)) < 1.0
        assert_same_rate(is_gray(dali[idx_d >= 32]), is_gray(ref[idx_t >= 32]), expected=aug.grayscale_p)
        # Rounded: unjittered views tie at one level, which float noise must not split.
        level_d, level_t = np.rint(dali.mean(axis=(1, 2, 3))), np.rint(ref.mean(axis=(1, 2, 3)))
        solar_d, solar_t = level_d[idx_d < 32] < 128, level_t[idx_t < 32] < 128
        assert_same_rate(solar_d, solar_t, expected=solarize_p)
        # Brightness (applied with p = 0.8, factor U(0.6, 1.4)) sets the level of a uniform
        # view: per color, its distribution must agree (solarized pastel views left out).
        for pick in (lambda i: i < 32, lambda i: i >= 32):
            sel_d = pick(idx_d) & ~((idx_d < 32) & (level_d < 128))
            sel_t = pick(idx_t) & ~((idx_t < 32) & (level_t < 128))
            d, critical = ks_statistic(level_d[sel_d], level_t[sel_t])
            assert d < critical, (v, d, critical)


@pytest.mark.slow
def test_output_mean_and_std_agree_on_real_photos(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "photos")
    aug = MultiCropAugmentation(global_crop_size=32, local_crop_size=16, local_crops_number=2)
    results = {kind: collect(kind, root, aug, epochs=6, batch_size=29)[0] for kind in ("dali", "torchvision")}
    groups = {"global 1": [0], "global 2": [1], "local": [2, 3]}
    for name, views in groups.items():
        dali = np.concatenate([results["dali"][v] for v in views])
        ref = np.concatenate([results["torchvision"][v] for v in views])
        for stat in ("mean", "std"):
            per_view_d = getattr(dali, stat)(axis=(2, 3))  # (N, 3) per channel
            per_view_t = getattr(ref, stat)(axis=(2, 3))
            se = np.sqrt(per_view_d.var(axis=0) / len(dali) + per_view_t.var(axis=0) / len(ref))
            gap = np.abs(per_view_d.mean(axis=0) - per_view_t.mean(axis=0))
            assert (gap < 4.5 * se).all(), (name, stat, gap, se)
            d, critical = ks_statistic(per_view_d.mean(axis=1), per_view_t.mean(axis=1))
            assert d < critical, (name, stat, d, critical)
