"""What the DALI pipeline is fed for a step besides the files: the per-view parameters drawn on
the host (``augment.sample_view_params``), laid out as the graph's per-sample inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dino_fast.data.affine_color import color_transforms
from dino_fast.data.augment import ViewParams, ViewSpec
from dino_fast.data.pil_ops import box_blur_taps, hue_shift_levels

# The color inputs of a group of F views, by ``color_ops``: the rank of each array. Per frame
# values have shape (F, 1, 1) to broadcast over the group's (F, H, W) channel planes.
# "pil": 3 x (6, F, 1, 1) enhance slots, the hue shift and switch, the grayscale switch;
# "affine": the color matrix (3, 3, F, 1, 1), the gray-mean coefficient, the truncation offset.
COLOR_INPUT_NDIMS = {"pil": [4, 4, 4, 3, 3, 3], "affine": [5, 3, 3]}


def jitter_slots(p: ViewParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ColorJitter's brightness, contrast and saturation steps placed in the graph's six
    enhance slots: slots 0-2 run before the hue step, 3-5 after it.

    The step at position k of ``p.order`` goes to slot k if it comes before hue, k + 2 if after,
    so the drawn order is kept; unused slots get alpha = 1 (unchanged). Returns ``alpha``
    (the factor), ``contrast`` and ``saturation`` (0/1, which degenerate image), each (n, 6) float32.
    """
    n = len(p.order)
    position = np.arange(4)[None, :]
    hue_at = np.argmax(p.order == 3, axis=1)[:, None]
    slot = np.where(position < hue_at, position, position + 2)
    used = (p.order != 3) & p.jitter[:, None]
    rows = np.broadcast_to(np.arange(n)[:, None], (n, 4))[used]
    op = p.order[used]
    factors = np.stack([p.brightness, p.contrast, p.saturation], axis=1)
    alpha = np.ones((n, 6), dtype=np.float32)
    contrast = np.zeros((n, 6), dtype=np.float32)
    saturation = np.zeros((n, 6), dtype=np.float32)
    alpha[rows, slot[used]] = factors[rows, op]
    contrast[rows, slot[used]] = op == 1
    saturation[rows, slot[used]] = op == 2
    return alpha, contrast, saturation


@dataclass(frozen=True)
class StepPlan:
    """What the pipeline is fed for one step: dataset indices, files, and per-view parameters."""

    indices: np.ndarray
    paths: list[str]
    views: list[ViewParams]


def group_inputs(
    params: list[ViewParams], views: list[ViewSpec], color_ops: str, max_sigma: float
) -> list[np.ndarray]:
    """The color, blur and solarization inputs of one group of views, frames on axis 1."""

    def frames(arrays: list[np.ndarray], axis: int = 1) -> np.ndarray:
        return np.stack(arrays, axis=axis).astype(np.float32)[..., None, None]

    if color_ops == "affine":
        transforms = [
            color_transforms(p.brightness, p.contrast, p.saturation, p.hue, p.grayscale) for p in params
        ]
        color = [
            frames([m for m, _, _ in transforms], axis=3),
            frames([k for _, k, _ in transforms]),
            frames([t for _, _, t in transforms]),
        ]
    else:
        slots = [jitter_slots(p) for p in params]
        color = [frames([s[i] for s in slots], axis=2) for i in range(3)]
        color += [
            frames([hue_shift_levels(p.hue) for p in params]),
            frames([p.jitter for p in params]),
            frames([p.grayscale for p in params]),
        ]
    taps = np.stack([box_blur_taps(p.sigma, p.blur, max_sigma) for p in params], axis=1)
    inputs = [*color, taps[:, :, None, :], np.ascontiguousarray(taps[:, :, :, None])]
    if any(v.solarize_p > 0 for v in views):
        inputs.append(np.stack([p.solarize for p in params], axis=1).astype(np.uint8)[:, :, None, None, None])
    return inputs
