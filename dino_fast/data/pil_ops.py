"""PIL's 8-bit color and blur operations, rebuilt from DALI operators.

The official augmentation runs torchvision on PIL images, and PIL stores every intermediate
image as uint8. The functions here reproduce PIL's arithmetic, truncations included, in a DALI
graph (CPU or GPU operators alike). Color functions take and return the three channel planes
``(r, g, b)`` as float32 DataNodes holding whole numbers 0..255, ``(H, W)`` or ``(F, H, W)``
for a sequence of views; per-image arguments broadcast against them (shape ``(1,)``, or
``(F, 1, 1)`` per frame) or are plain numbers. The sources they follow (Pillow 13,
torchvision 0.29):

- ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` (Convert.c, ``L24``).
- ``Image.blend(a, b, alpha)``: ``(uint8)(a + alpha (b - a))`` in float32, clipped: it
  truncates (Blend.c). ``ImageEnhance`` brightness, contrast and color (saturation) are blends
  with black, the image's rounded mean luma, and its per-pixel luma.
- torchvision's ``adjust_hue``: ``convert("HSV")``, ``H += uint8(int32(hue * 255))`` with
  wraparound, convert back (Convert.c ``rgb2hsv_row`` / ``hsv2rgb``).
- ``ImageFilter.GaussianBlur(r)``: three passes of an extended box blur per axis (BoxBlur.c),
  each rounded to uint8; ``box_blur_taps`` builds the per-sample taps on the host.
"""

from __future__ import annotations

import numpy as np

BOX_BLUR_PASSES = 3


def _math():
    from nvidia.dali import math as dmath

    return dmath


def luma(r, g, b):
    """PIL's ``convert("L")``. Every partial sum is an integer below 2^24: exact in float32."""
    return _math().floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) * (1.0 / 65536.0))


def blend(degenerate, image, alpha):
    """``Image.blend(degenerate, image, alpha)`` for one channel: truncated and clipped to 0..255."""
    dmath = _math()
    return dmath.floor(dmath.clamp(degenerate + alpha * (image - degenerate), 0.0, 255.0))


def enhance(rgb, alpha, contrast, saturation, mean_luma):
    """One of ImageEnhance's Brightness, Contrast or Color, chosen per sample without a branch.

    The degenerate image is black (brightness), the constant rounded mean luma (``contrast`` =
    1) or the per-pixel luma (``saturation`` = 1); ``alpha`` = 1 leaves the image unchanged.
    ``mean_luma(l)`` reduces a luma plane to its mean per image (per frame of a sequence).
    """
    dmath = _math()
    r, g, b = rgb
    lum = luma(r, g, b)
    level = dmath.floor(mean_luma(lum) + 0.5)
    degenerate = contrast * level + saturation * lum
    return tuple(blend(degenerate, c, alpha) for c in rgb)


def _times_255_truncated(x):
    """``(int)(x * 255.0)`` for float32 x in [0, 1], the product exact as in PIL's double.

    x * 256 is exact and so is (x * 256 - k) for the integer k below it, so the float32
    rounding of x * 255 = x * 256 - x, which can round up onto an integer, is undone exactly.
    """
    dmath = _math()
    x256 = x * 256.0
    k = dmath.floor(x256 - x)
    return k - ((x256 - k) < x)


