"""The augmentation spec and its vectorized samplers against torchvision's own definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms

from dino_fast.data.affine_color import color_transforms
from dino_fast.data.augment import (
    MultiCropAugmentation,
    sample_crop_boxes,
    sample_view_params,
)


def test_defaults_are_the_official_dino_numbers() -> None:
    aug = MultiCropAugmentation()
    assert (aug.global_crop_size, aug.local_crop_size) == (224, 96)
    assert aug.global_crops_scale == (0.4, 1.0) and aug.local_crops_scale == (0.05, 0.4)
    assert aug.local_crops_number == 8 and aug.flip_p == 0.5
    assert (aug.brightness, aug.contrast, aug.saturation, aug.hue, aug.color_jitter_p) == (
        0.4,
        0.4,
        0.2,
        0.1,
        0.8,
    )
    assert aug.grayscale_p == 0.2 and aug.blur_sigma == (0.1, 2.0) and aug.blur_p == (1.0, 0.1, 0.5)
    assert aug.solarize_p == 0.2 and aug.solarize_threshold == 128
    assert aug.mean == (0.485, 0.456, 0.406) and aug.std == (0.229, 0.224, 0.225)
    views = aug.views()
    assert [v.size for v in views] == [224, 224] + [96] * 8
    assert [v.blur_p for v in views] == [1.0, 0.1] + [0.5] * 8
    # Solarization belongs to global view 2 alone.
    assert [v.solarize_p for v in views] == [0.0, 0.2] + [0.0] * 8


@pytest.mark.parametrize(
    "bad",
    [
        {"global_crops_scale": (0.0, 1.0)},
        {"local_crops_scale": (0.5, 0.4)},
        {"flip_p": 1.5},
        {"blur_p": (1.0, 0.1)},
        {"local_crops_number": -1},
        {"std": (0.2, 0.0, 0.2)},
        {"hue": 0.7},
    ],
)
def test_invalid_numbers_are_rejected_with_the_field_name(bad: dict) -> None:
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field.split("[")[0]):
        MultiCropAugmentation(**bad)


# Sizes chosen to hit every branch: square, wide, tall, an aspect ratio outside [3/4, 4/3]
# (fallback clamps the ratio), and 1x1 / 3x2 images where most attempts do not fit.
@pytest.mark.parametrize("size", [(256, 256), (375, 500), (500, 120), (1, 1), (3, 2)])
@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_boxes_follow_torchvision_random_resized_crop(size: tuple[int, int], scale: tuple) -> None:
    height, width = size
    n = 4000
    ratio = (3 / 4, 4 / 3)
    ours = sample_crop_boxes(np.random.default_rng(0), np.full(n, height), np.full(n, width), scale, ratio)
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    ref = np.array(
        [transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)]
    )
    # Every box lies inside the image and is non-empty.
    assert (ours[:, 2] >= 1).all() and (ours[:, 3] >= 1).all()
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)
    center_y = lambda b: (b[:, 0] + b[:, 2] / 2) / height
    for stat in (area, center_y, lambda b: b[:, 3] / b[:, 2]):
        a, r = stat(ours), stat(ref)
        se = math.sqrt(a.var() / n + r.var() / n) + 1e-12
        # 4.5 standard errors: fixed seeds make this deterministic; the margin makes it robust.
        assert abs(a.mean() - r.mean()) < 4.5 * se + 1e-9, (a.mean(), r.mean())
        assert np.quantile(a, [0.1, 0.5, 0.9]) == pytest.approx(np.quantile(r, [0.1, 0.5, 0.9]), abs=0.05)


def test_crop_fallback_is_torchvisions_center_crop() -> None:
    # A 1000x10 strip: no attempt of scale >= 0.9 with ratio <= 4/3 fits, so the fallback
    # decides, deterministically: full width... clamped to ratio 4/3 of the height.
    rng = np.random.default_rng(0)
    ours = sample_crop_boxes(rng, np.array([10]), np.array([1000]), (0.9, 1.0), (3 / 4, 4 / 3))
    ref = transforms.RandomResizedCrop.get_params(torch.empty(3, 10, 1000), [0.9, 1.0], [3 / 4, 4 / 3])
    assert tuple(ours[0]) == tuple(ref)


def _apply(matrix: np.ndarray, offset: float, image: np.ndarray) -> np.ndarray:
    gray_mean = (image @ np.array([0.299, 0.587, 0.114])).mean()
    return image @ matrix.T + offset * gray_mean


@pytest.mark.parametrize("grayscale", [False, True])
def test_color_transform_equals_every_order_of_torchvision_jitter(grayscale: bool) -> None:
    # Mid-range colors and mild factors keep every intermediate inside [0, 1], where
    # torchvision's per-step clamp is inactive: then all 6 orders of brightness, contrast
    # and saturation must equal the single affine transform exactly (float64).
    rng = np.random.default_rng(3)
    image = rng.uniform(0.35, 0.6, size=(7, 5, 3))
    b, c, s = 1.15, 0.8, 1.2
    m, k, _ = color_transforms(
        np.array([b]), np.array([c]), np.array([s]), np.array([0.0]), np.array([grayscale])
    )
    ours = _apply(m[0], k[0], image)
    steps = {
        "b": lambda t: TF.adjust_brightness(t, b),
        "c": lambda t: TF.adjust_contrast(t, c),
        "s": lambda t: TF.adjust_saturation(t, s),
    }
    for order in itertools.permutations("bcs"):
        t = torch.from_numpy(image).permute(2, 0, 1).clone()
        for name in order:
            t = steps[name](t)
        if grayscale:
            t = TF.rgb_to_grayscale(t, num_output_channels=3)
        ref = t.permute(1, 2, 0).numpy()
        # 1e-4: torchvision's tensor grayscale weighs red 0.2989, PIL (and we) 0.299.
        np.testing.assert_allclose(ours, ref, atol=1e-4, err_msg=f"order {order}")


@pytest.mark.parametrize("hue", [-0.1, -0.04, 0.05, 0.1])
def test_hue_rotation_moves_hue_like_torchvision(hue: float) -> None:
    # Saturated, fully bright colors around the wheel: the YIQ rotation must move the HSV
    # hue by (nearly) the same signed amount as torchvision's HSV shift.
    angles = np.linspace(0, 1, 24, endpoint=False)
    hsv = torch.tensor(np.stack([angles, np.full(24, 0.6), np.full(24, 0.8)], axis=1))
    rgb = _hsv_to_rgb(hsv.numpy())
    m, k, t = color_transforms(np.ones(1), np.ones(1), np.ones(1), np.array([hue]), np.zeros(1, dtype=bool))
    ours = rgb @ m[0].T
    ref = TF.adjust_hue(torch.from_numpy(rgb.T[:, :, None].copy()), hue)[:, :, 0].T.numpy()
    shift_ours = _wrap(_rgb_to_hue(ours) - angles)
    shift_ref = _wrap(_rgb_to_hue(ref) - angles)
    assert shift_ref.mean() == pytest.approx(hue, abs=1e-3)
    # YIQ is not HSV: the shift varies around the wheel (by up to ~40%), but its average
    # matches and no color moves the wrong way.
    assert shift_ours.mean() == pytest.approx(hue, rel=0.1)
    assert np.abs(shift_ours - shift_ref).max() < 0.55 * abs(hue)
    assert (np.sign(shift_ours) == np.sign(hue)).all()
    assert k[0] == 0.0 and t[0] == 0.0  # factors of 1: no blend, nothing truncated


def _wrap(x: np.ndarray) -> np.ndarray:
    return (x + 0.5) % 1.0 - 0.5


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    import colorsys

    return np.array([colorsys.hsv_to_rgb(*row) for row in hsv])


def _rgb_to_hue(rgb: np.ndarray) -> np.ndarray:
    import colorsys

    return np.array([colorsys.rgb_to_hsv(*np.clip(row, 0, 1))[0] for row in rgb])


def test_view_params_probabilities_and_neutral_values() -> None:
    aug = MultiCropAugmentation()
    n = 20000
    rng = np.random.default_rng(5)
    heights, widths = np.full(n, 375), np.full(n, 500)
    views = aug.views()
    global1 = sample_view_params(rng, heights, widths, views[0], aug)
    global2 = sample_view_params(rng, heights, widths, views[1], aug)
    local = sample_view_params(rng, heights, widths, views[2], aug)
    tol = 4.5 * math.sqrt(0.25 / n)
    assert global1.flip.mean() == pytest.approx(0.5, abs=tol)
    assert global1.jitter.mean() == pytest.approx(0.8, abs=tol)
    assert global1.grayscale.mean() == pytest.approx(0.2, abs=tol)
    assert global1.blur.all() and global2.blur.mean() == pytest.approx(0.1, abs=tol)
    assert local.blur.mean() == pytest.approx(0.5, abs=tol)
    assert global2.solarize.mean() == pytest.approx(0.2, abs=tol) and not global1.solarize.any()
    assert not local.solarize.any()
    # Where jitter does not apply its factors are neutral.
    off = ~global1.jitter
    assert (global1.brightness[off] == 1).all() and (global1.contrast[off] == 1).all()
    assert (global1.saturation[off] == 1).all() and (global1.hue[off] == 0).all()
    # ColorJitter's order is a permutation of its four steps, each of the 24 about equally
    # often (n / 24 ~ 833 per order; 4.5 binomial standard deviations ~ 130).
    assert (np.sort(global1.order, axis=1) == np.arange(4)).all()
    counts = np.unique(global1.order @ (4 ** np.arange(4)), return_counts=True)[1]
    assert len(counts) == 24 and np.abs(counts - n / 24).max() < 4.5 * math.sqrt(n / 24)
    on = global1.jitter
    assert global1.brightness[on].min() >= 0.6 and global1.brightness[on].max() <= 1.4
    assert global1.saturation[on].min() >= 0.8 and global1.saturation[on].max() <= 1.2
    assert np.abs(global1.hue[on]).max() <= 0.1
    assert global1.sigma[global1.blur].min() >= 0.1 and global1.sigma[global1.blur].max() <= 2.0


def test_affine_truncation_offset_counts_the_blends_that_truncate() -> None:
    # PIL copies the image for a factor of exactly 1 (no blend, no truncation); every other
    # factor truncates once, half a level on average.
    _, _, t = color_transforms(
        np.array([1.2, 1.0, 0.7]),
        np.array([1.0, 1.0, 1.3]),
        np.array([0.9, 1.0, 1.1]),
        np.zeros(3),
        np.zeros(3, dtype=bool),
    )
    assert t.tolist() == [1.0, 0.0, 1.5]
