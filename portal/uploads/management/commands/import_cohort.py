"""``manage.py import_cohort DIR --labels CSV --cohort NAME``: a folder of slides -> cases.

The CSV has ``patient_id`` and ``slide_id`` columns (``label`` and others are ignored here);
each slide is the file (or multi-file directory) in DIR whose name without extension is its
slide_id. One case per patient (accession number = patient id). Files are linked into
``SLIDE_DIR/<cohort slug>/<slide_id>/`` (``--copy`` copies them). Re-running skips slides
already imported.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils.text import slugify

from analysis.files import sha256_file
from portal.cases.models import Case, Cohort, Slide
from portal.uploads.ingest import ingest_slide


def find_slide_file(folder: Path, slide_id: str) -> Path | None:
    matches = sorted(p for p in folder.glob(f"{slide_id}.*") if p.is_file())
    if matches:
        return matches[0]
    directory = folder / slide_id
    return directory if directory.is_dir() else None


def read_labels(csv_path: Path) -> list[dict]:
    try:
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise CommandError(f"cannot read labels {csv_path}: {exc.strerror}") from exc
    missing = {"patient_id", "slide_id"} - set(rows[0] if rows else {})
    if missing:
        raise CommandError(
            f"{csv_path}: needs columns patient_id and slide_id (missing {', '.join(sorted(missing))})"
        )
    return rows


class Command(BaseCommand):
    help = "Import a folder of slides and a labels CSV as a cohort of cases."

    def add_arguments(self, parser):
        parser.add_argument("folder", type=Path)
        parser.add_argument("--labels", type=Path, required=True)
        parser.add_argument("--cohort", required=True, help="cohort name (created if missing)")
        parser.add_argument("--copy", action="store_true", help="copy files instead of linking")

    def handle(self, *args, folder: Path, labels: Path, cohort: str, copy: bool, **options):
        if not folder.is_dir():
            raise CommandError(f"{folder} is not a directory")
        rows = read_labels(labels)
        target, _ = Cohort.objects.get_or_create(name=cohort, defaults={"slug": slugify(cohort)})
        created = skipped = 0
        for row in rows:
            source = find_slide_file(folder, row["slide_id"])
            if source is None:
                raise CommandError(
                    f"slide {row['slide_id']!r} listed in {labels} not found in {folder}"
                )
            slide = self._import_slide(target, row, source, copy)
            if slide is None:
                skipped += 1
                continue
            created += 1
            slide = ingest_slide(slide)
            self.stdout.write(f"{row['slide_id']}: {slide.status} {slide.failure_reason}".rstrip())
        self.stdout.write(
            f"Cohort {target.name}: {created} slides imported, {skipped} already present."
        )

    @transaction.atomic
    def _import_slide(self, cohort: Cohort, row: dict, source: Path, copy: bool) -> Slide | None:
        patient_id = row["patient_id"].strip()
        case, _ = Case.objects.get_or_create(
            cohort=cohort,
            accession_number=patient_id,
            defaults={"patient_id": patient_id, "status": Case.Status.NEW},
        )
        if case.slides.filter(original_name=source.name).exists():
            return None
        relative = Path(cohort.slug) / row["slide_id"] / source.name
        self._place(source, Path(settings.SLIDE_DIR) / relative, copy)
        companion = source.with_suffix("")  # MRXS keeps its data in a directory beside the file
        if source.is_file() and companion.is_dir():
            self._place(
                companion, Path(settings.SLIDE_DIR) / relative.parent / companion.name, copy
            )
        return Slide.objects.create(
            case=case,
            original_name=source.name,
            file=str(relative),
            sha256=sha256_file(source) if source.is_file() else "",
            size_bytes=source.stat().st_size if source.is_file() else 0,
            status=Slide.Status.INGESTING,
        )

    @staticmethod
    def _place(source: Path, destination: Path, copy: bool) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists() or destination.is_symlink():
            return
        if copy:
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, destination)
        else:
            destination.symlink_to(source.resolve())