def shift_hue(rgb, shift, apply):
    """torchvision's ``adjust_hue`` on a PIL image where ``apply`` = 1; the image where 0.

    ``shift`` = ``uint8(int32(hue_factor * 255))`` in 0..255. The HSV round trip is lossy
    (8-bit H and S), so an image is only converted where torchvision converts it.
    """
    dmath = _math()
    r, g, b = rgb
    maxc = dmath.max(r, dmath.max(g, b))
    minc = dmath.min(r, dmath.min(g, b))
    span = maxc - minc
    # Gray pixels (span 0) get H = S = 0 in PIL; the +1 only keeps the divisions finite.
    gray = span == 0.0
    safe_span = span + gray
    sat = _times_255_truncated(span / (maxc + gray))
    rc, gc, bc = ((maxc - c) / safe_span for c in rgb)
    # PIL picks the sector by the first channel equal to the max, in R, G, B order.
    is_r = r == maxc
    is_g = (g == maxc) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    # PIL: fmod(h / 6 + 1, 1), computed in double and stored as float: h / 6 rounded once.
    turns = h / 6.0 + (h < 0.0)
    hue = _times_255_truncated(turns) * (1.0 - gray)
    hue = hue + shift
    hue = hue - 256.0 * (hue >= 256.0)

    # HSV -> RGB: sector i = floor(6 h / 255) (6 only at h = 255, which is sector 0).
    sector = dmath.floor(hue * 6.0 / 255.0)
    # The fraction from its exact integer numerator: one rounding, as PIL's float f.
    f = (hue * 6.0 - 255.0 * sector) / 255.0
    sector = sector - 6.0 * (sector >= 6.0)
    fs = sat / 255.0
    p = dmath.floor(maxc * (1.0 - fs) + 0.5)
    q = dmath.floor(maxc * (1.0 - fs * f) + 0.5)
    t = dmath.floor(maxc * (1.0 - fs * (1.0 - f)) + 0.5)
    v = maxc
    # Booleans add with |; the sectors are exclusive.
    e0, e1, e2, e3, e4, e5 = (sector == float(k) for k in range(6))
    out = (
        v * (e0 | e5) + q * e1 + p * (e2 | e3) + t * e4,
        t * e0 + v * (e1 | e2) + q * e3 + p * (e4 | e5),
        p * (e0 | e1) + t * e2 + v * (e3 | e4) + q * e5,
    )
    return tuple(c + apply * (o - c) for c, o in zip(rgb, out, strict=True))


def hue_shift_levels(hue: np.ndarray) -> np.ndarray:
    """torchvision's 8-bit hue offset ``uint8(int32(hue * 255))`` (truncated, wrapped), as float32."""
    return (np.asarray(hue, dtype=np.float64) * 255).astype(np.int32).astype(np.uint8).astype(np.float32)


def box_blur_radius(sigma: np.ndarray) -> np.ndarray:
    """PIL's ``_gaussian_blur_radius``: the extended box radius whose 3 passes have variance sigma^2.

    A box of radius l + a (a fractional weight a on the two outer taps) has variance
    ((2l+1)(l(l+1)/3) + 2a(l+1)^2) / (2l+1+2a); solving for a at variance sigma^2 / passes gives
    the formula below (Gwosdek et al., "Theoretical foundations of Gaussian convolution by
    extended box filtering"). Computed in float32, as PIL does.
    """
    f32 = np.float32
    sigma = np.asarray(sigma, dtype=f32)
    sigma2 = sigma * sigma / f32(BOX_BLUR_PASSES)
    length = np.sqrt(f32(12.0) * sigma2 + f32(1.0)).astype(f32)
    inner = np.floor((length - f32(1.0)) / f32(2.0)).astype(f32)
    a = (f32(2) * inner + f32(1)) * (inner * (inner + f32(1)) - f32(3) * sigma2)
    a = a / (f32(6) * (sigma2 - (inner + f32(1)) * (inner + f32(1))))
    return (inner + a).astype(f32)


def box_blur_taps(sigma: np.ndarray, blur: np.ndarray, max_sigma: float) -> np.ndarray:
    """Per-sample taps ``(n, 2 R + 3)`` of one box pass, R the integer radius at ``max_sigma``.

    PIL weighs the 2 r + 1 inner taps by ww = 2^24 / (2 r_f + 1) (truncated) and the two outer
    ones by (2^24 - (2 r + 1) ww) / 2, in 24-bit fixed point; samples without blur get the
    identity tap. Zero taps pad every row to one length.
    """
    n = len(sigma)
    widest = int(box_blur_radius(np.array([max_sigma]))[0])
    taps = np.zeros((n, 2 * widest + 3), dtype=np.float32)
    center = widest + 1
    radius_f = box_blur_radius(np.where(blur, sigma, 1.0))
    for i in range(n):
        if not blur[i]:
            taps[i, center] = 1.0
            continue
        radius = int(radius_f[i])
        inner = int(np.float32(1 << 24) / (radius_f[i] * np.float32(2) + np.float32(1)))
        outer = ((1 << 24) - (2 * radius + 1) * inner) // 2
        taps[i, center - radius : center + radius + 1] = inner / 2**24
        taps[i, center - radius - 1] = taps[i, center + radius + 1] = outer / 2**24
    return taps


def box_blur(fn, image, taps_row, taps_col):
    """PIL's GaussianBlur on an HWC uint8 image: the horizontal passes, then the vertical ones,
    each rounded to uint8, borders repeating the edge pixel."""
    for _ in range(BOX_BLUR_PASSES):
        image = fn.filter(image, taps_row, border="clamp")
    for _ in range(BOX_BLUR_PASSES):
        image = fn.filter(image, taps_col, border="clamp")
    return image
