import time

import numpy as np
import pytest

from analysis.heatmap import (
    DeepZoomGeometry,
    HeatmapTiler,
    colormap_lut,
    normalise_scores,
    score_raster,
)
from tests.conftest import shared_slide


def test_geometry_matches_openslide_deepzoom_on_cmu():
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    with openslide.OpenSlide(str(shared_slide("cmu-1-small-region.svs"))) as osr:
        dz = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)
        geometry = DeepZoomGeometry(*osr.dimensions)
        assert geometry.level_count == dz.level_count
        assert geometry.level_dimensions == dz.level_dimensions
        assert geometry.level_tiles == dz.level_tiles
        for level in range(dz.level_count):
            n_cols, n_rows = dz.level_tiles[level]
            for col, row in {(0, 0), (n_cols - 1, n_rows - 1), (n_cols // 2, n_rows // 2)}:
                _, _, w, h = geometry.tile_box(level, (col, row))
                assert (w, h) == dz.get_tile_dimensions(level, (col, row))


def test_tile_outside_the_level_is_refused():
    geometry = DeepZoomGeometry(1000, 800)
    with pytest.raises(ValueError):
        geometry.tile_box(geometry.level_count, (0, 0))
    with pytest.raises(ValueError):
        geometry.tile_box(geometry.level_count - 1, (99, 0))


def _tiler(n_rows=40, n_cols=50, patch=256.0, seed=0):
    rng = np.random.default_rng(seed)
    grid_rc = np.array([(r, c) for r in range(n_rows) for c in range(n_cols) if (r + c) % 3])
    scores = rng.random(len(grid_rc)).astype(np.float32)
    raster = score_raster(grid_rc, scores, n_rows, n_cols)
    geometry = DeepZoomGeometry(int(n_cols * patch) + 37, int(n_rows * patch) + 11)
    return HeatmapTiler(raster, patch, geometry), raster, grid_rc, scores


def test_heatmap_pixel_takes_the_colour_of_the_cell_beneath_it_at_every_level():
    tiler, raster, grid_rc, scores = _tiler()
    lut = colormap_lut()
    geometry = tiler.geometry
    r, c = grid_rc[123]
    l0_x, l0_y = (c + 0.5) * 256.0, (r + 0.5) * 256.0  # centre of that cell
    for level in range(geometry.level_count - 6, geometry.level_count):
        scale = geometry.l0_per_z(level)
        z_x, z_y = int(l0_x // scale), int(l0_y // scale)
        col, row = z_x // 254, z_y // 254
        t_x, t_y, _, _ = geometry.tile_box(level, (col, row))
        rgba = tiler.tile_rgba(level, (col, row))
        pixel = rgba[z_y - t_y, z_x - t_x]
        if scale <= 64:  # the pixel lies well inside one cell
            expected = lut[int(round(scores[123] * 255))]
            assert np.abs(pixel[:3].astype(int) - expected.astype(int)).max() <= 3
            assert pixel[3] > 0


def test_empty_cells_are_transparent():
    tiler, raster, _, _ = _tiler()
    level = tiler.geometry.level_count - 1
    rgba = tiler.tile_rgba(level, (0, 0))
    # cell (0, 0) has no patch ((0 + 0) % 3 == 0): its pixels are transparent
    assert rgba[:200, :200, 3].max() == 0


def test_threshold_hides_low_scores():
    _, raster, _, _ = _tiler()
    geometry = DeepZoomGeometry(50 * 256, 40 * 256)
    low = HeatmapTiler(raster, 256.0, geometry, threshold=0.0)
    high = HeatmapTiler(raster, 256.0, geometry, threshold=0.9)
    level = geometry.level_count - 5
    assert (high.tile_rgba(level, (0, 0))[..., 3] > 0).sum() < (
        low.tile_rgba(level, (0, 0))[..., 3] > 0
    ).sum()


def test_png_tile_decodes_to_the_rgba_tile():
    import io

    from PIL import Image

    tiler, _, _, _ = _tiler()
    level = tiler.geometry.level_count - 3
    decoded = np.asarray(Image.open(io.BytesIO(tiler.tile_png(level, (1, 1)))).convert("RGBA"))
    assert np.array_equal(decoded, tiler.tile_rgba(level, (1, 1)))


def test_whole_overlay_of_8000_patches_renders_under_a_second():
    # a 5x slide with ~8000 patches: 100 x 120 cells of 64 px at 5x (the 5x file's level 0),
    # every tile of every level encoded as PNG
    tiler, _, grid_rc, _ = _tiler(n_rows=100, n_cols=120, patch=64.0)
    assert len(grid_rc) >= 8000
    geometry = tiler.geometry
    start = time.perf_counter()
    n_tiles = 0
    for level in range(geometry.level_count):
        n_cols, n_rows = geometry.level_tiles[level]
        for row in range(n_rows):
            for col in range(n_cols):
                tiler.tile_png(level, (col, row))
                n_tiles += 1
    elapsed = time.perf_counter() - start
    assert n_tiles > 100
    assert elapsed < 1.0, f"{n_tiles} tiles took {elapsed:.2f}s"


def test_normalise_scores_handles_constant_maps():
    assert np.allclose(normalise_scores(np.ones(5)), 0.5)
    out = normalise_scores(np.array([2.0, 4.0, 3.0]))
    assert out.min() == 0.0 and out.max() == 1.0
