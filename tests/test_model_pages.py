"""Model card and shadow comparison pages: who sees what (admins, the cohort's pathologists,
other cohorts: 404), one-click activation and rollback from the page."""

from __future__ import annotations

import pytest

from tests.model_cohort import compared_cohort

pytestmark = pytest.mark.django_db


@pytest.fixture
def compared(cohort_a, admin_user, path_a, tmp_path):
    return compared_cohort(cohort_a, admin_user, path_a, tmp_path)


def _client(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client


def test_the_model_card_shows_the_report_to_admins_and_the_cohorts_pathologists(
    compared, admin_user, path_a, path_b
):
    candidate = compared["candidate"]
    url = f"/models/{candidate.pk}/"
    admin_page = _client(admin_user).get(url).content.decode()
    auc = f"{candidate.report['auc_pooled']:.3f}"
    assert auc in admin_page and 'id="confusion-matrix"' in admin_page
    assert 'id="activate-form"' in admin_page and "One cohort only." in admin_page
    path_page = _client(path_a).get(url)
    assert path_page.status_code == 200
    assert (
        auc in path_page.content.decode() and 'id="activate-form"' not in path_page.content.decode()
    )
    png = _client(path_a).get(f"/models/{candidate.pk}/report/roc.png")
    assert png.status_code == 200 and b"".join(png.streaming_content)[:4] == b"\x89PNG"
    assert _client(path_b).get(url).status_code == 404
    assert _client(path_b).get(f"/models/{candidate.pk}/report/roc.png").status_code == 404


def test_the_shadow_comparison_is_for_admins_only(compared, admin_user, path_a, path_b, cohort_a):
    from portal.reviews.models import AuditEvent

    url = f"/cohorts/{cohort_a.pk}/shadow/"
    page = _client(admin_user).get(url).content.decode()
    assert 'id="agreement"' in page and "0.750" in page and "1.000" in page
    assert "p = 1.000" in page  # one discordant case: exact McNemar p = 1
    assert AuditEvent.objects.filter(action="model.shadow.compare").count() == 1
    assert _client(path_a).get(url).status_code == 403
    assert _client(path_b).get(url).status_code == 404


def test_one_click_activation_and_rollback_from_the_pages(compared, admin_user, path_a, cohort_a):
    from portal.reviews.models import AuditEvent

    candidate, baseline = compared["candidate"], compared["baseline"]
    activate_url = f"/models/{candidate.pk}/activate/"
    body = {"cohort": cohort_a.pk, "reason": "better in shadow", "back": "shadow"}
    assert _client(path_a).post(activate_url, body).status_code == 403
    response = _client(admin_user).post(activate_url, body)
    assert response.status_code == 302 and response["Location"] == f"/cohorts/{cohort_a.pk}/shadow/"
    cohort_a.refresh_from_db()
    assert cohort_a.active_model == candidate
    page = _client(admin_user).get(f"/cohorts/{cohort_a.pk}/shadow/").content.decode()
    assert 'id="rollback"' in page and 'id="activate-candidate"' not in page
    _client(admin_user).post(f"/cohorts/{cohort_a.pk}/rollback/", {"reason": "rash"})
    cohort_a.refresh_from_db()
    assert cohort_a.active_model == baseline
    assert AuditEvent.objects.filter(action="model.rollback", actor=admin_user).exists()


def test_activation_without_a_reason_changes_nothing(compared, admin_user, cohort_a):
    candidate, baseline = compared["candidate"], compared["baseline"]
    client = _client(admin_user)
    response = client.post(
        f"/models/{candidate.pk}/activate/", {"cohort": cohort_a.pk}, follow=True
    )
    assert "a reason is required" in response.content.decode()
    cohort_a.refresh_from_db()
    assert cohort_a.active_model == baseline


def test_the_training_page_refuses_bad_input_and_is_for_admins(
    admin_user, path_a, path_b, cohort_a, model_version
):
    from django.utils import timezone

    from portal.analyses.models import TrainingRun
    from tests.model_cohort import sign
    from tests.portal_fixtures import make_case, make_prediction

    for i in range(3):
        case = make_case(cohort_a, f"A-{i}")
        make_prediction(case.slides.get(), model_version)
        sign(case, path_a, "tumor")
    url = f"/cohorts/{cohort_a.pk}/training/"
    today = timezone.localdate().isoformat()
    page = (
        _client(admin_user)
        .post(url, {"signed_from": today, "signed_to": today}, follow=True)
        .content.decode()
    )
    assert "is called &#x27;tumor&#x27;; a model needs at least two classes" in page
    assert not TrainingRun.objects.exists()
    page = _client(admin_user).post(url, {"signed_from": "yesterday"}, follow=True)
    assert "YYYY-MM-DD" in page.content.decode()
    assert _client(path_a).get(url).status_code == 403
    assert _client(path_b).get(url).status_code == 404


def test_a_demo_models_card_says_not_for_diagnosis(admin_user, model_version):
    page = _client(admin_user).get(f"/models/{model_version.pk}/").content.decode()
    assert "Demo model, not for diagnosis." in page
    assert "cannot be activated: its weights are missing" in page
