"""``manage.py demo`` (what ``make demo`` runs): the whole main job on embedded defaults.

Creates an admin and a pathologist, trains (or reuses) the demo MAGA-GLTrans model on a
synthetic cohort, plays the hospital for a few cases (a synthetic 20x scan exported at 5x),
ingests and analyses them, then serves the portal at http://127.0.0.1:8000.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import BaseCommand

DEMO_USERS = {
    "admin": ("lowmag-admin", True),
    "pathologist": ("lowmag-demo", False),
}
COHORT = "Demo cohort"
DEMO_CASES = [  # accession, patient, label of the synthetic scan, priority
    ("DEMO-001", "PAT-001", 1, "frozen"),
    ("DEMO-002", "PAT-002", 0, "routine"),
    ("DEMO-003", "PAT-003", 1, "urgent"),
]


class Command(BaseCommand):
    help = "Set up a demo portal (users, demo model, analysed cases) and serve it."

    def add_arguments(self, parser):
        parser.add_argument("--no-serve", action="store_true", help="prepare, then exit")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--slide-size", type=int, default=8000, help="20x pixels per side")
        parser.add_argument(
            "--small", action="store_true", help="a tiny model and cohort (checks, not a demo)"
        )

    def handle(self, *args, no_serve: bool, port: int, slide_size: int, small: bool, **options):
        start = time.perf_counter()
        settings.LOWMAG_TASK_MODE = "sync"  # analyse here, before serving
        call_command("migrate", verbosity=0)
        self._users()
        cohort = self._cohort()
        model = self._model(cohort, small)
        self._cases(cohort, 2048 if small else slide_size)
        elapsed = time.perf_counter() - start
        self.stdout.write(self.style.SUCCESS(f"demo ready in {elapsed:.0f} s"))
        self.stdout.write(f"  model: {model} (demo model, not for diagnosis)")
        for name, (password, _) in DEMO_USERS.items():
            self.stdout.write(f"  log in as {name} / {password}")
        if not no_serve:
            self._serve(port)

    def _users(self) -> None:
        for name, (password, is_admin) in DEMO_USERS.items():
            user, created = User.objects.get_or_create(username=name)
            if created:
                user.set_password(password)
                user.is_staff = user.is_superuser = is_admin
                user.save()

    def _cohort(self):
        from portal.cases.models import Cohort, Membership

        cohort, _ = Cohort.objects.get_or_create(
            name=COHORT, defaults={"slug": "demo", "required_magnification": 5.0}
        )
        if not cohort.is_demo:  # the demo cohort runs the demo model (not for diagnosis)
            Cohort.objects.filter(pk=cohort.pk).update(is_demo=True)
            cohort.is_demo = True
        Membership.objects.get_or_create(
            user=User.objects.get(username="pathologist"),
            cohort=cohort,
            defaults={"role": Membership.PATHOLOGIST},
        )
        return cohort

    def _model(self, cohort, small: bool):
        from analysis.demo_model import DemoModelConfig, train_demo_bundle
        from portal.analyses.models import ModelVersion

        cfg = DemoModelConfig()
        if small:
            cfg = DemoModelConfig(
                n_patients=4,
                slide_size=1536,
                maga_slides=2,
                maga_pairs_per_slide=16,
                maga_epochs=1,
                mil_epochs=2,
            )
        bundle = train_demo_bundle(
            Path(settings.DATA_DIR) / "demo-model", cfg, log=self.stdout.write
        )
        call_command("register_model", str(bundle), "--activate", "--cohort", cohort.name)
        return ModelVersion.objects.get(active_in_cohorts=cohort)

    def _cases(self, cohort, slide_size: int) -> None:
        from analysis.export import export_lowmag
        from analysis.files import sha256_file
        from analysis.synth import write_synthetic_slide
        from portal.cases.models import Case, Slide
        from portal.uploads.ingest import ingest_slide
        from portal.viewer.tileservice import pretile

        scans = Path(settings.DATA_DIR) / "demo-scans"
        scans.mkdir(parents=True, exist_ok=True)
        for index, (accession, patient, label, priority) in enumerate(DEMO_CASES):
            case, _ = Case.objects.get_or_create(
                cohort=cohort,
                accession_number=accession,
                defaults={
                    "patient_id": patient,
                    "priority": priority,
                    "clinical_question": "Lesion present? (synthetic demo case)",
                },
            )
            ready = case.slides.filter(status=Slide.Status.READY).first()
            if ready is not None:
                self._analyse(accession, ready)  # a no-op once its prediction exists
                continue
            source = scans / f"{accession}-20x.svs"
            if not source.exists():
                self.stdout.write(f"{accession}: scanning a synthetic 20x slide ...")
                write_synthetic_slide(
                    source,
                    width=slide_size,
                    height=slide_size,
                    seed=100 + index,
                    label=label,
                )
            slide = Slide.objects.create(
                case=case, original_name=f"{accession}-5x.svs", status=Slide.Status.INGESTING
            )
            folder = Path(settings.SLIDE_DIR) / str(slide.pk)
            folder.mkdir(parents=True, exist_ok=True)
            exported = export_lowmag(source, folder / slide.original_name, magnification=5)
            self.stdout.write(
                f"{accession}: 5x export {exported.bytes / 1e6:.1f} MB "
                f"({exported.size_ratio:.1f}x smaller than the 20x scan)"
            )
            slide.file = f"{slide.pk}/{slide.original_name}"
            slide.sha256 = sha256_file(folder / slide.original_name)
            slide.size_bytes = exported.bytes
            slide.save()
            ingest_slide(slide)
            pretile(slide.path)
            self._analyse(accession, slide)

    def _analyse(self, accession: str, slide) -> None:
        from portal.analyses.models import AnalysisJob
        from portal.analyses.tasks import request_analysis

        job = request_analysis(slide)  # runs at once: the task mode is "sync"
        if job is None:
            self.stdout.write(f"{accession}: not analysed (no active model for the cohort)")
            return
        job = AnalysisJob.objects.get(pk=job.pk)
        total = job.timings.get("total", 0)
        self.stdout.write(f"{accession}: analysis {job.state} ({total:.1f} s) {job.error}")

    def _serve(self, port: int) -> None:
        self.stdout.write(f"serving http://127.0.0.1:{port}/  (Ctrl+C stops)")
        try:
            subprocess.call([sys.executable, "-m", "portal.web", "--port", str(port)])
        except KeyboardInterrupt:
            pass
