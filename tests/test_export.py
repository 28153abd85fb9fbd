"""The low-magnification export: scale, size, fidelity to the source, refusals, failures."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from PIL import Image

from analysis import export as export_module
from analysis.cli import main as cli_main
from analysis.errors import AnalysisError, MagnificationUnavailableError
from analysis.export import export_lowmag
from analysis.slides import open_slide
from analysis.synth import write_synthetic_slide
from analysis.tissue import patch_grid
from tests.conftest import shared_slide

QUALITY = 80


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    return write_synthetic_slide(
        folder / "source-20x.svs", width=6000, height=6000, seed=21, label=1, quality=QUALITY
    )


@pytest.fixture(scope="module")
def exported(source):
    return export_lowmag(source.path, source.path.with_name("export-5x.svs"), 5, QUALITY)


def test_export_is_read_at_2_um_per_px_and_5x(exported):
    with open_slide(exported.path) as slide:
        assert slide.vendor == "aperio"
        assert slide.mpp == pytest.approx(2.0, rel=0.01)
        assert slide.magnification == pytest.approx(5.0, rel=0.01)
        assert slide.objective_power == 5
        assert slide.dimensions == (1500, 1500)
    assert (exported.width, exported.height, exported.mpp) == (1500, 1500, 2.0)
    assert exported.source_level == 1  # the source pyramid's 4x level, copied


def test_export_is_at_least_8x_smaller_than_the_20x_source_at_equal_quality(source, exported):
    assert exported.bytes == exported.path.stat().st_size
    assert exported.source_bytes == source.path.stat().st_size
    assert exported.size_ratio >= 8.0


def test_export_5x_patches_match_the_source_5x_reads(source, exported):
    with open_slide(source.path) as src:
        grid = patch_grid(src)
        pick = np.random.default_rng(1).choice(len(grid.l0_xy), 40, replace=False)
        l0_xy = grid.l0_xy[pick]  # (40, 2) source level-0
        from_source = src.read_patches(l0_xy, 5).astype(np.int16)  # (40, 64, 64, 3)
    with open_slide(exported.path) as low:
        from_export = low.read_patches(l0_xy // 4, 5).astype(np.int16)
    diff = np.abs(from_export - from_source)
    assert diff.mean() < 3.0
    # the same tissue: each pair correlates far better than mismatched pairs do
    a = from_export.reshape(40, -1).astype(np.float64)
    b = from_source.reshape(40, -1).astype(np.float64)
    corr = np.corrcoef(a, b)[:40, 40:]
    assert np.diag(corr).min() > 0.95
    assert np.diag(corr).min() > corr[~np.eye(40, dtype=bool)].max()


def test_export_keeps_the_label_and_macro(source, exported):
    with open_slide(source.path) as src, open_slide(exported.path) as low:
        assert {"label", "macro"} <= set(low.associated_image_names)
        assert np.array_equal(
            np.asarray(low.associated_image("label")), np.asarray(src.associated_image("label"))
        )


def test_export_of_a_single_level_vendor_slide_resamples_to_5x(tmp_path):
    cmu = shared_slide("cmu-1-small-region.svs")
    result = export_lowmag(cmu, tmp_path / "cmu-5x.svs", 5)
    assert result.source_level == 0
    size = (round(2220 * 0.499 / 2), round(2967 * 0.499 / 2))
    assert (result.width, result.height) == size
    with open_slide(cmu) as src, open_slide(result.path) as low:
        assert low.mpp == pytest.approx(2.0)
        assert low.associated_image_names == ["label", "macro", "thumbnail"]
        whole = Image.fromarray(src.read_region_rgb((0, 0), 0, src.dimensions))
        expected = _luma(np.asarray(whole.resize(size, Image.Resampling.LANCZOS)))
        written = _luma(low.read_region_rgb((0, 0), 0, size))
    # the JPEG re-encoding and nothing else: one pixel of misregistration costs far more
    assert np.abs(written - expected).mean() < 3.0
    assert np.abs(written[:, 1:] - expected[:, :-1]).mean() > 8.0


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # (H, W)


def test_export_refuses_a_slide_coarser_than_the_target(exported, tmp_path):
    target = tmp_path / "upsampled.svs"
    with pytest.raises(MagnificationUnavailableError, match="20x"):
        export_lowmag(exported.path, target, 20)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_into_an_unwritable_destination_fails_clearly(source, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    target = blocker / "out.svs"
    with pytest.raises(AnalysisError, match="cannot write the 5x export") as info:
        export_lowmag(source.path, target, 5)
    assert "not a folder" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


def test_export_that_runs_out_of_disk_removes_its_partial_file(source, tmp_path, monkeypatch):
    real_writer = export_module.write_pyramidal_tiff

    def fill_disk(path, width, height, strips, **kwargs):
        def failing_rows(y0, rows):
            if y0 >= 512:
                raise OSError(errno.ENOSPC, "No space left on device")
            return strips(y0, rows)

        return real_writer(path, width, height, failing_rows, **kwargs)

    monkeypatch.setattr(export_module, "write_pyramidal_tiff", fill_disk)
    target = tmp_path / "full.svs"
    with pytest.raises(AnalysisError, match="is full"):
        export_lowmag(source.path, target, 5)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_prints_sizes_ratio_and_magnifications(source, tmp_path, capsys):
    target = tmp_path / "cli-5x.svs"
    code = cli_main(["export", str(source.path), "--mag", "5", "-o", str(target)])
    assert code == 0
    out = capsys.readouterr().out
    assert "6000x6000 px" in out and "0.5 µm/px (20x)" in out
    assert "1500x1500 px" in out and "2 µm/px (5x)" in out
    assert "size ratio" in out
    assert target.is_file()


def test_cli_export_refusal_is_one_line_and_exit_2(exported, tmp_path, capsys):
    code = cli_main(["export", str(exported.path), "--mag", "20", "-o", str(tmp_path / "x.svs")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowmag export: error:") and "\n" not in err
