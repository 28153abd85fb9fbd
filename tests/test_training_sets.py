"""Training sets from sign-offs: what goes in, what stays out, and bad input refused with one
clear sentence while nothing changes (no run, no model version, no files)."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.utils import timezone

from tests.model_cohort import FAST_TRAINING, make_case_with_slide, sign
from tests.portal_fixtures import make_case, make_prediction

pytestmark = pytest.mark.django_db


def _signed(
    cohort, model, pathologist, accession: str, patient: str, call: str, *, real=False, mpp=2.0
):
    if real:
        seed = sum(map(ord, accession))
        case = make_case_with_slide(cohort, accession, patient, call, seed=seed, mpp=mpp)
    else:
        case = make_case(cohort, accession)
        type(case).objects.filter(pk=case.pk).update(patient_id=patient)
        case.refresh_from_db()
    make_prediction(case.slides.get(), model, "tumor" if model.classes[1] == "tumor" else call)
    return sign(case, pathologist, call)


def _start(client, cohort, options=None):
    today = timezone.localdate().isoformat()
    return client.post(
        "/api/v1/training-runs/",
        {"cohort": cohort.pk, "signed_from": today, "signed_to": today, "options": options or {}},
        format="json",
    )


def _nothing_changed():
    from portal.analyses.models import ModelVersion, TrainingRun
    from portal.reviews.models import AuditEvent

    assert not TrainingRun.objects.exists()
    assert not ModelVersion.objects.exclude(name="gltrans-demo").exists()
    assert not AuditEvent.objects.filter(action__startswith="model.train").exists()


def test_one_class_only_is_refused(api_client_for, admin_user, path_a, cohort_a, model_version):
    for i in range(12):
        _signed(cohort_a, model_version, path_a, f"A-{i}", f"P{i}", "normal")
    response = _start(api_client_for(admin_user), cohort_a)
    assert response.status_code == 400
    assert "called 'normal'" in response.json()["detail"]
    assert "at least two classes" in response.json()["detail"]
    _nothing_changed()


def test_fewer_than_ten_patients_is_refused(
    api_client_for, admin_user, path_a, cohort_a, model_version
):
    for i in range(12):  # 12 cases but only 6 patients
        _signed(cohort_a, model_version, path_a, f"A-{i}", f"P{i % 6}", ["normal", "tumor"][i % 2])
    response = _start(api_client_for(admin_user), cohort_a)
    assert response.status_code == 400
    assert "has 6 patients" in response.json()["detail"]
    assert "at least 10" in response.json()["detail"]
    _nothing_changed()


def test_a_patient_with_conflicting_calls_is_refused(
    api_client_for, admin_user, path_a, cohort_a, model_version
):
    for i in range(12):
        _signed(cohort_a, model_version, path_a, f"A-{i}", f"P{i}", ["normal", "tumor"][i % 2])
    _signed(cohort_a, model_version, path_a, "A-X", "P1", "normal")  # P1 is "tumor" in A-1
    response = _start(api_client_for(admin_user), cohort_a)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "patient P1 has conflicting calls" in detail and "A-1" in detail and "A-X" in detail
    _nothing_changed()


def test_only_admins_start_training(api_client_for, path_a, cohort_a):
    assert _start(api_client_for(path_a), cohort_a).status_code == 403
    _nothing_changed()


def test_withdrawn_and_unreviewed_calls_stay_out(path_a, cohort_a, model_version):
    from portal.analyses.trainingset import TrainingSetError, collect
    from portal.reviews import signing

    for i in range(10):
        _signed(cohort_a, model_version, path_a, f"A-{i}", f"P{i}", ["normal", "tumor"][i % 2])
    first = _signed(cohort_a, model_version, path_a, "A-W", "PW", "tumor")
    signing.amend(first, path_a, "withdrawn", {"call": ""})
    sign(make_case(cohort_a, "A-U"), path_a, "normal")  # signed with no AI call on the case
    amended = _signed(cohort_a, model_version, path_a, "A-M", "PM", "tumor")
    signing.amend(amended, path_a, "re-read", {"call": "normal"})
    today = timezone.localdate()
    training_set = collect(cohort_a, today, today, check_files=False)
    assert training_set.excluded["withdrawn"] == ["A-W"]
    assert training_set.excluded["ai_not_reviewed"] == ["A-U"]
    labels = {c.accession_number: c.label for c in training_set.cases}
    assert labels["A-M"] == "normal"  # the current version's call
    assert len(labels) == 11
    with pytest.raises(TrainingSetError, match="no usable signed cases"):
        last_year = today.replace(year=today.year - 1)
        collect(cohort_a, last_year, last_year, check_files=False)


def test_a_slide_file_changed_since_upload_fails_the_run_and_leaves_nothing(
    api_client_for,
    admin_user,
    path_a,
    cohort_a,
    tmp_path,
    settings,
    django_capture_on_commit_callbacks,
):
    from portal.analyses.models import ModelVersion, TrainingRun
    from tests.model_cohort import CLASSES

    settings.SLIDE_DIR = tmp_path / "slides"
    settings.DATA_DIR = tmp_path / "data"
    settings.BUNDLE_DIR = tmp_path / "bundles"
    model = ModelVersion.objects.create(
        name="shown", version="1", task="t", classes=CLASSES, magnification=5.0, sha256="1" * 64
    )
    diagnoses = [
        _signed(cohort_a, model, path_a, f"R-{i}", f"P{i}", CLASSES[i % 2], real=True)
        for i in range(10)
    ]
    slide = diagnoses[3].case.slides.get()
    data = bytearray(Path(slide.path).read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    Path(slide.path).write_bytes(bytes(data))

    with django_capture_on_commit_callbacks(execute=True):
        response = _start(api_client_for(admin_user), cohort_a, FAST_TRAINING)
    assert response.status_code == 202
    run = TrainingRun.objects.get()
    assert run.state == "failed"
    assert f"slide {slide.pk} (case R-3) does not match the SHA-256" in run.error
    assert not ModelVersion.objects.exclude(pk=model.pk).exists()
    assert not (tmp_path / "data" / "training" / f"run-{run.pk}").exists()
    assert not (tmp_path / "bundles").exists() or not any((tmp_path / "bundles").iterdir())


def test_maga_on_5x_only_slides_fails_the_run_with_the_reason(
    api_client_for,
    admin_user,
    path_a,
    cohort_a,
    tmp_path,
    settings,
    django_capture_on_commit_callbacks,
):
    from portal.analyses.models import ModelVersion, TrainingRun
    from tests.model_cohort import CLASSES

    settings.SLIDE_DIR = tmp_path / "slides"
    settings.DATA_DIR = tmp_path / "data"
    settings.BUNDLE_DIR = tmp_path / "bundles"
    model = ModelVersion.objects.create(
        name="shown", version="1", task="t", classes=CLASSES, magnification=5.0, sha256="1" * 64
    )
    for i in range(10):
        _signed(cohort_a, model, path_a, f"R-{i}", f"P{i}", CLASSES[i % 2], real=True)
    with django_capture_on_commit_callbacks(execute=True):
        response = _start(
            api_client_for(admin_user),
            cohort_a,
            {**FAST_TRAINING, "maga": True, "encoder": "vit_tiny"},
        )
    assert response.status_code == 202
    run = TrainingRun.objects.get()
    assert run.state == "failed" and "cannot read at 20x" in run.error, run.error
    assert not ModelVersion.objects.exclude(pk=model.pk).exists()


def test_training_and_shadow_runs_go_to_the_gpu_queue():
    from portal.analyses.shadow import run_shadow
    from portal.analyses.training import run_training
    from portal.celery import app

    for task in (run_training, run_shadow):
        assert task.name in app.tasks  # registered where workers look (app ready)
        route = app.amqp.router.route({}, task.name, args=(1,), kwargs={})
        assert route["queue"].name == "gpu"


def test_build_training_set_writes_what_crossval_reads(path_a, cohort_a, tmp_path, settings):
    from django.core.management import CommandError, call_command

    from analysis.commands.crossval import load_bags
    from portal.analyses.models import ModelVersion
    from tests.model_cohort import CLASSES

    settings.SLIDE_DIR = tmp_path / "slides"
    model = ModelVersion.objects.create(
        name="shown", version="1", task="t", classes=CLASSES, magnification=5.0, sha256="1" * 64
    )
    for i in range(11):  # P0 has two cases
        _signed(cohort_a, model, path_a, f"R-{i}", f"P{i % 10}", CLASSES[i % 10 % 2], real=True)
    today = timezone.localdate().isoformat()
    out = tmp_path / "set"
    args = [cohort_a.slug, "--from", today, "--to", today, "--out", str(out)]
    call_command("build_training_set", *args, "--encoder", "vit_tiny")
    bags, classes = load_bags(out / "features", out / "labels.csv")
    assert classes == CLASSES and len(bags) == 11
    assert len({b.patient_id for b in bags}) == 10
    with pytest.raises(CommandError, match="not empty"):
        call_command("build_training_set", *args)
    with pytest.raises(CommandError, match="has 0 patients|no usable signed cases"):
        call_command(
            "build_training_set",
            cohort_a.slug,
            "--from",
            "2001-01-01",
            "--to",
            "2001-01-02",
            "--out",
            str(tmp_path / "other"),
        )
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_maga_on_20x_slides_aligns_the_encoder_and_records_it(
    api_client_for,
    admin_user,
    path_a,
    cohort_a,
    tmp_path,
    settings,
    django_capture_on_commit_callbacks,
):
    from portal.analyses.models import ModelVersion, TrainingRun
    from tests.model_cohort import CLASSES

    settings.SLIDE_DIR = tmp_path / "slides"
    settings.DATA_DIR = tmp_path / "data"
    settings.BUNDLE_DIR = tmp_path / "bundles"
    model = ModelVersion.objects.create(
        name="shown", version="1", task="t", classes=CLASSES, magnification=5.0, sha256="1" * 64
    )
    for i in range(10):
        _signed(cohort_a, model, path_a, f"M-{i}", f"P{i}", CLASSES[i % 2], real=True, mpp=0.5)
    options = {**FAST_TRAINING, "maga": True, "maga_epochs": 1, "maga_pairs_per_slide": 8}
    with django_capture_on_commit_callbacks(execute=True):
        response = _start(api_client_for(admin_user), cohort_a, {**options, "encoder": "vit_tiny"})
    assert response.status_code == 202
    run = TrainingRun.objects.get()
    assert run.state == "succeeded", run.error
    provenance = run.model_version.report["provenance"]
    assert provenance["maga"]["epochs"] == 1 and provenance["encoder"] == "vit_tiny"
    assert provenance["encoder_weights"].endswith(".safetensors")
    assert run.model_version.manifest["encoder"]["weights"] == "encoder.safetensors"
