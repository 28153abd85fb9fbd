"""Ingest after upload: what a slide records, what is refused and why, zipped multi-file slides."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from analysis.slides import open_slide
from portal.analyses.models import AnalysisJob
from portal.cases.models import Slide
from portal.uploads.archive import UnsafeArchiveError, extract_slide_archive
from portal.uploads.ingest import ingest_slide, slide_folder
from tests.conftest import shared_slide
from tests.test_uploads import tus_upload


@pytest.fixture(autouse=True)
def _own_storage(storage):
    """Every test here stores slides and uploads in its own temporary folder."""


def upload_bytes(client, case, data: bytes, name: str) -> Slide:
    _, response = tus_upload(client, case, data, name, chunk=max(len(data), 1))
    return Slide.objects.get(pk=int(response["Upload-Slide-Id"]))


def zip_bytes(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def dicom_zip() -> bytes:
    folder = shared_slide("dicom-jpeg/jpeg.dcm").parent
    return zip_bytes({f"dicom-jpeg/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())})


def assert_failed_without_files(slide: Slide, *phrases: str) -> None:
    assert slide.status == "failed"
    for phrase in phrases:
        assert phrase in slide.failure_reason
    assert not slide_folder(slide).exists()
    assert not AnalysisJob.objects.filter(slide=slide).exists()


# -- single-file slides ------------------------------------------------------------------------


def test_cmu_slide_records_scale_geometry_tissue_and_images(lis_client, case_a):
    slide = upload_bytes(
        lis_client, case_a, shared_slide("cmu-1-small-region.svs").read_bytes(), "cmu.svs"
    )
    assert slide.status == "ready", slide.failure_reason
    assert slide.vendor == "aperio"
    assert slide.mpp == pytest.approx(0.499, abs=1e-3)
    assert slide.magnification == pytest.approx(20.0, rel=0.01)
    assert (slide.width, slide.height, slide.level_count) == (2220, 2967, 1)
    # The region is about 1.1 x 1.5 mm and mostly tissue.
    assert 0.2 < slide.tissue_area_mm2 < 1.7
    assert slide.has_label and slide.has_macro
    for name in ("label", "macro", "thumbnail"):
        with Image.open(slide.asset_path(name)) as image:
            assert image.format == "PNG" and min(image.size) > 0


def test_truncated_svs_fails_as_corrupt_with_no_files_and_no_analysis(lis_client, case_a):
    slide = upload_bytes(lis_client, case_a, shared_slide("broken.svs").read_bytes(), "broken.svs")
    assert_failed_without_files(slide, "corrupt")


def test_final_patch_carries_the_failure_reason(lis_client, case_a):
    _, response = tus_upload(
        lis_client, case_a, shared_slide("broken.svs").read_bytes(), "broken.svs", chunk=4096
    )
    assert response["Upload-Slide-Status"] == "failed"
    assert "corrupt" in response["Upload-Slide-Reason"]


def test_png_is_refused_as_not_a_whole_slide_image(lis_client, case_a):
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 120, 160)).save(buffer, "PNG")
    slide = upload_bytes(lis_client, case_a, buffer.getvalue(), "photo.png")
    assert_failed_without_files(slide, "not a whole-slide image")


def test_plain_tiff_patch_is_refused_as_not_a_whole_slide_image(lis_client, case_a):
    data = shared_slide("kather-patch-1.tif").read_bytes()
    slide = upload_bytes(lis_client, case_a, data, "kather-patch-1.tif")
    assert_failed_without_files(slide, "not a whole-slide image", "224x224")


def test_slide_whose_pixels_cannot_be_decoded_fails(lis_client, case_a):
    slide = upload_bytes(lis_client, case_a, shared_slide("unreadable.svs").read_bytes(), "u.svs")
    assert_failed_without_files(slide, "failed")
    assert slide.vendor == "aperio"  # what could be read is still recorded


def test_slide_coarser_than_the_cohort_magnification_fails(lis_client, case_a):
    slide = upload_bytes(lis_client, case_a, shared_slide("boxes.tiff").read_bytes(), "boxes.tiff")
    assert_failed_without_files(slide, "cannot read at 5x", "upsampling would invent pixels")


# -- zipped multi-file slides ------------------------------------------------------------------


def test_dicom_zip_is_unpacked_into_the_slides_own_folder(lis_client, case_a, settings):
    case_a.cohort.required_magnification = 0.5  # the series is ~0.6x (16.8 µm/px)
    case_a.cohort.save()
    slide = upload_bytes(lis_client, case_a, dicom_zip(), "series.zip")
    assert slide.status == "ready", slide.failure_reason
    folder = Path(settings.SLIDE_DIR) / str(slide.pk)
    assert slide.path == folder
    assert (folder / "jpeg.dcm").read_bytes() == shared_slide("dicom-jpeg/jpeg.dcm").read_bytes()
    assert not list(folder.glob("*.zip"))
    assert slide.vendor == "dicom" and slide.mpp == pytest.approx(16.78, abs=0.01)
    assert slide.asset_path("thumbnail").exists()
    with open_slide(slide.path) as reopened:  # the assets beside the series do not disturb it
        assert reopened.dimensions == (957, 715)


def test_dicom_zip_for_a_5x_cohort_fails_as_too_coarse(lis_client, case_a):
    slide = upload_bytes(lis_client, case_a, dicom_zip(), "series.zip")
    assert_failed_without_files(slide, "cannot read at 5x", "16.78")
    assert slide.failure_reason.startswith("series.zip: cannot read at 5x")


@pytest.mark.parametrize(
    ("entries", "symlinks", "phrase"),
    [
        ({"series/a.dcm": b"x", "../evil": b"owned"}, None, "outside its folder"),
        ({"series/a.dcm": b"x", "/tmp/evil": b"owned"}, None, "absolute path"),
        ({"series/a.dcm": b"x"}, {"series/evil": "/etc/passwd"}, "symbolic link"),
        ({"notes.txt": b"hello"}, None, "holds no slide"),
        ({"a/x.dcm": b"x", "b/y.dcm": b"y"}, None, "more than one slide"),
        ({"s/x.dcm": b"x", "s/readme.txt": b"y"}, None, "other file"),
    ],
)
def test_unsafe_or_non_slide_zip_is_refused_with_nothing_written(
    lis_client, case_a, storage, entries, symlinks, phrase
):
    slide = upload_bytes(lis_client, case_a, zip_bytes(entries, symlinks), "bad.zip")
    assert_failed_without_files(slide, phrase)
    written = [p for p in storage.rglob("*") if p.is_file()]
    assert written == []
    assert not Path("/tmp/evil").exists()


def test_zip_expanding_past_the_cap_is_refused(lis_client, case_a, settings):
    settings.LOWMAG_MAX_UNZIPPED_BYTES = 1_000_000
    bomb = zip_bytes({"s/a.dcm": bytes(2_000_000)})
    assert len(bomb) < 10_000
    slide = upload_bytes(lis_client, case_a, bomb, "bomb.zip")
    assert_failed_without_files(slide, "more than 1000000 bytes")


def test_mirax_layout_lands_in_dest_with_its_data_folder(tmp_path):
    archive = tmp_path / "m.zip"
    archive.write_bytes(
        zip_bytes(
            {"export/s1.mrxs": b"m", "export/s1/Slidedat.ini": b"i", "export/s1/Data0.dat": b"d"}
        )
    )
    dest = tmp_path / "slide"
    dest.mkdir()
    opened = extract_slide_archive(archive, dest, max_total_bytes=10_000)
    assert opened == dest / "s1.mrxs"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "s1.mrxs",
        "s1/Data0.dat",
        "s1/Slidedat.ini",
    ]


def test_archive_with_a_dotdot_entry_is_refused_before_any_write(tmp_path):
    archive = tmp_path / "m.zip"
    archive.write_bytes(zip_bytes({"a.dcm": b"x", "x/../../evil.dcm": b"y"}))
    dest = tmp_path / "slide"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="outside"):
        extract_slide_archive(archive, dest, max_total_bytes=10_000)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil.dcm").exists()


def test_ingest_can_be_rerun_on_a_stored_slide(lis_client, case_a):
    slide = upload_bytes(lis_client, case_a, shared_slide("small.svs").read_bytes(), "small.svs")
    assert slide.status == "ready", slide.failure_reason
    slide.status, slide.vendor = "ingesting", ""
    slide.save()
    assert ingest_slide(slide).status == "ready"
    assert Slide.objects.get(pk=slide.pk).vendor == "aperio"


# -- zip bombs ---------------------------------------------------------------------------------


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_zip_bomb_is_refused_before_10_mb_is_written(tmp_path):
    bomb = tmp_path / "bomb.zip"
    zeros = b"\0" * (64 * 1024 * 1024)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for i in range(4):
            archive.writestr(f"series/{i}.dcm", zeros)
    assert bomb.stat().st_size < 1024 * 1024  # 256 MB of "slide" in well under 1 MB
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        extract_slide_archive(bomb, dest, max_total_bytes=40 * 1024**3)
    assert _folder_bytes(dest) < 10 * 1024 * 1024


def test_entries_sharing_one_compressed_stream_are_refused(tmp_path):
    """The non-recursive bomb: many directory entries pointing at the same data."""
    path = tmp_path / "overlap.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("series/0.dcm", b"x" * 4096)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        (info,) = archive.infolist()
    cd_start = raw.rindex(b"PK\x01\x02")
    eocd = raw.rindex(b"PK\x05\x06")
    entry = bytes(raw[cd_start:eocd])
    twin = entry.replace(b"series/0.dcm", b"series/1.dcm")
    directory = entry + twin
    end = bytearray(raw[eocd:])
    end[8:10] = end[10:12] = (2).to_bytes(2, "little")  # entries on disk, in total
    end[12:16] = len(directory).to_bytes(4, "little")
    path.write_bytes(bytes(raw[:cd_start]) + directory + bytes(end))
    with zipfile.ZipFile(path) as archive:
        assert [i.header_offset for i in archive.infolist()] == [info.header_offset] * 2
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="share or overstate"):
        extract_slide_archive(path, dest, max_total_bytes=40 * 1024**3)
    assert _folder_bytes(dest) == 0
