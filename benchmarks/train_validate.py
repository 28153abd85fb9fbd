"""Time to build a training set from sign-offs, train and validate a model in the portal.

A throw-away portal (SQLite, data folder in a temp dir, tasks in the caller's thread): one
cohort with an active baseline model (ViT-Tiny encoder, GLTrans), N signed synthetic cases
(5x, 640 x 640 px, about 80 tissue patches each; a sixth of the patients have two cases),
then one training run with the portal's default options (5-fold patient-level CV, up to 20
epochs, patience 5, 1000 bootstrap resamples) timed end to end and per stage.

    python benchmarks/train_validate.py --cases 40 --cases 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setup(tmp: Path) -> None:
    os.environ["LOWMAG_DATA_DIR"] = str(tmp)
    os.environ["DATABASE_URL"] = f"sqlite:///{tmp / 'bench.sqlite3'}"
    os.environ["LOWMAG_TASK_MODE"] = "sync"
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def run(n_cases: int, tmp: Path, side: int) -> dict:
    import numpy as np
    import torch
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.utils import timezone

    from portal.analyses.lifecycle import activate
    from portal.analyses.models import ModelVersion
    from portal.analyses.training import start_training
    from portal.cases.models import Cohort, Membership
    from tests import model_cohort
    from tests.portal_fixtures import make_prediction

    torch.set_num_threads(2)
    settings.SLIDE_DIR = tmp / f"slides-{n_cases}"
    settings.BUNDLE_DIR = tmp / "bundles"
    users = get_user_model().objects
    admin = users.create_user(f"admin{n_cases}", password="x", is_staff=True, is_superuser=True)
    pathologist = users.create_user(f"path{n_cases}", password="x")
    cohort = Cohort.objects.create(name=f"Bench {n_cases}", slug=f"bench-{n_cases}")
    Membership.objects.create(user=pathologist, cohort=cohort, role="pathologist")
    bundle = model_cohort.make_vit_bundle(tmp / f"baseline-{n_cases}", version=f"b{n_cases}")
    call_command("register_model", str(bundle))
    baseline = ModelVersion.objects.get(version=f"b{n_cases}")
    activate(baseline, cohort, admin, "benchmark baseline")
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    n_patients = n_cases - n_cases // 6
    for i in range(n_cases):
        patient = i % n_patients
        label = "lesion" if patient % 2 else "normal"
        case = _case(
            model_cohort, cohort, f"B-{i:04d}", f"P{patient:04d}", label, n_cases * 10_000 + i, side
        )
        make_prediction(case.slides.get(), baseline, label, float(rng.uniform(0.55, 0.95)))
        model_cohort.sign(case, pathologist, label)
    setup_s = time.perf_counter() - start
    today = timezone.localdate()
    start = time.perf_counter()
    run = start_training(cohort, today, today, admin, {})
    total_s = time.perf_counter() - start
    run.refresh_from_db()
    if run.state != "succeeded":
        raise SystemExit(f"training run failed: {run.error}")
    report = run.model_version.report
    return {
        "cases": n_cases,
        "patients": n_patients,
        "patches_per_slide": _patches(tmp, run),
        "setup_s (write + sign)": round(setup_s, 1),
        "train_and_validate_s": round(total_s, 1),
        "stages_s": report["timings"],
        "auc_pooled": report["auc_pooled"],
        "auc_pooled_ci": report["auc_pooled_ci"],
        "confusion_matrix": report["confusion_matrix"],
        "torch_threads": torch.get_num_threads(),
    }


def _case(model_cohort, cohort, accession, patient, label, seed, side):
    """``make_case_with_slide`` with a bigger slide than the tests use."""
    import hashlib

    import numpy as np
    from django.conf import settings

    from analysis.tiffio import write_pyramidal_tiff
    from portal.cases.models import Case, Slide

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    centre = side / 2 + rng.uniform(-side / 16, side / 16, 2)
    tissue = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < (side * 0.42) ** 2
    image = np.full((side, side, 3), 242, np.uint8)
    image[tissue] = (225, 150, 190)
    nuclei = tissue & (rng.random((side, side)) < (0.12 if label == "lesion" else 0.05))
    image[nuclei] = (90, 50, 140) if label == "lesion" else (140, 100, 170)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    path = Path(settings.SLIDE_DIR) / accession / f"{accession}.tiff"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(path, side, side, [image], mpp=2.0, app_mag=5.0, workers=1)
    case = Case.objects.create(
        cohort=cohort, patient_id=patient, accession_number=accession, status="ready"
    )
    Slide.objects.create(
        case=case,
        original_name=path.name,
        file=str(path.relative_to(settings.SLIDE_DIR)),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        size_bytes=path.stat().st_size,
        mpp=2.0,
        magnification=5.0,
        width=side,
        height=side,
        status="ready",
    )
    return case


def _patches(tmp: Path, run) -> float:
    import h5py

    files = sorted((Path(run.work_dir) / "set" / "features").glob("*.h5"))
    counts = []
    for f in files:
        with h5py.File(f, "r") as handle:
            counts.append(len(handle["features"]))
    return round(sum(counts) / max(1, len(counts)), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, action="append", help="cohort size (repeatable)")
    parser.add_argument("--side", type=int, default=640, help="slide side in 5x pixels")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lowmag-train-bench-"))
    _setup(tmp)
    results = [run(n, tmp, args.side) for n in (args.cases or [40, 200])]
    out = REPO / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "train_validate.json").write_text(json.dumps(results, indent=2))
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
