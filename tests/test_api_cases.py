"""Cases, worklist, models, second opinions, session login and the API's error behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from django.test import Client

from portal.analyses.models import Prediction
from portal.cases.models import Case
from tests.portal_fixtures import PASSWORD, make_case, make_user

pytestmark = pytest.mark.django_db


def test_an_integration_creates_cases_in_its_cohort(api_client_for, integration_token_a, cohort_a):
    client = api_client_for(token=integration_token_a)
    body = {
        "cohort": cohort_a.pk,
        "patient_id": "P77",
        "accession_number": "S26-0077",
        "priority": "urgent",
    }
    response = client.post("/api/v1/cases/", body, format="json")
    assert response.status_code == 201, response.content
    case = Case.objects.get(pk=response.json()["id"])
    assert (case.created_by.username, case.status, case.priority) == ("lis_a", "new", "urgent")
    duplicate = client.post("/api/v1/cases/", body, format="json")
    assert duplicate.status_code == 400


def test_an_integration_cannot_create_cases_in_another_cohort(
    api_client_for, integration_token_a, cohort_b
):
    body = {"cohort": cohort_b.pk, "patient_id": "P1", "accession_number": "X-1"}
    response = api_client_for(token=integration_token_a).post("/api/v1/cases/", body, format="json")
    assert response.status_code == 400
    assert "does not exist" in str(response.json()["cohort"])


def test_cases_filter_search_order_and_paginate(api_client_for, admin_user, cohort_a, cohort_b):
    for i, priority in enumerate(["routine", "urgent", "frozen"]):
        case = make_case(cohort_a, f"A-10{i}")
        Case.objects.filter(pk=case.pk).update(priority=priority)
    make_case(cohort_b, "B-100")
    client = api_client_for(admin_user)

    def accessions(query):
        response = client.get(f"/api/v1/cases/?{query}")
        assert response.status_code == 200, response.content
        return [c["accession_number"] for c in response.json()["results"]]

    assert accessions(f"cohort={cohort_b.pk}") == ["B-100"]
    assert accessions("priority=urgent") == ["A-101"]
    assert accessions("search=A-102") == ["A-102"]
    assert accessions("ordering=accession_number") == ["A-100", "A-101", "A-102", "B-100"]
    page = client.get("/api/v1/cases/?page_size=2&ordering=accession_number").json()
    assert (page["count"], len(page["results"])) == (4, 2) and page["next"]


@pytest.mark.parametrize(
    "query",
    ["status=bogus", "cohort=abc", "cohort=-1", "priority=asap", "cohort=99999999999999999999999"],
)
def test_a_bad_filter_value_is_a_400_naming_the_parameter(api_client_for, admin_user, query):
    response = api_client_for(admin_user).get(f"/api/v1/cases/?{query}")
    assert response.status_code == 400
    assert query.split("=")[0] in response.json()


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/cases/99999999999999999999999/",
        "/api/v1/cases/abc/",
        "/api/v1/diagnoses/-1/",
        "/api/v1/cases/?page=999",
    ],
)
def test_odd_ids_and_pages_are_404_json(api_client_for, admin_user, url):
    response = api_client_for(admin_user).get(url)
    assert response.status_code == 404
    assert "detail" in response.json()


def test_malformed_json_is_a_400_with_a_message(api_client_for, admin_user):
    response = api_client_for(admin_user).generic(
        "POST", "/api/v1/cases/", "{not json", content_type="application/json"
    )
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]


def test_the_worklist_puts_frozen_then_urgent_first(api_client_for, path_a, cohort_a):
    for accession, priority in [("R", "routine"), ("U", "urgent"), ("F", "frozen")]:
        Case.objects.filter(pk=make_case(cohort_a, accession).pk).update(priority=priority)
    Case.objects.filter(accession_number="R").update(status="signed")
    cases = api_client_for(path_a).get("/api/v1/worklist/?queue=unsigned").json()["results"]
    assert [c["accession_number"] for c in cases] == ["F", "U"]


def test_my_queue_holds_my_drafts_and_second_opinions_assigned_to_me(
    api_client_for, path_a, cohort_a, case_a
):
    colleague = make_user("colleague", cohort=cohort_a)
    other = make_case(cohort_a, "A-050")
    client = api_client_for(path_a)
    client.post("/api/v1/diagnoses/", {"case": case_a.pk}, format="json")
    opinion = api_client_for(colleague).post(
        "/api/v1/second-opinions/",
        {"case": other.pk, "reason": "margins?", "assigned_to": path_a.pk},
        format="json",
    )
    assert opinion.status_code == 201, opinion.content
    mine = client.get("/api/v1/worklist/?queue=mine").json()["results"]
    assert sorted(c["accession_number"] for c in mine) == ["A-001", "A-050"]
    closed = client.post(f"/api/v1/second-opinions/{opinion.json()['id']}/close/")
    assert closed.json()["status"] == "closed"
    mine = client.get("/api/v1/worklist/?queue=mine").json()["results"]
    assert [c["accession_number"] for c in mine] == ["A-001"]


def test_an_unknown_queue_is_a_400(api_client_for, path_a):
    assert api_client_for(path_a).get("/api/v1/worklist/?queue=later").status_code == 400


def test_a_second_opinion_goes_to_a_pathologist_of_the_cohort(
    api_client_for, path_a, path_b, case_a
):
    response = api_client_for(path_a).post(
        "/api/v1/second-opinions/",
        {"case": case_a.pk, "reason": "?", "assigned_to": path_b.pk},
        format="json",
    )
    assert response.status_code == 400
    assert "assigned_to" in response.json()


def test_admin_cannot_activate_a_model_without_weights(
    api_client_for, admin_user, model_version, cohort_a
):
    """The fixture version has no weights file; activation with real bundles:
    tests/test_model_guards.py."""
    response = api_client_for(admin_user).post(
        f"/api/v1/models/{model_version.pk}/activate/",
        {"cohort": cohort_a.pk, "reason": "try"},
        format="json",
    )
    assert response.status_code == 409 and "weights are missing" in response.json()["detail"]
    cohort_a.refresh_from_db()
    assert cohort_a.active_model is None


def test_prediction_scores_come_back_in_grid_order(api_client_for, path_a, prediction_a):
    body = api_client_for(path_a).get(f"/api/v1/predictions/{prediction_a.pk}/scores/").json()
    assert body["grid"]["n_rows"] == 3 and len(body["scores"]) == 12
    assert body["scores"][0] == 0.0 and body["scores"][-1] == 1.0


def test_prediction_scores_give_attention_and_class_evidence(api_client_for, path_a, prediction_a):
    evidence = np.linspace(-2, 3, 12)
    prediction_a.evidence_scores = Prediction.pack_scores(evidence)
    prediction_a.evidence_class = "tumor"
    prediction_a.save()
    body = api_client_for(path_a).get(f"/api/v1/predictions/{prediction_a.pk}/scores/").json()
    stored = prediction_a.evidence()  # float16, as the heatmap's evidence layer reads it
    assert body["evidence"] == [round(float(v), 4) for v in stored]
    assert body["evidence"][0] == -2.0 and body["evidence"][-1] == 3.0
    assert body["evidence_class"] == "tumor"
    assert body["attention"] == body["scores"]  # ``scores``: attention, for older clients
    assert body["attention"] == [round(float(v), 4) for v in prediction_a.scores()]


def test_a_prediction_without_class_evidence_answers_null(api_client_for, path_a, prediction_a):
    response = api_client_for(path_a).get(f"/api/v1/predictions/{prediction_a.pk}/scores/")
    assert response.status_code == 200
    body = response.json()
    assert body["evidence"] is None and body["evidence_class"] is None
    assert len(body["attention"]) == 12


def test_prediction_scores_of_another_cohort_answer_404(api_client_for, path_b, prediction_a):
    prediction_a.evidence_scores = Prediction.pack_scores(np.ones(12))
    prediction_a.evidence_class = "tumor"
    prediction_a.save()
    response = api_client_for(path_b).get(f"/api/v1/predictions/{prediction_a.pk}/scores/")
    assert response.status_code == 404 and "evidence" not in response.json()


def test_the_schema_documents_attention_and_evidence(api_client_for, admin_user):
    schema = api_client_for(admin_user).get("/api/schema/?format=json").json()
    scores = schema["components"]["schemas"]["PredictionScores"]
    fields = set(scores["properties"])
    assert {"grid", "attention", "evidence", "evidence_class", "scores"} <= fields
    assert scores["properties"]["evidence"]["nullable"] is True
    assert scores["properties"]["scores"].get("deprecated") is True


def test_session_login_then_csrf_protected_writes(path_a, case_a):
    browser = Client(enforce_csrf_checks=True)
    browser.get("/api/v1/auth/login")  # the CSRF cookie the login itself needs
    login = browser.post(
        "/api/v1/auth/login",
        {"username": "path_a", "password": PASSWORD},
        "application/json",
        HTTP_X_CSRFTOKEN=browser.cookies["csrftoken"].value,
    )
    assert login.status_code == 200
    assert login.json()["memberships"][0]["role"] == "pathologist"
    body = {"case": case_a.pk, "call": "tumor"}
    refused = browser.post("/api/v1/diagnoses/", body, "application/json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    token = browser.cookies["csrftoken"].value
    accepted = browser.post("/api/v1/diagnoses/", body, "application/json", HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 201
    assert browser.get("/api/v1/auth/me").json()["username"] == "path_a"
    browser.post("/api/v1/auth/logout", HTTP_X_CSRFTOKEN=browser.cookies["csrftoken"].value)
    assert browser.get("/api/v1/auth/me").status_code == 401


def test_a_wrong_password_does_not_log_in(client, path_a):
    response = client.post(
        "/api/v1/auth/login", {"username": "path_a", "password": "guess"}, "application/json"
    )
    assert response.status_code == 400
    assert client.get("/api/v1/auth/me").status_code == 401


def test_swagger_ui_loads_its_assets_from_the_portal(api_client_for, admin_user):
    client = api_client_for(admin_user)
    page = client.get("/api/docs/").content.decode()
    assert "/api/docs/assets/swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower()
    asset = client.get("/api/docs/assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and asset["Content-Type"].endswith("javascript")
    assert client.get("/api/docs/assets/..%2fsettings.py").status_code == 404


def test_the_openapi_schema_lists_the_api(api_client_for, admin_user):
    schema = api_client_for(admin_user).get("/api/schema/?format=json").json()
    for path in ["/api/v1/cases/{id}/fhir/", "/api/v1/diagnoses/{id}/sign/", "/api/v1/worklist/"]:
        assert path in schema["paths"]
    assert "tokenAuth" in schema["components"]["securitySchemes"]
