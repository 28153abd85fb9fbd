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
    "folds": 4,
    "epochs": 3,
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


def write_slide_file(slide_dir: Path, name: str, label: str, seed: int) -> Path:
    from analysis.synth import write_synthetic_slide

    path = slide_dir / name / f"{name}.svs"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_slide(
        path, width=512, height=512, seed=seed, label=int(label == "lesion"), mpp=2.0, workers=1
    )
    return path


def make_case_with_slide(
    cohort, accession: str, patient: str, label: str, seed: int, *, status: str = "ready"
):
    """A case with one real synthetic slide file (``status`` "ingesting": not yet ingested)."""
    from django.conf import settings

    from portal.cases.models import Case, Slide

    path = write_slide_file(Path(settings.SLIDE_DIR), accession, label, seed)
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
        width=512,
        height=512,
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
