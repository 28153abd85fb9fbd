"""Tissue mask (ink rejected) and the magnification-independent patch grid."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from analysis.errors import NoTissueError
from analysis.slides import open_slide
from analysis.tissue import (
    PatchGrid,
    TissueMask,
    cell_tissue_fraction,
    patch_grid,
    slide_overview_rgb,
    tissue_mask,
    tissue_mask_from_rgb,
)

PINK = (225, 140, 190)  # eosin-rich stroma
PURPLE = (120, 70, 160)  # hematoxylin-rich nuclei
BLUE_INK = (30, 70, 200)
GREEN_INK = (40, 170, 90)
BLACK_INK = (20, 20, 25)


@pytest.fixture(scope="module")
def cmu(shared_slides):
    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:
        yield slide


@pytest.fixture(scope="module")
def cmu_mask(cmu):
    return tissue_mask(cmu)


def _field_with_ink(ink_rgb, seed=0):
    """White 200x200 field, a textured tissue blob on the left, an ink stroke on the right."""
    rng = np.random.default_rng(seed)
    rgb = np.full((200, 200, 3), 245, dtype=np.uint8)
    yy, xx = np.mgrid[:200, :200]
    tissue = (yy - 100) ** 2 / 70**2 + (xx - 60) ** 2 / 45**2 < 1
    nuclei = tissue & (rng.random((200, 200)) < 0.2)
    rgb[tissue] = PINK
    rgb[nuclei] = PURPLE
    noise = rng.integers(-8, 9, size=rgb.shape)
    rgb = np.clip(rgb.astype(int) + noise, 0, 255).astype(np.uint8)
    stroke = (np.abs(xx - 150 - (yy - 100) // 6) < 5) & (yy > 20) & (yy < 180)
    rgb[stroke] = ink_rgb
    return rgb, tissue, stroke


@pytest.mark.parametrize("ink", [BLUE_INK, GREEN_INK, BLACK_INK], ids=["blue", "green", "black"])
def test_pen_ink_is_not_tissue_but_stained_tissue_is(ink):
    rgb, tissue, stroke = _field_with_ink(ink)
    mask = tissue_mask_from_rgb(rgb)
    assert mask.shape == (200, 200) and mask.dtype == bool
    assert mask[stroke].mean() < 0.02
    assert mask[tissue].mean() > 0.95
    background = ~tissue & ~stroke
    assert mask[background].mean() < 0.02


def test_ink_over_tissue_is_removed_from_the_mask():
    rgb, tissue, _ = _field_with_ink(BLUE_INK)
    rgb[95:105, 30:90] = BLUE_INK  # a line drawn across the tissue
    mask = tissue_mask_from_rgb(rgb)
    assert not mask[97:103, 35:85].any()
    assert mask[tissue].mean() > 0.8


def test_blank_field_has_no_tissue():
    rng = np.random.default_rng(1)
    rgb = np.clip(242 + rng.integers(-6, 7, size=(120, 120, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask_from_rgb(rgb).any()


def test_cmu_mask_is_about_16_um_per_px_and_holds_tissue(cmu, cmu_mask):
    assert cmu_mask.mpp == pytest.approx(16.0)
    assert cmu_mask.l0_per_px == pytest.approx(16.0 / 0.499)
    w, h = cmu.dimensions
    assert cmu_mask.mask.shape == (
        int(np.ceil(h / cmu_mask.l0_per_px)),
        int(np.ceil(w / cmu_mask.l0_per_px)),
    )
    assert 0.2 < cmu_mask.mask.mean() < 0.6  # the skin strip, not the white glass


def test_cmu_grid_cells_are_128um_in_level0_pixels(cmu, cmu_mask):
    grid = patch_grid(cmu, mask=cmu_mask)
    side = 128 / 0.499
    assert grid.l0_patch_size == pytest.approx(side)
    assert (grid.n_rows, grid.n_cols) == (int(2967 // side), int(2220 // side))
    rows, cols = grid.grid_rc[:, 0], grid.grid_rc[:, 1]
    np.testing.assert_array_equal(grid.l0_xy[:, 0], np.rint(cols * side).astype(np.int64))
    np.testing.assert_array_equal(grid.l0_xy[:, 1], np.rint(rows * side).astype(np.int64))
    assert (grid.l0_xy[:, 0] + side <= cmu.dimensions[0] + 0.5).all()
    assert (grid.l0_xy[:, 1] + side <= cmu.dimensions[1] + 0.5).all()
    assert grid.l0_xy.dtype == np.int64 and grid.tissue_fraction.dtype == np.float32


def test_min_tissue_threshold_is_respected(cmu, cmu_mask):
    loose = patch_grid(cmu, min_tissue=0.1, mask=cmu_mask)
    strict = patch_grid(cmu, min_tissue=0.9, mask=cmu_mask)
    assert (loose.tissue_fraction >= 0.1).all()
    assert (strict.tissue_fraction >= 0.9).all()
    assert 0 < len(strict) < len(loose) < loose.n_rows * loose.n_cols
    strict_cells = {tuple(rc) for rc in strict.grid_rc}
    assert strict_cells <= {tuple(rc) for rc in loose.grid_rc}


def test_tissue_cells_look_like_tissue_and_rejected_cells_like_glass(cmu, cmu_mask):
    grid = patch_grid(cmu, min_tissue=0.9, mask=cmu_mask)
    kept = {tuple(rc) for rc in grid.grid_rc}
    empty = patch_grid(cmu, min_tissue=0.0, mask=cmu_mask)
    glass = [
        xy
        for rc, xy, f in zip(empty.grid_rc, empty.l0_xy, empty.tissue_fraction, strict=True)
        if f == 0 and tuple(rc) not in kept
    ]
    assert glass, "CMU has empty glass cells"
    tissue_patch = cmu.read_patch(tuple(grid.l0_xy[0]), 5)
    glass_patch = cmu.read_patch(tuple(glass[0]), 5)
    assert tissue_patch.mean() < 215 < glass_patch.mean()


def test_grid_is_identical_whatever_magnification_is_read_later(cmu, cmu_mask):
    first = patch_grid(cmu, mask=cmu_mask)
    again = patch_grid(cmu)  # recomputes the mask
    np.testing.assert_array_equal(first.l0_xy, again.l0_xy)
    np.testing.assert_array_equal(first.grid_rc, again.grid_rc)
    for mag, size in ((20, 256), (10, 128), (5, 64)):
        assert cmu.read_patches(first.l0_xy[:2], mag).shape == (2, size, size, 3)


def test_vectorised_tissue_fraction_matches_a_per_cell_count():
    rng = np.random.default_rng(3)
    mask = TissueMask(mask=rng.random((40, 50)) < 0.4, l0_per_px=4.0, mpp=8.0)
    side = 17.3
    xy = np.array([[round(c * side), round(r * side)] for r in range(9) for c in range(11)])
    fraction = cell_tissue_fraction(mask, xy, side)
    for (x, y), f in zip(xy, fraction, strict=True):
        x0, y0 = round(x / 4), round(y / 4)
        x1, y1 = round((x + side) / 4), round((y + side) / 4)
        assert f == pytest.approx(mask.mask[y0:y1, x0:x1].mean(), abs=1e-6)


def test_grid_round_trips_through_a_dict(cmu, cmu_mask):
    grid = patch_grid(cmu, mask=cmu_mask)
    back = PatchGrid.from_dict(grid.to_dict())
    np.testing.assert_array_equal(back.l0_xy, grid.l0_xy)
    np.testing.assert_array_equal(back.grid_rc, grid.grid_rc)
    np.testing.assert_allclose(back.tissue_fraction, grid.tissue_fraction)
    assert (back.l0_patch_size, back.n_rows, back.n_cols) == (
        grid.l0_patch_size,
        grid.n_rows,
        grid.n_cols,
    )


def test_small_slide_has_no_tissue_patches(shared_slides):
    with open_slide(shared_slides / "small.svs") as slide:
        with pytest.raises(NoTissueError, match=r"small\.svs.*no tissue patches"):
            patch_grid(slide)


def test_blank_slide_has_no_tissue_patches(tmp_path):
    path = tmp_path / "blank.tif"
    tifffile.imwrite(
        path,
        np.full((1024, 1024, 3), 250, dtype=np.uint8),
        tile=(256, 256),
        compression="zlib",
        metadata=None,
    )
    with open_slide(path, mpp=0.5) as slide:
        with pytest.raises(NoTissueError, match="blank.tif"):
            patch_grid(slide)


def test_overview_read_in_strips_matches_one_read(cmu):
    one = slide_overview_rgb(cmu, 16.0).astype(float)
    strips = slide_overview_rgb(cmu, 16.0, max_level_px_per_strip=200_000).astype(float)
    assert one.shape == strips.shape == (186, 139, 3)
    assert np.abs(one - strips).mean() < 2.0


def test_fast_median_and_ink_passes_match_the_plain_formulas():
    from scipy import ndimage

    from analysis.tissue import TissueMaskConfig, _median3, ink_mask_from_rgb, rgb_to_hsv

    rng = np.random.default_rng(3)
    values = rng.random((41, 67)).astype(np.float32)
    assert np.array_equal(_median3(values), ndimage.median_filter(values, 3, mode="nearest"))
    rgb = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    config = TissueMaskConfig(ink_margin_px=0)
    hue, sat, val = rgb_to_hsv(rgb)  # the whole-image HSV the fast pass avoids
    strong = sat >= config.ink_saturation
    reference = (
        (strong & (hue >= 185.0) & (hue < 238.0))
        | (strong & (hue >= 65.0) & (hue < 185.0))
        | (val < config.dark_value)
    )
    assert np.array_equal(ink_mask_from_rgb(rgb, config), reference)


def test_a_16k_slide_is_masked_from_a_500_px_overview():
    class Pyramid:  # the geometry of a 16000 x 16000 px 20x slide with a 4x pyramid
        name, mpp, dimensions = "big.svs", 0.5, (16000, 16000)
        level_downsamples = (1.0, 4.0, 16.0)
        reads: list = []

        def read_region_rgb(self, l0_xy, level, size):
            self.reads.append((level, size))
            return np.full((size[1], size[0], 3), 240, np.uint8)

    slide = Pyramid()
    mask = tissue_mask(slide)  # type: ignore[arg-type]
    assert mask.mask.shape == (500, 500)
    assert slide.reads == [(2, (1000, 1000))]  # the 1000 px level, read once


def test_fast_morphology_matches_scipy():
    from scipy import ndimage

    from analysis.tissue import _dilate, _dilate_cross, _erode, _fill_holes

    rng = np.random.default_rng(7)
    mask = ndimage.binary_opening(rng.random((90, 70)) < 0.45)
    square = np.ones((3, 3), bool)
    assert np.array_equal(_dilate(mask, 2), ndimage.binary_dilation(mask, square, 2))
    assert np.array_equal(_erode(mask, 2), ndimage.binary_erosion(mask, square, 2))
    closed = ndimage.binary_closing(mask, square, iterations=2)
    assert np.array_equal(_erode(_dilate(mask, 2), 2), closed)
    opened = ndimage.binary_opening(mask, square, iterations=1)
    assert np.array_equal(_dilate(_erode(mask, 1), 1), opened)
    assert np.array_equal(_dilate_cross(mask, 1), ndimage.binary_dilation(mask, iterations=1))
    assert np.array_equal(_fill_holes(mask), ndimage.binary_fill_holes(mask))
