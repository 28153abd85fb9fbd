"""``manage.py build_training_set COHORT --from YYYY-MM-DD --to YYYY-MM-DD --out DIR``.

Writes the training set of a cohort's signed cases (``portal.analyses.trainingset``):
``labels.csv`` and ``features/<slide>.h5`` for ``lowmag crossval`` or ``lowmag bundle build``,
plus ``cases.csv`` and ``provenance.json``. Bad input is refused in one line and nothing is
written. The portal's own training runs do the same inside their job.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from portal.analyses import trainingset
from portal.cases.models import Cohort


class Command(BaseCommand):
    help = "Write a training set (labels.csv + features) from a cohort's signed cases."

    def add_arguments(self, parser):
        parser.add_argument("cohort", help="cohort name or slug")
        parser.add_argument("--from", dest="signed_from", required=True, type=_date)
        parser.add_argument("--to", dest="signed_to", required=True, type=_date)
        parser.add_argument("--out", required=True, type=Path)
        parser.add_argument(
            "--encoder", help="encoder name (default: the cohort's active model's encoder)"
        )

    def handle(self, *args, cohort, signed_from, signed_to, out, encoder, **options):
        from analysis.errors import AnalysisError
        from portal.analyses.training import _encoder

        found = (
            Cohort.objects.filter(name=cohort).first() or Cohort.objects.filter(slug=cohort).first()
        )
        if found is None:
            raise CommandError(f"no cohort named {cohort!r}")
        if out.exists() and any(out.iterdir()):
            raise CommandError(f"{out} is not empty; choose a new folder")
        try:
            training_set = trainingset.collect(found, signed_from, signed_to)
            trainingset.verify_files(training_set)
            model, _weights = _encoder(found, {"encoder": encoder})
            trainingset.write(training_set, out, model, 5.0)
        except (trainingset.TrainingSetError, AnalysisError) as exc:
            raise CommandError(str(exc)) from exc
        counts = ", ".join(f"{k}: {v}" for k, v in training_set.class_counts().items())
        self.stdout.write(
            f"{len(training_set.cases)} slides of {len(training_set.patients)} patients "
            f"({counts}) written to {out}; data sha256 {training_set.data_sha256()[:12]}…"
        )


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise CommandError(f"{text!r} is not a date; use YYYY-MM-DD") from exc
