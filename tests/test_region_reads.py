"""5x reads in regions: the same pixels as patch-by-patch reads, far fewer reads."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.slides import Slide, open_slide
from analysis.tissue import patch_grid


@pytest.fixture(scope="module")
def export_5x(tmp_path_factory):
    from analysis.export import export_lowmag
    from analysis.synth import write_synthetic_slide

    folder = tmp_path_factory.mktemp("region")
    src, dst = folder / "s.svs", folder / "s.5x.svs"
    write_synthetic_slide(src, width=3072, height=2560, seed=5, label=1)
    export_lowmag(src, dst, magnification=5)
    return src, dst


def _reads(monkeypatch) -> list:
    calls: list = []
    real = Slide.read_region_rgb

    def counting(self, l0_xy, level, size):
        calls.append(size)
        return real(self, l0_xy, level, size)

    monkeypatch.setattr(Slide, "read_region_rgb", counting)
    return calls


@pytest.mark.parametrize("which", ["export", "source"])
def test_region_reads_give_the_pixels_of_patch_reads(export_5x, monkeypatch, which):
    path = export_5x[1] if which == "export" else export_5x[0]  # 5x level 0 / 4x pyramid level
    with open_slide(path) as slide:
        grid = patch_grid(slide)
        assert len(grid) > 50
        expected = np.stack([slide.read_patch(tuple(xy), 5.0) for xy in grid.l0_xy])
        calls = _reads(monkeypatch)
        got_idx, got = [], []
        for idx, patches in slide.iter_patch_batches(grid.l0_xy, 5.0, batch_size=48, workers=3):
            got_idx.append(idx)
            got.append(patches)
    assert np.array_equal(np.concatenate(got_idx), np.arange(len(grid)))
    assert np.array_equal(np.concatenate(got), expected)
    assert len(calls) < len(grid) / 4  # runs of cells, not one read per cell
    assert all(h == 64 for _, h in calls)


def test_cells_that_need_resizing_are_still_read_one_by_one(shared_slides, monkeypatch):
    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:  # 0.499 µm/px, 1 level
        grid = patch_grid(slide)
        calls = _reads(monkeypatch)
        batches = list(slide.iter_patch_batches(grid.l0_xy, 5.0, batch_size=16))
    assert sum(len(i) for i, _ in batches) == len(grid) == len(calls)
