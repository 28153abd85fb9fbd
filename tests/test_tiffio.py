"""The streaming Aperio-style pyramidal TIFF writer, checked by reading back with OpenSlide."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from PIL import Image, ImageDraw

from analysis.tiffio import area_downsample, pyramid_dimensions, write_pyramidal_tiff


def _test_image(width: int, height: int) -> np.ndarray:
    """Smooth colour gradients plus a luminance texture (what JPEG 4:2:0 is made for)."""
    yy, xx = np.mgrid[0:height, 0:width]
    texture = np.sin(xx / 9.0) * np.cos(yy / 13.0) * 40  # (H, W)
    r = 60 + 140 * xx / width + texture
    g = 40 + 140 * yy / height + texture
    b = 180 - 60 * xx / width + texture
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)  # (H, W, 3)


def _read_level(osr: openslide.OpenSlide, level: int) -> np.ndarray:
    rgba = osr.read_region((0, 0), level, osr.level_dimensions[level])
    return np.asarray(rgba)[..., :3].astype(np.int16)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _test_image(2100, 1300)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory, image):
    label = Image.new("RGB", (200, 160), "white")
    ImageDraw.Draw(label).rectangle([20, 20, 99, 79], fill="black")
    macro = Image.fromarray(image[::8, ::8])
    path = tmp_path_factory.mktemp("tiffio") / "gradient.svs"
    info = write_pyramidal_tiff(
        path,
        2100,
        1300,
        lambda y0, rows: image[y0 : y0 + rows],
        mpp=0.5,
        app_mag=20,
        quality=90,
        min_level_size=128,
        associated={"label": label, "macro": macro},
    )
    return path, info


def test_pyramid_opens_as_aperio_with_mpp_and_objective_power(pyramid):
    path, info = pyramid
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
        assert float(osr.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 20
        assert osr.level_dimensions == ((2100, 1300), (525, 325), (132, 82))
    assert info.level_dimensions == [(2100, 1300), (525, 325), (132, 82)]
    assert not info.bigtiff


def test_level0_pixels_match_the_source(pyramid, image):
    path, _ = pyramid
    with openslide.OpenSlide(str(path)) as osr:
        diff = np.abs(_read_level(osr, 0) - image)
    assert diff.mean() < 2.0
    assert np.percentile(diff, 99) < 12


def test_reduced_levels_are_area_averages_of_the_level_above(pyramid, image):
    path, _ = pyramid
    expected = area_downsample(image, 4)  # (325, 525, 3)
    with openslide.OpenSlide(str(path)) as osr:
        level1 = _read_level(osr, 1)
        level2 = _read_level(osr, 2)
    assert np.abs(level1 - expected).mean() < 2.0
    assert np.abs(level2 - area_downsample(expected, 4)).mean() < 3.0


def test_label_and_macro_are_associated_images_and_the_label_is_lossless(pyramid, image):
    path, info = pyramid
    with openslide.OpenSlide(str(path)) as osr:
        assert set(osr.associated_images) == {"label", "macro"}  # smallest level: no thumbnail
        label = np.asarray(osr.associated_images["label"].convert("RGB"))
        macro = np.asarray(osr.associated_images["macro"].convert("RGB")).astype(np.int16)
    assert label.shape == (160, 200, 3)
    assert label[50, 50].max() == 0 and label[120, 150].min() == 255
    assert np.abs(macro - image[::8, ::8]).mean() < 3.0
    assert info.associated_images == ["label", "macro"]


def test_a_thumbnail_page_is_written_when_the_smallest_level_is_large(tmp_path):
    image = _test_image(3200, 2000)
    path = tmp_path / "thumb.svs"
    info = write_pyramidal_tiff(
        path, 3200, 2000, lambda y0, n: image[y0 : y0 + n], mpp=0.5, app_mag=20
    )
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_dimensions == ((3200, 2000), (800, 500))
        thumbnail = np.asarray(osr.associated_images["thumbnail"].convert("RGB"))
    assert thumbnail.shape == (250, 400, 3)  # at most half the smallest level
    expected = np.asarray(Image.fromarray(image).resize((400, 250), Image.Resampling.BOX))
    assert np.abs(thumbnail.astype(np.int16) - expected).mean() < 3.0
    assert info.associated_images == ["thumbnail"]


def test_strips_of_any_height_give_the_same_image(tmp_path, image):
    strips = (image[y : y + 100] for y in range(0, 1300, 100))
    path = tmp_path / "strips.svs"
    write_pyramidal_tiff(path, 2100, 1300, strips, mpp=0.25, app_mag=40, quality=90)
    with openslide.OpenSlide(str(path)) as osr:
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert osr.level_dimensions == ((2100, 1300), (525, 325))  # next would be < 512
        assert np.abs(_read_level(osr, 0) - image).mean() < 2.0


def test_bigtiff_is_readable(tmp_path, image):
    path = tmp_path / "big.svs"
    info = write_pyramidal_tiff(
        path, 2100, 1300, lambda y0, n: image[y0 : y0 + n], mpp=0.5, app_mag=20, bigtiff=True
    )
    assert path.read_bytes()[:4] == b"II+\x00"
    assert info.bigtiff
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert np.abs(_read_level(osr, 1) - area_downsample(image, 4)).mean() < 3.0


def test_strips_that_do_not_cover_the_image_are_refused(tmp_path, image):
    with pytest.raises(ValueError, match="fewer than the image height"):
        write_pyramidal_tiff(
            tmp_path / "short.svs", 2100, 1300, iter([image[:600]]), mpp=0.5, app_mag=20
        )
    with pytest.raises(ValueError, match="expected"):
        write_pyramidal_tiff(
            tmp_path / "narrow.svs", 2000, 1300, iter([image]), mpp=0.5, app_mag=20
        )


def test_area_downsample_averages_blocks_and_partial_edge_blocks():
    rows = np.zeros((4, 6, 3), dtype=np.uint8)
    rows[:, :4] = 100
    rows[:2, :2] = 200
    rows[:, 4:] = 40
    out = area_downsample(rows, 4)  # (1, 2, 3): one full block, one 4x2 edge block
    assert out.shape == (1, 2, 3)
    assert out[0, 0, 0] == 125  # (4 * 200 + 12 * 100) / 16
    assert out[0, 1, 0] == 40


def test_pyramid_dimensions_stop_before_the_minimum_size():
    assert pyramid_dimensions(50000, 40000) == [
        (50000, 40000),
        (12500, 10000),
        (3125, 2500),
        (782, 625),
    ]
    assert (
        pyramid_dimensions(1000, 300, level_factor=2, min_level_size=256)
        == [
            (1000, 300),
            (500, 150),
            (250, 75),
        ][:2]
    )


def test_a_failing_strip_source_leaves_no_file(tmp_path, image):
    def broken(y0: int, rows: int) -> np.ndarray:
        if y0 >= 512:
            raise RuntimeError("scanner went away")
        return image[y0 : y0 + rows]

    path = tmp_path / "broken.svs"
    with pytest.raises(RuntimeError, match="scanner went away"):
        write_pyramidal_tiff(path, 2100, 1300, broken, mpp=0.5, app_mag=20)
    assert not path.exists()


def test_unknown_associated_image_names_are_refused_before_writing(tmp_path, image):
    path = tmp_path / "named.svs"
    with pytest.raises(ValueError, match="label or macro"):
        write_pyramidal_tiff(
            path,
            2100,
            1300,
            lambda y0, n: image[y0 : y0 + n],
            mpp=0.5,
            app_mag=20,
            associated={"barcode": Image.new("RGB", (10, 10))},
        )
    assert not path.exists()
