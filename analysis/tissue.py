"""Tissue mask and the patch grid.

The mask is computed at about ``mask_mpp`` µm/px (16 by default: a 128 µm cell is 8 x 8 mask
pixels, and a 16k x 16k 20x slide is a 500 x 500 image read from a thumbnail-sized pyramid
level): HSV saturation, an Otsu threshold clipped to a sane range, pen ink (blue, green, black)
rejected, then morphology (closing, hole filling, opening, removal of small objects). Every step
is a vectorised pass over that small image (hue only for the few strongly saturated pixels, the
3x3 median by a sorting network), so the tissue stage costs tens of milliseconds.

The grid is computed once per slide in level-0 pixels: cells of ``patch_um`` µm, side
``patch_um / slide.mpp`` (a float), top-left of cell (row, col) at
``(round(col * side), round(row * side))``. It does not depend on the magnification the
cells are later read at, so a 20x patch and a 5x patch of one cell show the same tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from analysis.errors import MagnificationUnavailableError, NoTissueError
from analysis.slides import PATCH_UM, Slide

MASK_MPP = 16.0  # µm per tissue-mask pixel


@dataclass(frozen=True)
class TissueMaskConfig:
    """Thresholds of ``tissue_mask_from_rgb``; saturation and value on a 0-1 scale."""

    min_saturation: float = 0.05  # Otsu is clipped to [min, max]: a blank slide stays blank
    max_saturation: float = 0.16  # ... and an all-tissue field keeps its pale regions
    median_px: int = 3  # median filter on saturation first: pixel noise is not tissue
    dark_value: float = 0.16  # max(R, G, B) below this is black ink, dust or a slide edge
    ink_saturation: float = 0.40  # blue/green ink is far more saturated than pale stain
    blue_hue_deg: tuple[float, float] = (185.0, 238.0)  # hematoxylin sits at ~240-300°
    green_hue_deg: tuple[float, float] = (65.0, 185.0)  # H&E has no green at all
    ink_margin_px: int = 1  # dilate ink so its anti-aliased fringe is not taken for tissue
    close_iterations: int = 2
    open_iterations: int = 1
    min_object_px: int = 16  # connected components smaller than this are dropped


@dataclass
class TissueMask:
    mask: np.ndarray  # (H, W) bool, True = tissue
    l0_per_px: float  # level-0 pixels per mask pixel
    mpp: float  # µm per mask pixel


@dataclass
class PatchGrid:
    l0_xy: np.ndarray  # (N, 2) int64, top-left of each cell in level-0 px (x, y)
    grid_rc: np.ndarray  # (N, 2) int64, (row, col) of each cell
    l0_patch_size: float  # cell side in level-0 px = patch_um / slide.mpp
    n_rows: int
    n_cols: int
    tissue_fraction: np.ndarray  # (N,) float32
    mpp: float  # level-0 µm/px the grid was computed with
    patch_um: float

    def __len__(self) -> int:
        return len(self.l0_xy)

    def to_dict(self) -> dict[str, Any]:
        return {
            "l0_xy": self.l0_xy.tolist(),
            "grid_rc": self.grid_rc.tolist(),
            "l0_patch_size": self.l0_patch_size,
            "n_rows": self.n_rows,
            "n_cols": self.n_cols,
            "tissue_fraction": [float(f) for f in self.tissue_fraction],
            "mpp": self.mpp,
            "patch_um": self.patch_um,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PatchGrid:
        return cls(
            l0_xy=np.asarray(d["l0_xy"], dtype=np.int64).reshape(-1, 2),
            grid_rc=np.asarray(d["grid_rc"], dtype=np.int64).reshape(-1, 2),
            l0_patch_size=float(d["l0_patch_size"]),
            n_rows=int(d["n_rows"]),
            n_cols=int(d["n_cols"]),
            tissue_fraction=np.asarray(d["tissue_fraction"], dtype=np.float32).reshape(-1),
            mpp=float(d["mpp"]),
            patch_um=float(d["patch_um"]),
        )


# -- mask from pixels --------------------------------------------------------------------------


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> hue in degrees [0, 360), saturation and value in [0, 1]."""
    x = rgb.astype(np.float32) / 255.0  # (H, W, 3)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    value = x.max(axis=-1)
    chroma = value - x.min(axis=-1)
    saturation = np.where(value > 0, chroma / np.maximum(value, 1e-6), 0.0)
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(
        value == r,
        ((g - b) / safe) % 6.0,
        np.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(chroma > 0, hue * 60.0, 0.0)
    return hue.astype(np.float32), saturation.astype(np.float32), value.astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (between-class variance maximised)."""
    if values.size == 0:
        return 0.5
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = m0 / np.maximum(w0, 1e-12)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _value_and_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> max(R, G, B) and max - min, both (H, W) uint8."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = np.maximum(np.maximum(r, g), b)
    return value, value - np.minimum(np.minimum(r, g), b)


def _saturation(value: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] as float32 from uint8 value and chroma."""
    return chroma.astype(np.float32) / np.maximum(value, 1).astype(np.float32)


def _median3(image: np.ndarray) -> np.ndarray:
    """3x3 median filter (edges replicated, as ``ndimage.median_filter(mode='nearest')``).

    A sorting network over the nine shifted views: a few dozen vectorised min/max passes
    instead of a sort per pixel.
    """
    padded = np.pad(image, 1, mode="edge")
    h, w = image.shape
    v = [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]

    def sort2(i: int, j: int) -> None:
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])

    # Paeth's 19-comparator median-of-9 network; the median ends in v[4].
    for i, j in (
        (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8),
        (0, 3), (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
    ):  # fmt: skip
        sort2(i, j)
    return v[4]


def ink_mask_from_rgb(rgb: np.ndarray, config: TissueMaskConfig | None = None) -> np.ndarray:
    """(H, W) bool: pen ink (blue, green) and near-black pixels.

    Hue is only computed for the few strongly saturated pixels that could be ink.
    """
    config = config or TissueMaskConfig()
    value, chroma = _value_and_chroma(rgb)
    ink = value < config.dark_value * 255.0
    saturated = (chroma.astype(np.float32) >= config.ink_saturation * value) & (chroma > 0)
    if saturated.any():
        where = np.nonzero(saturated)
        hue, _, _ = rgb_to_hsv(rgb[where][None])  # (1, K) degrees
        hue = hue[0]
        blue = (hue >= config.blue_hue_deg[0]) & (hue < config.blue_hue_deg[1])
        green = (hue >= config.green_hue_deg[0]) & (hue < config.green_hue_deg[1])
        ink[where] |= blue | green
    if config.ink_margin_px > 0 and ink.any():
        ink = _dilate_cross(ink, config.ink_margin_px)
    return ink


def tissue_mask_from_rgb(rgb: np.ndarray, config: TissueMaskConfig | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB (white background) -> (H, W) bool tissue mask, ink excluded."""
    config = config or TissueMaskConfig()
    value, chroma = _value_and_chroma(rgb)
    sat = _saturation(value, chroma)
    if config.median_px == 3:
        sat = _median3(sat)
    elif config.median_px > 1:
        sat = ndimage.median_filter(sat, size=config.median_px, mode="nearest")
    ink = ink_mask_from_rgb(rgb, config)
    candidates = sat[~ink]
    threshold = float(
        np.clip(otsu_threshold(candidates), config.min_saturation, config.max_saturation)
    )
    mask = (sat > threshold) & ~ink
    if config.close_iterations:
        mask = _erode(_dilate(mask, config.close_iterations), config.close_iterations)
    mask = _fill_holes(mask)
    if config.open_iterations:
        mask = _dilate(_erode(mask, config.open_iterations), config.open_iterations)
    mask = _remove_small_objects(mask, config.min_object_px)
    return mask & ~ink


# 3x3 binary morphology as separable row/column passes (the results of scipy.ndimage's binary_*
# with a 3x3 structure and border_value=0, at a fraction of the cost).


def _grow(mask: np.ndarray, combine) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    rows = combine(combine(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])  # (H + 2, W)
    return combine(combine(rows[:-2], rows[1:-1]), rows[2:])  # (H, W)


def _dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    for _ in range(iterations):
        mask = _grow(mask, np.logical_or)
    return mask


def _erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    for _ in range(iterations):
        mask = _grow(mask, np.logical_and)
    return mask


def _dilate_cross(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Dilation by the 4-connected cross (``ndimage.binary_dilation``'s default structure)."""
    for _ in range(iterations):
        padded = np.pad(mask, 1, constant_values=False)
        mask = (
            padded[1:-1, 1:-1]
            | padded[:-2, 1:-1]
            | padded[2:, 1:-1]
            | padded[1:-1, :-2]
            | padded[1:-1, 2:]
        )
    return mask


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions that do not touch the image border become foreground."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    hole = np.ones(n + 1, dtype=bool)
    hole[border] = False
    hole[0] = False
    return mask | hole[labels]


def _remove_small_objects(mask: np.ndarray, min_px: int) -> np.ndarray:
    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


# -- mask of a slide ---------------------------------------------------------------------------


def tissue_mask(
    slide: Slide, mask_mpp: float = MASK_MPP, config: TissueMaskConfig | None = None
) -> TissueMask:
    """Tissue mask at ``mask_mpp`` µm/px (never finer than level 0), read from the pyramid."""
    l0_per_px = max(1.0, mask_mpp / slide.mpp)
    rgb = slide_overview_rgb(slide, l0_per_px)  # (H, W, 3)
    mask = tissue_mask_from_rgb(rgb, config)
    return TissueMask(mask=mask, l0_per_px=l0_per_px, mpp=l0_per_px * slide.mpp)


def slide_overview_rgb(
    slide: Slide, l0_per_px: float, max_level_px_per_strip: int = 1 << 23
) -> np.ndarray:
    """(H, W, 3) uint8 image of the whole slide, one pixel per ``l0_per_px`` level-0 px.

    Read from the coarsest level still at least as fine, in horizontal strips so memory stays
    bounded on big single-level slides, and box-averaged (area) down to the overview.
    """
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, math.ceil(w0 / l0_per_px)), max(1, math.ceil(h0 / l0_per_px))
    finer = [i for i, d in enumerate(slide.level_downsamples) if d <= l0_per_px * 1.0001]
    level = max(finer, key=lambda i: slide.level_downsamples[i]) if finer else 0
    scale = l0_per_px / slide.level_downsamples[level]  # level px per overview px
    level_w = math.ceil(out_w * scale)
    rows_per_strip = max(1, int(max_level_px_per_strip / max(1, level_w) / scale))
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for r0 in range(0, out_h, rows_per_strip):
        r1 = min(out_h, r0 + rows_per_strip)
        l0_y = int(round(r0 * l0_per_px))
        level_h = max(1, math.ceil((r1 - r0) * scale))
        strip = slide.read_region_rgb((0, l0_y), level, (level_w, level_h))  # (h, w, 3)
        factor = int(round(scale))
        if abs(scale - factor) < 1e-9 and strip.shape[:2] == ((r1 - r0) * factor, out_w * factor):
            image = Image.fromarray(strip)  # a whole-number factor: Pillow's fast box reduce
            out[r0:r1] = np.asarray(image.reduce(factor) if factor > 1 else image)
        else:
            out[r0:r1] = np.asarray(
                Image.fromarray(strip).resize((out_w, r1 - r0), Image.Resampling.BOX)
            )
    return out


# -- grid --------------------------------------------------------------------------------------


def grid_cells(slide: Slide, patch_um: float = PATCH_UM) -> tuple[np.ndarray, np.ndarray, float]:
    """Every full cell inside the slide: l0_xy (N, 2), grid_rc (N, 2), side in level-0 px."""
    side = patch_um / slide.mpp
    w0, h0 = slide.dimensions
    n_cols, n_rows = int(w0 // side), int(h0 // side)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    grid_rc = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.int64)  # (N, 2)
    l0_xy = np.rint(grid_rc[:, ::-1] * side).astype(np.int64)  # (N, 2) as (x, y)
    return l0_xy, grid_rc, side


def cell_tissue_fraction(mask: TissueMask, l0_xy: np.ndarray, l0_side: float) -> np.ndarray:
    """(N,) float32 fraction of each cell's mask pixels that are tissue (integral image)."""
    h, w = mask.mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = mask.mask.astype(np.int64).cumsum(axis=0).cumsum(axis=1)
    x0 = np.clip(np.rint(l0_xy[:, 0] / mask.l0_per_px), 0, w).astype(np.int64)
    y0 = np.clip(np.rint(l0_xy[:, 1] / mask.l0_per_px), 0, h).astype(np.int64)
    x1 = np.clip(np.rint((l0_xy[:, 0] + l0_side) / mask.l0_per_px), 0, w).astype(np.int64)
    y1 = np.clip(np.rint((l0_xy[:, 1] + l0_side) / mask.l0_per_px), 0, h).astype(np.int64)
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, w)), np.maximum(y1, np.minimum(y0 + 1, h))
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (total / area).astype(np.float32)


