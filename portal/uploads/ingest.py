"""From a completed upload to a slide record: verify, store, unpack, open, describe.

``on_upload_complete(upload)`` is what the tus view calls once the last byte has arrived
(a task queue can call it later instead). It hashes the file, answers duplicates with the
existing slide, moves the file into the slide's own folder ``<SLIDE_DIR>/<slide id>/``,
unpacks a zipped multi-file slide there, and runs ``ingest_slide``. A slide that fails
keeps its record and its reason; its files are removed.

``ingest_slide(slide)`` opens the slide through ``analysis.slides`` and records vendor,
scale, dimensions, tissue area and the label/macro/thumbnail images, or marks it failed
with a reason the uploader can act on. It never deletes anything.
"""

from __future__ import annotations

import logging
import re
import shutil
import unicodedata
from pathlib import Path

from django.conf import settings

from analysis.errors import AnalysisError
from analysis.files import sha256_file
from analysis.slides import Slide as SlideImage
from analysis.slides import open_slide
from analysis.tissue import tissue_mask
from portal.cases.models import Slide
from portal.cases.signals import slide_ready
from portal.reviews import audit
from portal.uploads.archive import UnsafeArchiveError, extract_slide_archive
from portal.uploads.models import Upload

logger = logging.getLogger(__name__)

THUMBNAIL_SIZE = (1024, 1024)
ASSET_NAMES = ("label", "macro", "thumbnail")


def on_upload_complete(upload: Upload) -> Slide:
    """Turn a fully received upload into a slide (new, or the existing duplicate)."""
    upload.sha256 = sha256_file(upload.data_path)
    upload.completed = True
    duplicate = _ready_duplicate(upload)
    if duplicate is not None:
        upload.data_path.unlink(missing_ok=True)
        upload.slide, upload.duplicate = duplicate, True
        upload.save()
        _audit(upload, duplicate)
        return duplicate
    slide = _store(upload)
    upload.slide = slide
    upload.save()
    if slide.status == Slide.Status.INGESTING:
        ingest_slide(slide)
    if slide.status == Slide.Status.FAILED:
        shutil.rmtree(slide_folder(slide), ignore_errors=True)
    _audit(upload, slide)
    _note_addendum(slide)
    if slide.is_ready:
        _queue_work(slide)
    return slide


def _note_addendum(slide: Slide) -> None:
    """A slide arriving on a signed case is an addendum: the signed report stays as signed."""
    from portal.reviews.models import Diagnosis

    if Diagnosis.objects.filter(case=slide.case_id, status=Diagnosis.SIGNED).exists():
        audit.record(
            None,
            "slide.addendum",
            slide,
            case=slide.case,
            note="arrived after sign-off; the signed report changes only through an amendment",
        )


def ingest_and_analyse(slide_id: int) -> str:
    """Ingest a stored slide record; once it is ready, queue its analyses. Returns its status."""
    from portal.analyses import progress

    slide = Slide.objects.select_related("case__cohort").get(pk=slide_id)
    if slide.status == Slide.Status.INGESTING:
        slide = ingest_slide(slide)
    progress.worklist_update(slide.case)
    if slide.is_ready:
        _queue_work(slide)
    return slide.status


def _queue_work(slide: Slide) -> None:
    """A slide became ready: tiles, the active model's analysis and any shadow candidate's."""
    from portal.analyses.shadow import request_shadow
    from portal.analyses.tasks import request_analysis

    slide_ready.send(sender=Slide, slide=slide)  # the viewer pre-renders its tiles
    request_analysis(slide)  # queued after commit, with the cohort's active model
    request_shadow(slide)  # a candidate in shadow mode analyses it too, out of sight


def ingest_slide(slide: Slide) -> Slide:
    """Open the stored slide and record what it is; status becomes ready or failed."""
    try:
        with open_slide(slide.path) as image:
            _record_geometry(slide, image)
            _check_magnification(image, slide.case.cohort.required_magnification)
            image.check_readable()
            slide.tissue_area_mm2 = _tissue_area_mm2(image)
            _save_assets(slide, image)
    except AnalysisError as exc:
        return _fail(slide, _reason(slide, exc))
    except Exception as exc:  # noqa: BLE001 - reported to the uploader, traceback logged
        logger.exception("ingest of slide %s failed unexpectedly", slide.pk)
        return _fail(
            slide,
            f"{slide.original_name}: the slide could not be read ({exc.__class__.__name__}); "
            "check that the file is a complete whole-slide image and upload it again",
        )
    slide.mark_ready()
    return slide


