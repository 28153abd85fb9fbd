"""The whole loop on a synthetic cohort: sign 40 cases, build the training set, train through
the job, read the report, run the new model in shadow on 10 new cases, compare, activate, roll
back. Every step leaves an audit event; no shadow result reaches a pathologist."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from django.utils import timezone

from tests.model_cohort import FAST_TRAINING, make_case_with_slide, make_vit_bundle, sign
from tests.portal_fixtures import make_prediction

pytestmark = pytest.mark.django_db

N_CASES = 40


@pytest.fixture
def lab(tmp_path, settings, cohort_a, admin_user):
    """Cohort A with a registered, activated baseline model; files under ``tmp_path``."""
    from portal.analyses.lifecycle import activate
    from portal.analyses.models import ModelVersion

    settings.SLIDE_DIR = tmp_path / "slides"
    settings.BUNDLE_DIR = tmp_path / "bundles"
    settings.DATA_DIR = tmp_path / "data"
    call_command("register_model", str(make_vit_bundle(tmp_path / "baseline-src")))
    baseline = ModelVersion.objects.get(name="baseline")
    activate(baseline, cohort_a, admin_user, "first model of the cohort")
    return baseline


def _label(patient: int) -> str:
    return "lesion" if patient % 2 else "normal"


def signed_cohort(cohort, baseline, pathologist, n_cases: int = N_CASES) -> list:
    """``n_cases`` signed cases (6 patients have two), each reviewed with an AI call."""
    rng = np.random.default_rng(3)
    n_patients = n_cases - 6
    cases = []
    for i in range(n_cases):
        patient = i % n_patients
        case = make_case_with_slide(
            cohort, f"T-{i:03d}", f"P{patient:03d}", _label(patient), seed=100 + i
        )
        shown = _label(patient) if rng.random() < 0.7 else _label(patient + 1)
        make_prediction(case.slides.get(), baseline, shown, float(rng.uniform(0.55, 0.95)))
        sign(case, pathologist, _label(patient))
        cases.append(case)
    return cases


def test_train_validate_shadow_activate_and_roll_back(
    lab,
    cohort_a,
    admin_user,
    path_a,
    api_client_for,
    django_capture_on_commit_callbacks,
    monkeypatch,
):
    from analysis.metrics import auc_score
    from portal.analyses.models import ModelVersion, Prediction, ShadowPrediction, TrainingRun
    from portal.cases.models import Slide
    from portal.integrations import webhooks
    from portal.integrations.models import Webhook, WebhookDelivery
    from portal.reviews import signing
    from portal.reviews.models import AuditEvent
    from portal.uploads.ingest import ingest_and_analyse

    baseline = lab
    admin, pathologist = api_client_for(admin_user), api_client_for(path_a)

    # 1. sign 40 cases; one more whose call is withdrawn, one signed without an AI call
    cases = signed_cohort(cohort_a, baseline, path_a)
    withdrawn = make_case_with_slide(cohort_a, "T-W", "P-W", "lesion", seed=90)
    make_prediction(withdrawn.slides.get(), baseline, "lesion", 0.8)
    first = sign(withdrawn, path_a, "lesion")
    signing.amend(first, path_a, "call withdrawn: wrong block", {"call": ""})
    unreviewed = make_case_with_slide(cohort_a, "T-U", "P-U", "normal", seed=91)
    sign(unreviewed, path_a, "normal")
    assert AuditEvent.objects.filter(action="diagnosis.sign").count() == N_CASES + 2

    # 2 + 3. build the training set and train through the job (gpu queue; here in-process)
    today = timezone.localdate().isoformat()
    with django_capture_on_commit_callbacks(execute=True):
        response = admin.post(
            "/api/v1/training-runs/",
            {
                "cohort": cohort_a.pk,
                "signed_from": today,
                "signed_to": today,
                "options": FAST_TRAINING,
            },
            format="json",
        )
    assert response.status_code == 202, response.content
    run = TrainingRun.objects.get(pk=response.json()["id"])
    assert run.state == "succeeded", run.error
    assert (run.n_cases, run.stage, run.progress) == (N_CASES, "done", 1.0)
    set_dir = Path(run.work_dir) / "set"
    with open(set_dir / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == N_CASES and len(list((set_dir / "features").glob("*.h5"))) == N_CASES
    assert {r["label"] for r in rows} == {"lesion", "normal"}
    candidate = run.model_version
    assert candidate is not None and candidate.active is False
    assert candidate.weights_problem() is None

    # 4. the report holds numbers computed from the data
    report = candidate.report
    assert report["provenance"]["excluded"]["withdrawn"] == ["T-W"]
    assert report["provenance"]["excluded"]["ai_not_reviewed"] == ["T-U"]
    assert report["provenance"]["data_sha256"] == run.data_sha256
    listed = report["cases"]
    assert sorted(c["accession_number"] for c in listed) == sorted(
        c.accession_number for c in cases
    )
    folds_of: dict[str, set[int]] = {}
    for c in listed:
        folds_of.setdefault(c["patient_id"], set()).add(c["fold"])
    assert all(len(f) == 1 for f in folds_of.values())  # patients kept whole
    assert max(len([c for c in listed if c["patient_id"] == p]) for p in folds_of) == 2
    classes = report["classes"]
    labels = np.array([classes.index(c["label"]) for c in listed])
    probs = np.array([[c["probabilities"][k] for k in classes] for c in listed])
    assert report["auc_pooled"] == pytest.approx(auc_score(labels, probs), abs=1e-5)
    low, high = report["auc_pooled_ci"]
    assert low <= report["auc_pooled"] <= high
    assert report["positive_class"] == "lesion"  # the finding, not "normal"
    pos = classes.index("lesion")
    predicted = np.where(probs[:, pos] >= report["threshold"], pos, 1 - pos)
    expected = [[int(((labels == t) & (predicted == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    assert report["confusion_matrix"] == expected and sum(map(sum, expected)) == N_CASES
    for name in ("roc.png", "calibration.png"):
        assert (Path(candidate.bundle_path) / "report" / name).read_bytes()[:4] == b"\x89PNG"

    # 5. shadow mode on 10 new cases
    response = admin.post(
        "/api/v1/shadow-deployments/",
        {"candidate": candidate.pk, "cohort": cohort_a.pk, "min_signed": 10},
        format="json",
    )
    assert response.status_code == 201, response.content
    deployment_id = response.json()["id"]
    Webhook.objects.create(
        owner=admin_user,
        cohort=cohort_a,
        url="https://lis.example.org/hook",
        events=["prediction.ready"],
    )
    monkeypatch.setattr(webhooks, "attempt_new", lambda ids: None)  # record, do not send
    new_cases = []
    for i in range(10):
        case = make_case_with_slide(
            cohort_a, f"N-{i:03d}", f"Q{i:03d}", _label(i), seed=200 + i, status="ingesting"
        )
        with django_capture_on_commit_callbacks(execute=True):
            assert ingest_and_analyse(case.slides.get().pk) == "ready"
        new_cases.append(case)
    new_slides = Slide.objects.filter(case__in=new_cases)
    shadows = ShadowPrediction.objects.filter(slide__in=new_slides, state="succeeded")
    assert shadows.count() == 10
    assert Prediction.objects.filter(slide__in=new_slides, model_version=baseline).count() == 10
    assert not Prediction.objects.filter(model_version=candidate).exists()
    # ... and never shown: API, case page, FHIR, webhooks, the sealed AI suggestion
    listed = pathologist.get("/api/v1/predictions/", {"case": new_cases[0].pk}).json()
    models = {p["model_version"] for p in listed.get("results", listed)}
    assert models == {baseline.pk}
    from django.test import Client

    browser = Client()
    browser.force_login(path_a)
    page = browser.get(f"/cases/{new_cases[0].pk}/").content.decode()
    assert str(baseline) in page or baseline.name in page
    assert candidate.version not in page
    deliveries = WebhookDelivery.objects.filter(event="prediction.ready")
    assert deliveries.count() == 10
    assert {d.payload["prediction"]["model"] for d in deliveries} == {str(baseline)}
    for case in new_cases:
        diagnosis = sign(case, path_a, _label(int(case.patient_id[1:])))
        assert diagnosis.ai_suggestion["model"] == str(baseline)
    fhir = pathologist.get(f"/api/v1/cases/{new_cases[0].pk}/fhir/").content.decode()
    assert candidate.version not in fhir

    # 6. compare (admins only)
    assert pathologist.get(f"/api/v1/shadow-deployments/{deployment_id}/").status_code == 403
    comparison = admin.get(f"/api/v1/shadow-deployments/{deployment_id}/").json()
    assert comparison["ready"] is True and comparison["n_signed"] == 10
    baseline_right = [
        Prediction.objects.get(slide__case=c, model_version=baseline).predicted_class
        == _label(int(c.patient_id[1:]))
        for c in new_cases
    ]
    candidate_right = [
        ShadowPrediction.objects.get(slide__case=c).predicted_class == _label(int(c.patient_id[1:]))
        for c in new_cases
    ]
    assert comparison["baseline"]["agreement"] == pytest.approx(np.mean(baseline_right))
    assert comparison["candidate"]["agreement"] == pytest.approx(np.mean(candidate_right))
    test = comparison["paired_test"]
    assert test["only_a_correct"] == sum(
        c and not b for c, b in zip(candidate_right, baseline_right, strict=True)
    )
    assert 0.0 <= test["p_value"] <= 1.0

    # 7. activate (one request, audited), 8. roll back
    response = admin.post(
        f"/api/v1/models/{candidate.pk}/activate/",
        {"cohort": cohort_a.pk, "reason": "agrees at least as well in shadow"},
        format="json",
    )
    assert response.status_code == 200, response.content
    cohort_a.refresh_from_db()
    assert cohort_a.active_model == candidate
    assert admin.get(f"/api/v1/shadow-deployments/{deployment_id}/").json()["active"] is False
    response = admin.post(
        "/api/v1/model-activations/rollback/",
        {"cohort": cohort_a.pk, "reason": "second opinions went up"},
        format="json",
    )
    assert response.status_code == 200, response.content
    cohort_a.refresh_from_db()
    assert cohort_a.active_model == baseline
    assert ModelVersion.objects.get(pk=candidate.pk).active is False

    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {
        "diagnosis.sign",
        "model.train.start",
        "model.train.finish",
        "model.shadow.start",
        "model.shadow.analyse",
        "model.shadow.compare",
        "model.activate",
        "model.rollback",
    } <= actions
