"""Instance scores -> a small raster (one cell per grid cell) -> DeepZoom overlay tiles.

The overlay has exactly the geometry of OpenSlide's ``DeepZoomGenerator`` for the slide
(``limit_bounds=False``), so OpenSeadragon stacks it pixel-true over the slide tiles.
Rendering a tile is a lookup of each tile pixel's level-0 centre in the raster plus a
colour-map lookup: O(tile pixels), independent of how many patches the slide has.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

_COLORMAP_STOPS = [  # a perceptually ordered blue -> yellow -> red ramp
    (0.00, (49, 54, 149)),
    (0.25, (69, 117, 180)),
    (0.45, (171, 217, 233)),
    (0.60, (254, 224, 144)),
    (0.80, (244, 109, 67)),
    (1.00, (165, 0, 38)),
]


CATEGORY_COLOURS = np.array(  # distinguishable colours for cluster maps (cluster 0 first)
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
        (0, 0, 128),
        (128, 128, 0),
    ],
    dtype=np.uint8,
)


def colormap_lut(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colour ramp used for score overlays and the viewer's legend."""
    xs = np.linspace(0.0, 1.0, n)
    stops = np.array([s for s, _ in _COLORMAP_STOPS])
    rgb = np.array([c for _, c in _COLORMAP_STOPS], dtype=np.float64)
    lut = np.stack([np.interp(xs, stops, rgb[:, k]) for k in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


def normalise_scores(scores: np.ndarray) -> np.ndarray:
    """Rank-free min-max scaling to [0, 1]; a constant score map becomes 0.5 everywhere."""
    scores = np.asarray(scores, dtype=np.float64)
    lo, hi = float(np.min(scores)), float(np.max(scores))
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo < 1e-12:
        return np.full(scores.shape, 0.5, dtype=np.float32)
    return ((scores - lo) / (hi - lo)).astype(np.float32)


EVIDENCE_SCALE = 2.0  # logits of class evidence that map to tanh(1) = 0.76 on the colour ramp


def evidence_display(evidence: np.ndarray, scale: float = EVIDENCE_SCALE) -> np.ndarray:
    """Signed class evidence -> overlay values: tanh(e / scale) where e > 0, else NaN.

    A fixed scale, not per-slide min-max: a slide with no evidence for the class shows nothing
    (NaN cells are transparent), and the same colour means the same evidence on every slide.
    """
    evidence = np.asarray(evidence, dtype=np.float64)
    out = np.full(evidence.shape, np.nan, dtype=np.float32)
    positive = np.isfinite(evidence) & (evidence > 0)
    out[positive] = np.tanh(evidence[positive] / scale)
    return out


def score_raster(grid_rc: np.ndarray, scores: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """(n_rows, n_cols) float32 raster; cells without a patch are NaN."""
    grid_rc = np.asarray(grid_rc, dtype=np.int64)
    raster = np.full((n_rows, n_cols), np.nan, dtype=np.float32)
    if len(grid_rc):
        raster[grid_rc[:, 0], grid_rc[:, 1]] = np.asarray(scores, dtype=np.float32)
    return raster


@dataclass(frozen=True)
class DeepZoomGeometry:
    """The level/tile layout of ``openslide.deepzoom.DeepZoomGenerator(limit_bounds=False)``."""

    l0_width: int
    l0_height: int
    tile_size: int = 254
    overlap: int = 1

    @cached_property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        z_size = (self.l0_width, self.l0_height)
        dims = [z_size]
        while z_size[0] > 1 or z_size[1] > 1:
            z_size = (max(1, math.ceil(z_size[0] / 2)), max(1, math.ceil(z_size[1] / 2)))
            dims.append(z_size)
        return tuple(reversed(dims))

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @cached_property
    def level_tiles(self) -> tuple[tuple[int, int], ...]:
        return tuple(
            (math.ceil(w / self.tile_size), math.ceil(h / self.tile_size))
            for w, h in self.level_dimensions
        )

    def l0_per_z(self, dz_level: int) -> int:
        return 2 ** (self.level_count - dz_level - 1)

    def tile_box(self, dz_level: int, tile_cr: tuple[int, int]) -> tuple[int, int, int, int]:
        """(z_x, z_y, width, height) of a tile in the pixels of its DeepZoom level."""
        if not 0 <= dz_level < self.level_count:
            raise ValueError(f"DeepZoom level {dz_level} out of range 0..{self.level_count - 1}")
        n_cols, n_rows = self.level_tiles[dz_level]
        col, row = tile_cr
        if not (0 <= col < n_cols and 0 <= row < n_rows):
            raise ValueError(f"tile {col}_{row} outside level {dz_level} ({n_cols}x{n_rows})")
        z_w, z_h = self.level_dimensions[dz_level]
        box = []
        for t, t_lim, z_lim in ((col, n_cols, z_w), (row, n_rows, z_h)):
            tl = self.overlap if t != 0 else 0
            br = self.overlap if t != t_lim - 1 else 0
            start = t * self.tile_size - tl
            size = min(self.tile_size, z_lim - self.tile_size * t) + tl + br
            box.append((start, size))
        (z_x, z_w_tile), (z_y, z_h_tile) = box
        return z_x, z_y, z_w_tile, z_h_tile

    def dzi_xml(self, fmt: str) -> str:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
            f'Format="{fmt}" Overlap="{self.overlap}" TileSize="{self.tile_size}">'
            f'<Size Height="{self.l0_height}" Width="{self.l0_width}"/></Image>'
        )


class HeatmapTiler:
    """Renders DeepZoom PNG tiles of a score raster over a slide of the given level-0 size."""

    def __init__(
        self,
        raster: np.ndarray,
        l0_patch_size: float,
        geometry: DeepZoomGeometry,
        alpha: int = 160,
        threshold: float = 0.0,
        categorical: bool = False,
    ):
        self.raster = np.asarray(raster, dtype=np.float32)  # (R, C), NaN = no patch
        self.l0_patch_size = float(l0_patch_size)
        self.geometry = geometry
        self.threshold = threshold
        self.categorical = categorical
        lut = colormap_lut(256)
        self._rgba_lut = np.concatenate([lut, np.full((256, 1), alpha, np.uint8)], axis=1)
        # Palette index per cell: 0 = transparent (no patch, or under the threshold),
        # 1..255 = the colour ramp. Tiles are palette PNGs: a quarter of RGBA's bytes.
        n_rows, n_cols = self.raster.shape
        values = self.raster.reshape(-1)
        if categorical:  # the raster holds category ids (cluster 0, 1, ...), not scores
            valid = np.isfinite(values)
            index = 1 + np.clip(np.nan_to_num(values), 0, 254).astype(np.uint8)
            ramp = np.zeros((255, 3), np.uint8)
            ramp[: len(CATEGORY_COLOURS)] = CATEGORY_COLOURS
        else:
            valid = np.isfinite(values) & (np.nan_to_num(values, nan=-1.0) >= threshold)
            index = 1 + np.clip(np.round(np.nan_to_num(values) * 254), 0, 254).astype(np.uint8)
            ramp = colormap_lut(255)
        flat = np.zeros(n_rows * n_cols + 1, dtype=np.uint8)  # [0] = outside the grid
        flat[1:][valid] = index[valid]
        self._cell_index = flat
        self._palette = np.concatenate([np.zeros((1, 3), np.uint8), ramp]).reshape(-1).tobytes()
        self._transparency = bytes([0] + [alpha] * 255)
        self._palette_rgba = np.concatenate(
            [
                np.concatenate([np.zeros((1, 3), np.uint8), ramp]),
                np.array([[0]] + [[alpha]] * 255, np.uint8),
            ],
            axis=1,
        )
        self._empty_png: dict[tuple[int, int], bytes] = {}

    def dzi(self) -> str:
        return self.geometry.dzi_xml("png")

    def tile_index(self, dz_level: int, tile_cr: tuple[int, int]) -> np.ndarray:
        """(H, W) uint8 palette indices: each pixel takes the grid cell under its level-0 centre."""
        z_x, z_y, z_w, z_h = self.geometry.tile_box(dz_level, tile_cr)
        scale = self.geometry.l0_per_z(dz_level)
        n_rows, n_cols = self.raster.shape
        l0_x = (np.arange(z_x, z_x + z_w) + 0.5) * scale  # (W,)
        l0_y = (np.arange(z_y, z_y + z_h) + 0.5) * scale  # (H,)
        cols = np.floor(l0_x / self.l0_patch_size).astype(np.int64)
        rows = np.floor(l0_y / self.l0_patch_size).astype(np.int64)
        col_ok = (cols >= 0) & (cols < n_cols)
        row_ok = (rows >= 0) & (rows < n_rows)
        flat_idx = rows[:, None] * n_cols + cols[None, :] + 1  # (H, W)
        flat_idx[~(row_ok[:, None] & col_ok[None, :])] = 0
        return self._cell_index[flat_idx]

    def tile_rgba(self, dz_level: int, tile_cr: tuple[int, int]) -> np.ndarray:
        """(H, W, 4) uint8 tile (what the PNG decodes to)."""
        return self._palette_rgba[self.tile_index(dz_level, tile_cr)]

    def tile_png(self, dz_level: int, tile_cr: tuple[int, int]) -> bytes:
        index = self.tile_index(dz_level, tile_cr)
        if not index.any():  # fully transparent: one cached PNG per tile size
            key = index.shape
            if key not in self._empty_png:
                self._empty_png[key] = self._encode(index)
            return self._empty_png[key]
        return self._encode(index)

    def _encode(self, index: np.ndarray) -> bytes:
        image = Image.fromarray(index, "P")
        image.putpalette(self._palette)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1, transparency=self._transparency)
        return buffer.getvalue()


def raster_png(raster: np.ndarray, alpha: int = 200) -> bytes:
    """The whole score raster as a tiny RGBA PNG (one pixel per grid cell)."""
    lut = colormap_lut(256)
    values = np.nan_to_num(raster, nan=-1.0)
    idx = np.clip(np.round(values * 255), 0, 255).astype(np.int64)
    rgba = np.zeros((*raster.shape, 4), dtype=np.uint8)
    valid = np.isfinite(raster)
    rgba[valid, :3] = lut[idx[valid]]
    rgba[valid, 3] = alpha
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()
