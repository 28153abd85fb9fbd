"""Management commands: import_cohort, register_model, create_user."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from portal.analyses.models import ModelVersion
from portal.cases.models import Case, Cohort, Membership, Slide

pytestmark = pytest.mark.django_db


@pytest.fixture
def slide_folder(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for name in ["P001-S1.svs", "P001-S2.svs", "P002-S1.tiff"]:
        (folder / name).write_bytes(name.encode() * 10)
    labels = folder / "labels.csv"
    labels.write_text("patient_id,slide_id,label\nP001,P001-S1,1\nP001,P001-S2,1\nP002,P002-S1,0\n")
    return folder, labels


def test_import_cohort_creates_cases_per_patient_and_links_slides(slide_folder, storage):
    folder, labels = slide_folder
    out = StringIO()
    call_command(
        "import_cohort", str(folder), "--labels", str(labels), "--cohort", "Lung 2026", stdout=out
    )
    cohort = Cohort.objects.get(name="Lung 2026")
    assert cohort.slug == "lung-2026"
    assert sorted(Case.objects.values_list("patient_id", flat=True)) == ["P001", "P002"]
    slide = Slide.objects.get(original_name="P002-S1.tiff")
    assert len(slide.sha256) == 64
    # these files are not slides: ingest marks them failed with a reason and keeps the file
    assert slide.status == "failed" and slide.failure_reason.startswith("P002-S1.tiff:")
    assert slide.path.read_bytes() == (folder / "P002-S1.tiff").read_bytes()
    call_command(
        "import_cohort", str(folder), "--labels", str(labels), "--cohort", "Lung 2026", stdout=out
    )
    assert Slide.objects.count() == 3  # re-running imports nothing twice
    assert "0 slides imported, 3 already present" in out.getvalue()


def test_import_cohort_ingests_each_slide(slide_folder, storage, monkeypatch):
    def ingest_slide(slide):
        slide.status = "ready"
        slide.save()
        return slide

    monkeypatch.setattr(
        "portal.uploads.management.commands.import_cohort.ingest_slide", ingest_slide
    )
    folder, labels = slide_folder
    call_command(
        "import_cohort", str(folder), "--labels", str(labels), "--cohort", "C", stdout=StringIO()
    )
    assert set(Slide.objects.values_list("status", flat=True)) == {"ready"}


def test_import_cohort_names_a_missing_slide(slide_folder, storage):
    folder, labels = slide_folder
    (folder / "P002-S1.tiff").unlink()
    with pytest.raises(CommandError, match="P002-S1"):
        call_command("import_cohort", str(folder), "--labels", str(labels), "--cohort", "C")


def _bundle(path, **overrides):
    path.mkdir()
    (path / "mil.safetensors").write_bytes(b"weights-mil")
    manifest = {
        "name": "gltrans",
        "version": "2.0",
        "task": "lesion-detection",
        "classes": ["normal", "tumor"],
        "magnification": 5.0,
        "encoder": {"name": "resnet50-trunc"},
        "mil": {"name": "gltrans", "weights": "mil.safetensors"},
        **overrides,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_register_model_records_checksums_and_activates_for_a_cohort(tmp_path, settings, cohort_a):
    settings.BUNDLE_DIR = tmp_path / "bundles"
    bundle = _bundle(tmp_path / "b")
    call_command(
        "register_model", str(bundle), "--activate", "--cohort", "Cohort A", stdout=StringIO()
    )
    model = ModelVersion.objects.get()
    assert (model.name, model.version, model.classes, model.active) == (
        "gltrans",
        "2.0",
        ["normal", "tumor"],
        True,
    )
    assert len(model.sha256) == 64
    assert (tmp_path / "bundles" / "gltrans-2.0" / "manifest.json").is_file()
    cohort_a.refresh_from_db()
    assert cohort_a.active_model == model
    call_command("register_model", str(bundle), stdout=StringIO())  # same weights: a no-op
    assert ModelVersion.objects.count() == 1


def test_register_model_refuses_changed_weights_under_the_same_version(tmp_path, settings, db):
    settings.BUNDLE_DIR = tmp_path / "bundles"
    bundle = _bundle(tmp_path / "b")
    call_command("register_model", str(bundle), stdout=StringIO())
    (bundle / "mil.safetensors").write_bytes(b"other weights")
    with pytest.raises(CommandError, match="different weights"):
        call_command("register_model", str(bundle))


def test_register_model_explains_a_bad_manifest(tmp_path, settings, db):
    settings.BUNDLE_DIR = tmp_path / "bundles"
    bundle = _bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["classes"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CommandError, match="classes"):
        call_command("register_model", str(bundle))


def test_create_user_gives_roles_and_memberships(cohort_a, cohort_b):
    call_command(
        "create_user",
        "dr_x",
        "--role",
        "pathologist",
        "--cohort",
        "cohort-a",
        "--cohort",
        "Cohort B",
        "--password",
        "a-long-enough-password",
        stdout=StringIO(),
    )
    memberships = Membership.objects.filter(user__username="dr_x")
    assert sorted(m.cohort.slug for m in memberships) == ["cohort-a", "cohort-b"]
    call_command(
        "create_user", "lis", "--role", "integration", "--cohort", "cohort-a", stdout=StringIO()
    )
    lis = Membership.objects.get(user__username="lis")
    assert lis.role == "integration" and not lis.user.has_usable_password()
    with pytest.raises(CommandError, match="at least one cohort"):
        call_command("create_user", "dr_y", "--role", "pathologist", "--password", "x" * 12)
