"""The DINO multi-crop augmentation, as numbers (one dataclass) and as vectorized samplers.

``MultiCropAugmentation`` holds every number of the official ``DataAugmentationDINO``
(facebookresearch/dino, main_dino.py): both pipelines read it, so changing a field changes
the torchvision reference and the DALI pipeline alike. The views it describes, in output order:

    view 0  global  crop ``global_crop_size``, scale ``global_crops_scale``, blur p = blur_p[0] (1.0)
    view 1  global  same crop, blur p = blur_p[1] (0.1), then solarization with p = ``solarize_p``
    view 2+ local   crop ``local_crop_size``, scale ``local_crops_scale``, blur p = blur_p[2] (0.5)

and every view gets, in order: RandomResizedCrop (bicubic), horizontal flip, color jitter
(brightness, contrast, saturation, hue) applied with p = ``color_jitter_p``, grayscale,
Gaussian blur with sigma ~ U(blur_sigma), [solarization], ImageNet normalization.

The samplers below draw the per-view random parameters for a whole batch at once with numpy
(the DALI pipeline feeds them to its GPU operators, which keeps every random decision in one
place, reproducible under a seed and inspectable by tests):

- ``sample_crop_boxes`` is torchvision's ``RandomResizedCrop.get_params`` vectorized: ten
  attempts of (area ~ U(scale) * H * W, log-aspect ~ U(log ratio)), first fitting box wins,
  center-crop fallback with the aspect ratio clamped into ``ratio``.
- ColorJitter's draws are kept as torchvision makes them: four factors and the order of
  its four steps (``torch.randperm(4)``: 0 brightness, 1 contrast, 2 saturation, 3 hue).
  ``dino_fast.data.pil_ops`` applies them with PIL's 8-bit arithmetic.
- ``sample_view_params`` draws everything one view needs for a batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """One output view: where it goes, its crop size and scale, and its view-specific probabilities."""

    index: int
    is_global: bool
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


@dataclass(frozen=True)
class MultiCropAugmentation:
    """Every number of the DINO multi-crop augmentation (defaults = the official DINO values)."""

    global_crop_size: int = 224
    local_crop_size: int = 96
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    aspect_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Blur probability of (global view 1, global view 2, every local view).
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    # Solarization applies to global view 2 only, as in the official code.
    solarize_p: float = 0.2
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"MultiCropAugmentation: {msg}")

        for name in ("global_crop_size", "local_crop_size"):
            if int(getattr(self, name)) < 1:
                fail(f"{name} must be a positive number of pixels, got {getattr(self, name)}")
        if self.local_crops_number < 0:
            fail(f"local_crops_number must be >= 0, got {self.local_crops_number}")
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                fail(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        lo, hi = self.aspect_ratio
        if not 0.0 < lo <= hi:
            fail(f"aspect_ratio must satisfy 0 < min <= max, got {(lo, hi)}")
        probabilities = {
            "flip_p": self.flip_p,
            "color_jitter_p": self.color_jitter_p,
            "grayscale_p": self.grayscale_p,
            "solarize_p": self.solarize_p,
            **{f"blur_p[{i}]": p for i, p in enumerate(self.blur_p)},
        }
        for name, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                fail(f"{name} is a probability and must lie in [0, 1], got {p}")
        if len(self.blur_p) != 3:
            fail(f"blur_p holds (global view 1, global view 2, local views), got {self.blur_p}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            fail("jitter strengths must be >= 0 and hue must lie in [0, 0.5]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            fail(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        if not 0 <= self.solarize_threshold <= 256:
            fail(f"solarize_threshold must lie in [0, 256], got {self.solarize_threshold}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            fail("mean and std need three channels and std must be positive")

    @property
    def num_views(self) -> int:
        return 2 + self.local_crops_number

    def replace(self, **changes: object) -> MultiCropAugmentation:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def views(self) -> list[ViewSpec]:
        """The 2 + local_crops_number views, in output order."""
        g, loc = self.global_crop_size, self.local_crop_size
        views = [
            ViewSpec(0, True, g, tuple(self.global_crops_scale), self.blur_p[0], 0.0),
            ViewSpec(1, True, g, tuple(self.global_crops_scale), self.blur_p[1], self.solarize_p),
        ]
        views += [
            ViewSpec(2 + i, False, loc, tuple(self.local_crops_scale), self.blur_p[2], 0.0)
            for i in range(self.local_crops_number)
        ]
        return views


def sample_crop_boxes(
    rng: np.random.Generator,
    heights: np.ndarray,
    widths: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params for every image at once.

    Returns int64 boxes ``(n, 4)`` as ``(top, left, height, width)`` in pixels.
    """
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    n = heights.shape[0]
    area = (heights * widths).astype(np.float64)[:, None]
    target_area = area * rng.uniform(scale[0], scale[1], size=(n, attempts))
    log_ratio = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, attempts))
    aspect = np.exp(log_ratio)
    # Python's round() is round-half-even, like np.rint.
    w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    found = fits.any(axis=1)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    box_h = h[rows, first]
    box_w = w[rows, first]

    # Center-crop fallback, the aspect ratio clamped into `ratio`.
    in_ratio = widths / np.maximum(heights, 1)
    fb_w = widths.copy()
    fb_h = heights.copy()
    narrow = in_ratio < ratio[0]
    wide = in_ratio > ratio[1]
    fb_h = np.where(narrow, np.rint(fb_w / ratio[0]).astype(np.int64), fb_h)
    fb_w = np.where(wide, np.rint(fb_h * ratio[1]).astype(np.int64), fb_w)
    box_h = np.where(found, box_h, np.maximum(fb_h, 1))
    box_w = np.where(found, box_w, np.maximum(fb_w, 1))

    # torch.randint(0, H - h + 1): uniform over the valid offsets.
    top = np.floor(rng.random(n) * (heights - box_h + 1)).astype(np.int64)
    left = np.floor(rng.random(n) * (widths - box_w + 1)).astype(np.int64)
    top = np.where(found, top, (heights - box_h) // 2)
    left = np.where(found, left, (widths - box_w) // 2)
    return np.stack([top, left, box_h, box_w], axis=1)


@dataclass(frozen=True)
class ViewParams:
    """Random parameters of one view for a batch of n images (all numpy, host memory).

    ``boxes`` (n, 4) int64 as (top, left, height, width); ``flip`` (n,) bool;
    ``jitter`` / ``grayscale`` / ``blur`` / ``solarize`` (n,) bool: whether each op applies;
    ``brightness``, ``contrast``, ``saturation``, ``hue``, ``sigma`` (n,) float64 (neutral values
    where the op does not apply); ``order`` (n, 4) int64: the jitter steps in the order applied
    (0 brightness, 1 contrast, 2 saturation, 3 hue).
    """

    boxes: np.ndarray
    flip: np.ndarray
    jitter: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    grayscale: np.ndarray
    blur: np.ndarray
    sigma: np.ndarray
    solarize: np.ndarray
    order: np.ndarray


def sample_view_params(
    rng: np.random.Generator,
    heights: np.ndarray,
    widths: np.ndarray,
    view: ViewSpec,
    aug: MultiCropAugmentation,
) -> ViewParams:
    """Draw every random decision of one view for a batch of images of the given sizes."""
    n = len(heights)
    boxes = sample_crop_boxes(rng, heights, widths, view.scale, aug.aspect_ratio)
    flip = rng.random(n) < aug.flip_p
    jitter = rng.random(n) < aug.color_jitter_p

    def factor(strength: float) -> np.ndarray:
        return rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=n)

    brightness = np.where(jitter, factor(aug.brightness), 1.0)
    contrast = np.where(jitter, factor(aug.contrast), 1.0)
    saturation = np.where(jitter, factor(aug.saturation), 1.0)
    hue = np.where(jitter, rng.uniform(-aug.hue, aug.hue, size=n), 0.0)
    grayscale = rng.random(n) < aug.grayscale_p
    # The official GaussianBlur applies when random() <= p, so p = 1.0 always blurs.
    blur = rng.random(n) <= view.blur_p if view.blur_p > 0 else np.zeros(n, dtype=bool)
    sigma = np.where(blur, rng.uniform(aug.blur_sigma[0], aug.blur_sigma[1], size=n), 0.0)
    solarize = rng.random(n) < view.solarize_p
    # A uniform random permutation per view, like torch.randperm(4).
    order = np.argsort(rng.random((n, 4)), axis=1)
    return ViewParams(
        boxes=boxes,
        flip=flip,
        jitter=jitter,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue,
        grayscale=grayscale,
        blur=blur,
        sigma=sigma,
        solarize=solarize,
        order=order,
    )
