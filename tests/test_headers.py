"""What every answer carries: a CSP on pages, no-store on patient data, FHIR's media type, and
no server paths."""

from __future__ import annotations

import json

import pytest

from portal.reviews.models import Diagnosis


@pytest.mark.parametrize("url", ["/login/", "/", "/api/v1/cases/", "/healthz"])
def test_every_answer_has_a_content_security_policy(client, path_a, url):
    client.force_login(path_a)
    response = client.get(url)
    policy = response["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy and "unsafe-eval" not in policy


def test_case_page_has_a_content_security_policy(client, path_a, case_a):
    client.force_login(path_a)
    response = client.get(f"/cases/{case_a.pk}/")
    assert response.status_code == 200
    policy = response["Content-Security-Policy"]
    assert "unsafe-eval" not in policy  # the bundled annotation layer compiles without eval
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy


def test_api_answers_with_patient_data_are_not_stored(api_client_for, path_a, case_a):
    client = api_client_for(path_a)
    for url in ("/api/v1/cases/", f"/api/v1/cases/{case_a.pk}/", "/api/v1/worklist/"):
        assert client.get(url)["Cache-Control"] == "no-store", url


def test_fhir_report_answers_application_fhir_json(api_client_for, path_a, case_a):
    from portal.reviews import signing

    signing.sign(Diagnosis.objects.create(case=case_a, author=path_a, call="tumor"), path_a)
    client = api_client_for(path_a)
    response = client.get(f"/api/v1/cases/{case_a.pk}/fhir/", HTTP_ACCEPT="application/fhir+json")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/fhir+json")
    assert json.loads(response.content)["resourceType"] == "DiagnosticReport"
    plain = client.get(f"/api/v1/cases/{case_a.pk}/fhir/", HTTP_ACCEPT="application/json")
    assert plain["Content-Type"].startswith("application/json")


def test_no_server_paths_in_model_or_job_answers(api_client_for, path_a, slide_a, model_version):
    from portal.analyses.models import AnalysisJob

    job = AnalysisJob.objects.create(
        slide=slide_a,
        model_version=model_version,
        idempotency_key="k-paths",
        state="failed",
        error="/srv/lowmag/slides/7/A-001.tiff: the slide could not be read",
    )
    client = api_client_for(path_a)
    models = client.get("/api/v1/models/").content.decode()
    assert model_version.bundle_path not in models and "bundle_path" not in models
    shown = client.get(f"/api/v1/jobs/{job.pk}/").json()["error"]
    assert shown == "A-001.tiff: the slide could not be read"


def test_second_opinion_assignee_does_not_reveal_which_user_ids_exist(
    api_client_for, path_a, path_b, case_a
):
    client = api_client_for(path_a)
    answers = [
        client.post(
            "/api/v1/second-opinions/",
            {"case": case_a.pk, "reason": "look", "assigned_to": user_id},
            format="json",
        )
        for user_id in (path_b.pk, 987654)  # another cohort's pathologist; nobody
    ]
    assert [a.status_code for a in answers] == [400, 400]
    assert answers[0].json() == answers[1].json()