def patch_grid(
    slide: Slide,
    patch_um: float = PATCH_UM,
    min_tissue: float = 0.25,
    mask: TissueMask | None = None,
) -> PatchGrid:
    """Cells of ``patch_um`` µm holding at least ``min_tissue`` tissue; same for every magnification."""
    l0_xy, grid_rc, side = grid_cells(slide, patch_um)
    w0, h0 = slide.dimensions
    if side < 1.0:
        raise MagnificationUnavailableError(
            f"{slide.name}: a {patch_um:g} µm patch is smaller than one pixel of this slide "
            f"({slide.mpp:.4g} µm/px); it is far too coarse to analyse"
        )
    if len(l0_xy) == 0:
        raise NoTissueError(
            f"{slide.name}: no tissue patches: the slide ({w0}x{h0} px at {slide.mpp:.4g} µm/px) "
            f"is smaller than one {patch_um:g} µm patch ({side:.1f} px)"
        )
    mask = mask if mask is not None else tissue_mask(slide)
    fraction = cell_tissue_fraction(mask, l0_xy, side)  # (N,)
    keep = fraction >= min_tissue
    if not keep.any():
        raise NoTissueError(
            f"{slide.name}: no tissue patches: none of {len(l0_xy)} cells of {patch_um:g} µm "
            f"holds at least {min_tissue:.0%} tissue (best {float(fraction.max()):.0%}); check "
            "that the slide holds stained tissue, or lower min_tissue"
        )
    n_rows, n_cols = int(grid_rc[:, 0].max()) + 1, int(grid_rc[:, 1].max()) + 1
    return PatchGrid(
        l0_xy=l0_xy[keep],
        grid_rc=grid_rc[keep],
        l0_patch_size=float(side),
        n_rows=n_rows,
        n_cols=n_cols,
        tissue_fraction=fraction[keep],
        mpp=slide.mpp,
        patch_um=float(patch_um),
    )
