"""The fast, approximate color jitter of the DALI pipeline (``color_ops="affine"``): one affine
color transform per view instead of PIL's 8-bit steps (``pil_ops``).

``out = round(M @ rgb + k * gray_mean(crop) - t)``. Derivation (rgb in [0, 255], w = luma
weights (0.299, 0.587, 0.114), m = mean over the crop of w . rgb):

    brightness b:  x -> b x
    contrast   c:  x -> c x + (1 - c) m' 1     (m' = gray mean of the image it is applied to)
    saturation s:  x -> S x,  S = s I + (1 - s) 1 w^T
    hue        h:  x -> H x,  H = Y^-1 R(-2 pi h) Y   (rotation of the I/Q plane of YIQ)
    grayscale:     x -> G x,  G = 1 w^T

S 1 = H 1 = 1 and w^T S = w^T H = w^T (gray is invariant), so the gray mean seen by the
contrast step is b m whatever the order, the four steps commute, and G H S = G. Hence, for any
order followed by optional grayscale, M = c b (G if grayscale else H S), k = (1 - c) b.
PIL truncates each blend step to uint8, which lowers a pixel by half a level on average per
step; ``t`` = 0.5 per step whose factor is not 1 keeps that mean. What stays different: one
clamp at the end instead of one per step, and the hue, which rotates YIQ (luma kept) where
torchvision shifts the 8-bit HSV hue (README gives the measured sizes).
"""

from __future__ import annotations

import numpy as np

# ITU-R 601-2 luma, the weights of PIL's convert("L") and of the Y row of YIQ.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=np.float64,
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def hue_matrices(hue: np.ndarray) -> np.ndarray:
    """(n, 3, 3) RGB matrices rotating the YIQ chroma plane by a hue shift of ``hue`` turns.

    A positive HSV hue shift moves red towards yellow, which is a negative angle in the I/Q
    plane (red sits at +19.5 degrees, yellow at -44 degrees), hence the minus sign.
    """
    theta = -2.0 * np.pi * np.asarray(hue, dtype=np.float64)
    n = theta.shape[0]
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1] = np.cos(theta)
    rot[:, 1, 2] = -np.sin(theta)
    rot[:, 2, 1] = np.sin(theta)
    rot[:, 2, 2] = np.cos(theta)
    return _YIQ_TO_RGB[None] @ rot @ _RGB_TO_YIQ[None]


def color_transforms(
    brightness: np.ndarray,
    contrast: np.ndarray,
    saturation: np.ndarray,
    hue: np.ndarray,
    grayscale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample ``M (n, 3, 3)``, ``k (n,)`` and ``t (n,)`` (see the module docstring)."""
    b = np.asarray(brightness, dtype=np.float64)
    c = np.asarray(contrast, dtype=np.float64)
    s = np.asarray(saturation, dtype=np.float64)
    ones_w = np.outer(np.ones(3), LUMA_WEIGHTS)[None]
    sat = s[:, None, None] * np.eye(3)[None] + (1.0 - s[:, None, None]) * ones_w
    color = hue_matrices(hue) @ sat
    gray = np.asarray(grayscale, dtype=bool)[:, None, None]
    m = (c * b)[:, None, None] * np.where(gray, ones_w, color)
    truncations = 0.5 * ((b != 1).astype(np.float64) + (c != 1) + (s != 1))
    return m, (1.0 - c) * b, truncations