def slide_folder(slide: Slide) -> Path:
    """The slide's own folder, ``<SLIDE_DIR>/<slide id>``."""
    return Path(settings.SLIDE_DIR) / str(slide.pk)


def max_unzipped_bytes() -> int:
    """Cap on what a zipped slide may expand to (twice the upload limit unless set)."""
    default = 2 * int(settings.LOWMAG_MAX_UPLOAD_BYTES)
    return int(getattr(settings, "LOWMAG_MAX_UNZIPPED_BYTES", default))


def safe_filename(name: str) -> str:
    """A plain file name: no folders, no control characters, at most 200 characters."""
    name = unicodedata.normalize("NFC", name.replace("\\", "/").rsplit("/", 1)[-1])
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip().lstrip(".")
    stem_limit = 200
    if len(name) > stem_limit:
        suffix = Path(name).suffix[:20]
        name = name[: stem_limit - len(suffix)] + suffix
    if not name or Path(name).stem in ASSET_NAMES:
        name = f"slide-{name}" if name else "slide"
    return name


# -- storing -----------------------------------------------------------------------------------


def _ready_duplicate(upload: Upload) -> Slide | None:
    return (
        Slide.objects.filter(
            case__cohort_id=upload.case.cohort_id, sha256=upload.sha256, status=Slide.Status.READY
        )
        .order_by("id")
        .first()
    )


def _store(upload: Upload) -> Slide:
    """Create the slide record and move (or unpack) the file into its folder."""
    slide = Slide.objects.create(
        case=upload.case,
        original_name=upload.filename[:255],
        sha256=upload.sha256,
        size_bytes=upload.length,
        status=Slide.Status.INGESTING,
    )
    folder = slide_folder(slide)
    folder.mkdir(parents=True, exist_ok=False)
    name = safe_filename(upload.filename)
    if name.lower().endswith(".zip"):
        _unpack(slide, upload.data_path, folder)
    else:
        shutil.move(upload.data_path, folder / name)
        slide.file = f"{slide.pk}/{name}"
    slide.save()
    return slide


def _unpack(slide: Slide, zip_path: Path, folder: Path) -> None:
    try:
        opened = extract_slide_archive(zip_path, folder, max_unzipped_bytes())
    except UnsafeArchiveError as exc:
        slide.mark_failed(f"{slide.original_name}: {exc}", save=False)  # _store saves it
        return
    finally:
        zip_path.unlink(missing_ok=True)
    slide.file = str(opened.relative_to(settings.SLIDE_DIR))


# -- describing --------------------------------------------------------------------------------


def _record_geometry(slide: Slide, image: SlideImage) -> None:
    slide.vendor = image.vendor[:50]
    slide.mpp = image.mpp
    slide.magnification = image.magnification
    slide.width, slide.height = image.dimensions
    slide.level_count = image.level_count


def _check_magnification(image: SlideImage, required_mag: float) -> None:
    """Plan a read at the cohort's magnification: raises if the slide is too coarse for it."""
    image.level_for_magnification(required_mag)


def _tissue_area_mm2(image: SlideImage) -> float:
    mask = tissue_mask(image)
    return float(mask.mask.sum()) * (mask.mpp / 1000.0) ** 2


def _save_assets(slide: Slide, image: SlideImage) -> None:
    image.thumbnail(THUMBNAIL_SIZE).save(slide.asset_path("thumbnail"))
    for name in ("label", "macro"):
        present = name in image.associated_image_names
        if present:
            image.associated_image(name).save(slide.asset_path(name))
        setattr(slide, f"has_{name}", present)


def _reason(slide: Slide, exc: AnalysisError) -> str:
    """The error's message, naming the slide as the uploader did (not its stored name)."""
    message = str(exc)
    stored_name = f"{slide.path.name}:"
    if message.startswith(stored_name):
        message = message[len(stored_name) :].lstrip()
    return f"{slide.original_name}: {message}"


def _fail(slide: Slide, reason: str) -> Slide:
    slide.mark_failed(reason)
    return slide


def _audit(upload: Upload, slide: Slide) -> None:
    audit.record(
        upload.user,
        "slide.upload",
        obj=slide,
        upload=str(upload.id),
        sha256=upload.sha256,
        status=slide.status,
        duplicate=upload.duplicate,
    )
