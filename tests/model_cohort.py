"""A small synthetic cohort for the model lifecycle tests: real slide files (5x, a few dozen
patches each), a real tiny bundle over the ViT-Tiny encoder, pathologists' sign-offs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from analysis.bundle import BundleManifest, write_bundle
from analysis.mil import build_mil

TINY_VIT_GLTRANS = {"in_dim": 192, "dim": 16, "n_heads": 2, "depth": 1, "n_classes": 2}
CLASSES = ["lesion", "normal"]  # sorted, as training sets order them
FAST_TRAINING = {
    "folds": 3,
    "epochs": 2,
    "patience": 2,
    "bootstrap": 200,
    "mil_config": {"dim": 16, "n_heads": 2, "depth": 1},
}


def make_vit_bundle(out_dir: Path, *, version: str = "1", seed: int = 0) -> Path:
    """A clinical (non-demo) GLTrans bundle over the seeded ViT-Tiny encoder."""
    torch.manual_seed(seed)
    mil = build_mil("gltrans", TINY_VIT_GLTRANS)
    manifest = BundleManifest(
        name="baseline",
        version=version,
        task="lesion detection",
        classes=list(CLASSES),
        magnification=5.0,
        patch_size=64,
        encoder={"name": "vit_tiny", "params": {"precision": "fp32"}},
        mil={"name": "gltrans", "config": TINY_VIT_GLTRANS},
        is_demo=False,
    )
    return write_bundle(out_dir, manifest, mil_state=mil.state_dict())


def _side(mpp: float) -> int:
    return int(round(320 * min(2.0 / mpp, 2.0)))


def write_slide_file(slide_dir: Path, name: str, label: str, seed: int, mpp: float = 2.0) -> Path:
    """A pyramidal TIFF of a tissue disc, lesion discs with darker nuclei: 320 px at 5x
    (2 µm/px); a finer scan is at most 640 px (fewer patches, fast MAGA tests)."""
    import numpy as np

    from analysis.tiffio import write_pyramidal_tiff

    side = _side(mpp)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    centre = side / 2 + rng.uniform(-20, 20, 2)
    tissue = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < (side * 0.42) ** 2
    image = np.full((side, side, 3), 242, np.uint8)
    image[tissue] = (225, 150, 190)  # eosin-pink stroma
    nuclei = tissue & (rng.random((side, side)) < (0.12 if label == "lesion" else 0.05))
    image[nuclei] = (90, 50, 140) if label == "lesion" else (140, 100, 170)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    path = slide_dir / name / f"{name}.tiff"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(path, side, side, [image], mpp=mpp, app_mag=10.0 / mpp, workers=1)
    return path


def make_case_with_slide(
    cohort,
    accession: str,
    patient: str,
    label: str,
    seed: int,
    *,
    status: str = "ready",
    mpp: float = 2.0,
):
    """A case with one real synthetic slide file (``status`` "ingesting": not yet ingested)."""
    from django.conf import settings

    from portal.cases.models import Case, Slide

    path = write_slide_file(Path(settings.SLIDE_DIR), accession, label, seed, mpp)
    case = Case.objects.create(
        cohort=cohort, patient_id=patient, accession_number=accession, status="ready"
    )
    Slide.objects.create(
        case=case,
        original_name=path.name,
        file=str(path.relative_to(settings.SLIDE_DIR)),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        size_bytes=path.stat().st_size,
        mpp=mpp,
        magnification=10.0 / mpp,
        width=_side(mpp),
        height=_side(mpp),
        status=status,
    )
    return case


def sign(case, pathologist, call: str):
    """Draft and sign the case's diagnosis the way the API does (signing.sign)."""
    from portal.reviews import signing
    from portal.reviews.models import Diagnosis

    draft = Diagnosis.objects.create(
        case=case, author=pathologist, call=call, diagnosis_text=f"{call} (synthetic)"
    )
    return signing.sign(draft, pathologist)


def compared_cohort(cohort, admin, pathologist, tmp_path: Path, n_cases: int = 4) -> dict:
    """Cohort with an active baseline, a trained candidate (with a validation report computed
    from out-of-fold predictions) in shadow mode, and ``n_cases`` signed cases both analysed."""
    import numpy as np
    from django.conf import settings
    from django.core.management import call_command
    from django.utils import timezone

    from analysis.evaluate import OutOfFoldPredictions
    from analysis.validation import validation_report
    from portal.analyses.lifecycle import activate
    from portal.analyses.models import (
        ModelVersion,
        ShadowDeployment,
        ShadowPrediction,
        TrainingRun,
    )
    from tests.portal_fixtures import make_case, make_prediction

    settings.BUNDLE_DIR = tmp_path / "bundles"
    call_command("register_model", str(make_vit_bundle(tmp_path / "b1", version="1")))
    call_command("register_model", str(make_vit_bundle(tmp_path / "b2", version="2", seed=1)))
    baseline = ModelVersion.objects.get(version="1")
    candidate = ModelVersion.objects.get(version="2")
    activate(baseline, cohort, admin, "first model")
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 10)
    p1 = np.clip(labels * 0.5 + rng.uniform(0, 0.5, 20), 0, 1)
    predictions = OutOfFoldPredictions(
        [f"s{i}" for i in range(20)],
        [f"P{i}" for i in range(20)],
        np.arange(20) % 4,
        labels,
        np.stack([1 - p1, p1], axis=1),
    )
    report = validation_report(
        predictions,
        CLASSES,
        n_bootstrap=200,
        out_dir=Path(candidate.bundle_path) / "report",
    )
    report["cases"] = [
        {
            "accession_number": f"T-{i}",
            "patient_id": f"P{i}",
            "label": CLASSES[labels[i]],
            "fold": int(i % 4),
            "probabilities": {"lesion": 1 - p1[i], "normal": p1[i]},
        }
        for i in range(20)
    ]
    report["crossval"] = {"n_folds": 4}
    report["provenance"] = {
        "code_version": "0.1.0",
        "data_sha256": "d" * 64,
        "encoder": "vit_tiny",
        "excluded": {"withdrawn": [], "ai_not_reviewed": ["T-U"], "no_slide": []},
        "training_run": 1,
    }
    ModelVersion.objects.filter(pk=candidate.pk).update(
        report=report,
        intended_use="Assist pathologists of the cohort with lesion detection.",
        known_limits="One cohort only.\nNo independent test set.",
    )
    today = timezone.localdate()
    TrainingRun.objects.create(
        cohort=cohort,
        signed_from=today,
        signed_to=today,
        created_by=admin,
        state="succeeded",
        model_version=candidate,
        n_cases=20,
    )
    deployment = ShadowDeployment.objects.create(
        cohort=cohort,
        candidate=candidate,
        baseline=baseline,
        min_signed=n_cases,
        started_by=admin,
    )
    cases = []
    for i in range(n_cases):
        case = make_case(cohort, f"S-{i:03d}")
        slide = case.slides.get()
        truth = CLASSES[i % 2]
        make_prediction(slide, baseline, truth if i else CLASSES[1 - i % 2], 0.8)
        ShadowPrediction.objects.create(
            deployment=deployment,
            slide=slide,
            model_version=candidate,
            state="succeeded",
            probabilities={truth: 0.9},
            predicted_class=truth,
            confidence=0.9,
        )
        sign(case, pathologist, truth)
        cases.append(case)
    candidate.refresh_from_db()
    return {"baseline": baseline, "candidate": candidate, "deployment": deployment, "cases": cases}
