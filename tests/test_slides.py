"""Opening slides, physical scale, reading patches at a magnification, errors, the handle cache."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from analysis.errors import (
    AnalysisError,
    CorruptSlideError,
    MagnificationUnavailableError,
    MissingScaleError,
    UnsupportedSlideError,
)
from analysis.slides import (
    SlideCache,
    mpp_for_magnification,
    open_slide,
    patch_size_px,
)
from analysis.tissue import patch_grid


@pytest.fixture(scope="module")
def cmu(shared_slides):
    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:
        yield slide


@pytest.fixture(scope="module")
def cmu_grid(cmu):
    return patch_grid(cmu, min_tissue=0.5)


def _no_scale_tiff(path, side=1024):
    """A plain tiled generic TIFF with no resolution unit (OpenSlide finds no mpp)."""
    rgb = np.full((side, side, 3), 255, dtype=np.uint8)
    rgb[side // 4 : side // 2, side // 4 : side // 2] = (200, 120, 180)
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="zlib", metadata=None)
    return path


def test_magnification_defines_mpp_and_patch_size():
    assert mpp_for_magnification(20) == 0.5
    assert mpp_for_magnification(5) == 2.0
    assert [patch_size_px(m) for m in (40, 20, 10, 5, 2.5)] == [512, 256, 128, 64, 32]


def test_cmu_resolves_to_0499_mpp_and_20x(cmu):
    assert cmu.vendor == "aperio"
    assert cmu.mpp == pytest.approx(0.499, abs=0.001)
    assert cmu.mpp_source == "metadata"
    assert cmu.objective_power == 20
    assert cmu.magnification == pytest.approx(20, rel=0.01)
    assert cmu.dimensions == (2220, 2967)
    assert set(cmu.associated_image_names) == {"label", "macro", "thumbnail"}
    assert cmu.associated_image("label").mode == "RGB"


def test_cmu_thumbnail_fits_requested_box(cmu):
    thumb = cmu.thumbnail((256, 256))
    assert max(thumb.size) == 256 and thumb.mode == "RGB"


def test_cmu_patch_sizes_follow_magnification(cmu, cmu_grid):
    xy = tuple(cmu_grid.l0_xy[0])
    assert cmu.read_patch(xy, 20).shape == (256, 256, 3)
    assert cmu.read_patch(xy, 10).shape == (128, 128, 3)
    assert cmu.read_patch(xy, 5).shape == (64, 64, 3)


def test_cmu_5x_patch_matches_downsampled_20x_patch(cmu, cmu_grid):
    cells = cmu_grid.l0_xy[:: max(1, len(cmu_grid.l0_xy) // 6)][:6]
    assert len(cells) >= 4
    for xy in cells:
        p20 = cmu.read_patch(tuple(xy), 20)
        p5 = cmu.read_patch(tuple(xy), 5)
        shrunk = np.asarray(Image.fromarray(p20).resize((64, 64), Image.Resampling.LANCZOS))
        diff = np.abs(shrunk.astype(float) - p5.astype(float)).mean()
        corr = np.corrcoef(shrunk.ravel(), p5.ravel())[0, 1]
        assert diff < 3.0, diff
        assert corr > 0.98, corr
        assert p5.std() > 10  # a tissue cell, not blank background


def test_cmu_5x_patch_differs_from_a_neighbouring_cell(cmu, cmu_grid):
    xy = cmu_grid.l0_xy[0]
    p5 = cmu.read_patch(tuple(xy), 5).astype(float)
    shifted = cmu.read_patch((int(xy[0]) + 64, int(xy[1]) + 64), 5).astype(float)
    assert np.abs(p5 - shifted).mean() > 5  # the comparison above can tell cells apart


def test_read_past_slide_edge_is_padded_white(cmu):
    w, h = cmu.dimensions
    patch = cmu.read_patch((w - 100, h - 100), 20)  # 256.5 px cell, only ~100 px inside
    assert (patch[-60:, :, :] == 255).all()
    assert (patch[:, -60:, :] == 255).all()


def test_read_patches_equals_per_patch_reads_in_order(cmu, cmu_grid):
    xys = cmu_grid.l0_xy[:9]
    batch = cmu.read_patches(xys, 5, workers=3)
    assert batch.shape == (9, 64, 64, 3)
    for i, xy in enumerate(xys):
        np.testing.assert_array_equal(batch[i], cmu.read_patch(tuple(xy), 5))


def test_iter_patch_batches_covers_every_patch_in_order(cmu, cmu_grid):
    xys = cmu_grid.l0_xy[:11]
    expected = cmu.read_patches(xys, 10, workers=1)
    seen = []
    for idx, patches in cmu.iter_patch_batches(xys, 10, batch_size=4, workers=2):
        assert patches.shape == (len(idx), 128, 128, 3)
        np.testing.assert_array_equal(patches, expected[idx])
        seen.extend(idx.tolist())
    assert seen == list(range(11))


def test_cmu_refuses_40x_as_upsampling(cmu):
    with pytest.raises(MagnificationUnavailableError, match="upsampling would invent pixels"):
        cmu.read_patch((0, 0), 40)


def test_ndpi_is_40x_and_lower_magnifications_use_levels_1_2_3(shared_slides):
    with open_slide(shared_slides / "fluorescence-dapi.ndpi") as slide:
        assert slide.vendor == "hamamatsu"
        assert slide.objective_power == 40
        assert slide.mpp == pytest.approx(0.228, abs=0.001)
        assert slide.level_for_magnification(40) == 0
        assert slide.level_for_magnification(20) == 1
        assert slide.level_for_magnification(10) == 2
        assert slide.level_for_magnification(5) == 3
        assert slide.read_patch((1000, 1000), 5).shape == (64, 64, 3)
        assert "macro" in slide.associated_image_names


def test_dicom_folder_opens_and_refuses_5x_and_20x(shared_slides):
    folder = shared_slides / "dicom-jpeg"
    with open_slide(folder) as slide:
        assert slide.vendor == "dicom"
        assert slide.dimensions == (957, 715)
        assert slide.mpp == pytest.approx(16.783, rel=0.01)
        for mag in (5, 20):
            with pytest.raises(MagnificationUnavailableError) as info:
                slide.read_patch((0, 0), mag)
            message = str(info.value)
            assert "dicom-jpeg" in message and "upsampling would invent pixels" in message
            assert "16.78" in message and f"{mag}x" in message


def test_dicom_file_of_the_series_opens_too(shared_slides):
    with open_slide(shared_slides / "dicom-jpeg" / "jpeg.dcm") as slide:
        assert slide.dimensions == (957, 715)


def test_boxes_generic_tiff_opens_with_resolution_mpp_and_is_refused(shared_slides):
    with open_slide(shared_slides / "boxes.tiff") as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.level_count == 4
        assert slide.mpp == pytest.approx(352.8, rel=0.001)
        assert slide.objective_power is None
        for mag in (5, 20):
            with pytest.raises(MagnificationUnavailableError, match="boxes.tiff"):
                slide.read_patch((0, 0), mag)


@pytest.mark.timeout(20)
def test_unreadable_svs_read_raises_corrupt_naming_the_file(shared_slides):
    with open_slide(shared_slides / "unreadable.svs") as slide:
        with pytest.raises(CorruptSlideError, match="unreadable.svs"):
            slide.read_patch((0, 0), 20)
        assert not slide.usable
        with pytest.raises(CorruptSlideError, match="unreadable.svs"):
            slide.read_patches(np.array([[0, 0], [0, 0]]), 5)


@pytest.mark.timeout(20)
def test_unreadable_svs_batches_fail_fast(shared_slides):
    with open_slide(shared_slides / "unreadable.svs") as slide:
        with pytest.raises(CorruptSlideError, match="unreadable.svs"):
            list(slide.iter_patch_batches(np.zeros((20, 2), dtype=np.int64), 5, batch_size=4))


def test_unopenable_tiff_is_refused_as_unsupported(shared_slides):
    with pytest.raises(UnsupportedSlideError, match=r"unopenable\.tiff.*unsupported or corrupt"):
        open_slide(shared_slides / "unopenable.tiff")


def test_truncated_svs_is_refused_as_corrupt(shared_slides):
    with pytest.raises(CorruptSlideError, match=r"broken\.svs.*corrupt"):
        open_slide(shared_slides / "broken.svs")


def test_plain_tiff_patch_is_refused_as_not_a_whole_slide_image(shared_slides):
    with pytest.raises(
        UnsupportedSlideError, match=r"kather-patch-1\.tif.*not a whole-slide image"
    ):
        open_slide(shared_slides / "kather-patch-1.tif")


def test_small_tiled_generic_tiff_is_not_a_whole_slide_image(tmp_path):
    path = tmp_path / "patch.tif"
    rgb = np.full((224, 224, 3), 240, dtype=np.uint8)
    tifffile.imwrite(
        path, rgb, tile=(64, 64), metadata=None, resolution=(10000, 10000, "CENTIMETER")
    )
    with pytest.raises(UnsupportedSlideError, match="not a whole-slide image"):
        open_slide(path)


def test_missing_path_is_a_clear_analysis_error(tmp_path):
    missing = tmp_path / "nope.svs"
    with pytest.raises(AnalysisError, match="no such slide") as info:
        open_slide(missing)
    assert isinstance(info.value, FileNotFoundError)


def test_small_svs_opens(shared_slides):
    with open_slide(shared_slides / "small.svs") as slide:
        assert slide.dimensions == (16, 16)
        assert slide.magnification == pytest.approx(20, rel=0.01)


def test_slide_without_scale_needs_caller_mpp(tmp_path):
    path = _no_scale_tiff(tmp_path / "noscale.tif")
    with pytest.raises(MissingScaleError) as info:
        open_slide(path)
    message = str(info.value)
    assert "noscale.tif" in message and "mpp=" in message and "--mpp" in message
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "caller"
        assert slide.magnification == 20
        assert slide.read_patch((256, 256), 5).shape == (64, 64, 3)


def test_objective_power_supplies_scale_when_mpp_is_absent(tmp_path):
    path = tmp_path / "power.svs"
    rgb = np.full((1024, 1024, 3), 230, dtype=np.uint8)
    tifffile.imwrite(
        path,
        rgb,
        tile=(256, 256),
        compression="zlib",
        description="Aperio Image Library v10.0.0\r\n1024x1024 (256x256) RGB|AppMag = 40",
        metadata=None,
    )
    with open_slide(path) as slide:
        assert slide.vendor == "aperio"
        assert slide.mpp_source == "objective-power"
        assert slide.mpp == pytest.approx(0.25)


def test_caller_mpp_overrides_metadata(shared_slides):
    with open_slide(shared_slides / "cmu-1-small-region.svs", mpp=1.0) as slide:
        assert slide.mpp == 1.0 and slide.mpp_source == "caller"
        assert slide.magnification == 10
        with pytest.raises(MagnificationUnavailableError):
            slide.level_for_magnification(20)


def test_slide_cache_reuses_handles_and_closes_least_recently_used(tmp_path, shared_slides):
    paths = [_no_scale_tiff(tmp_path / f"s{i}.tif") for i in range(3)]
    cache = SlideCache(capacity=2)
    a = cache.get(paths[0], mpp=0.5)
    assert cache.get(paths[0], mpp=0.5) is a
    b = cache.get(paths[1], mpp=0.5)
    assert cache.get(paths[0], mpp=0.5) is a  # a is now the most recently used
    cache.get(paths[2], mpp=0.5)  # evicts b
    assert len(cache) == 2
    assert not b.usable  # closed on eviction
    assert paths[1] not in cache and paths[0] in cache
    assert cache.get(paths[1], mpp=0.5) is not b
    cache.clear()
    assert not a.usable


def test_slide_cache_replaces_a_handle_after_a_read_error(shared_slides):
    cache = SlideCache(capacity=4)
    path = shared_slides / "unreadable.svs"
    first = cache.get(path)
    with pytest.raises(CorruptSlideError):
        first.read_patch((0, 0), 20)
    second = cache.get(path)
    assert second is not first and second.usable
    cache.clear()


def test_slide_cache_is_thread_safe(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = _no_scale_tiff(tmp_path / "shared.tif")
    cache = SlideCache(capacity=2)
    with ThreadPoolExecutor(4) as pool:
        slides = list(pool.map(lambda _: cache.get(path, mpp=0.5), range(16)))
    assert all(s is slides[0] for s in slides)
    cache.clear()
