"""Hand-made statistics that check where the synthetic class signal lives.

``colour_od_stats`` is what a first-order baseline sees on plain pixels: per-channel optical
density means, spreads and percentiles over nuclear and all pixels, plus a fine-texture energy.
``cord_fineness`` measures the default class difference itself: how much of the nuclear fine
chromatin energy sits in the finer of two bands (lesion cords are finer), meaningful only where
the cords are resolved. ``cord_alignment`` measures the other cue: how well the streaks line up
with each nucleus's long axis (double-angle agreement between the fine-scale structure tensor
and the nucleus-scale Hessian).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from analysis.synth import GLASS_RGB

NUCLEAR_RED_OD = 0.5  # red optical density above which a pixel counts as nuclear


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 transmitted light -> (..., 3) float64 natural-log optical density."""
    return -np.log(np.maximum(rgb.astype(np.float64), 1.0) / GLASS_RGB.astype(np.float64))


def colour_od_stats(rgb: np.ndarray) -> np.ndarray:
    """(20,) first-order colour/OD statistics of an (h, w, 3) image (any magnification)."""
    od = optical_density(rgb)
    nuclear = od[..., 0] > NUCLEAR_RED_OD
    if not nuclear.any():
        nuclear = np.ones(od.shape[:2], dtype=bool)
    values = od[nuclear]  # (n, 3)
    grey = rgb.astype(np.float64).mean(axis=-1)
    return np.concatenate(
        [
            values.mean(axis=0),
            values.std(axis=0),
            np.percentile(values, [10, 50, 90], axis=0).ravel(),
            od.reshape(-1, 3).mean(axis=0),
            [nuclear.mean(), float((ndimage.laplace(grey) ** 2).mean())],
        ]
    )


def cord_fineness(rgb: np.ndarray, um_per_px: float) -> float:
    """Log ratio of fine- to mid-band chromatin energy over nuclear pixels (higher: finer cords).

    The bands are differences of Gaussians at 0.5/0.8 and 0.8/1.6 20x pixels, scaled to the
    image's resolution; at 5x both fall below one pixel, so the ratio carries no class signal.
    """
    scale = 0.5 / um_per_px  # pixels per 20x pixel
    od = optical_density(rgb)[..., 0]
    nuclear = ndimage.gaussian_filter(od, 1.0 * scale) > NUCLEAR_RED_OD
    if not nuclear.any():
        return 0.0
    g = {s: ndimage.gaussian_filter(od, s * scale) for s in (0.5, 0.8, 1.6)}
    fine = ((g[0.5] - g[0.8]) ** 2)[nuclear].mean()
    mid = ((g[0.8] - g[1.6]) ** 2)[nuclear].mean()
    return float(np.log((fine + 1e-12) / (mid + 1e-12)))


def cord_alignment(rgb: np.ndarray, um_per_px: float) -> float:
    """Mean agreement (-1..1) of fine chromatin orientation with nucleus axes, nuclear pixels."""
    scale = 0.5 / um_per_px  # pixels per 20x pixel
    od = optical_density(rgb)[..., 0]
    nuclear = ndimage.gaussian_filter(od, 1.0 * scale) > NUCLEAR_RED_OD
    fine = ndimage.gaussian_filter(od, 0.7 * scale) - ndimage.gaussian_filter(od, 1.6 * scale)
    gy, gx = np.gradient(fine)
    sigma = 2.0 * scale
    jxx, jyy, jxy = (ndimage.gaussian_filter(a, sigma) for a in (gx * gx, gy * gy, gx * gy))
    coarse = ndimage.gaussian_filter(od, 4.0 * scale)
    dy = np.gradient(coarse, axis=0)
    hyy, hyx = np.gradient(dy, axis=(0, 1))
    hxx = np.gradient(np.gradient(coarse, axis=1), axis=1)
    texture = np.stack([jxx - jyy, 2 * jxy])
    texture /= np.linalg.norm(texture, axis=0) + 1e-12
    shape = np.stack([hxx - hyy, 2 * hyx])
    shape /= np.linalg.norm(shape, axis=0) + 1e-12
    agreement = -(texture * shape).sum(axis=0)  # texture gradient across the long axis: +1
    return float(agreement[nuclear].mean()) if nuclear.any() else 0.0
