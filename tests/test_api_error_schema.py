"""The OpenAPI schema lists every error an operation can answer, with the body it really has."""

from __future__ import annotations

import json

import jsonschema
import pytest
from django.db import OperationalError
from rest_framework.test import APIClient

from portal.api.models import ApiToken
from portal.reviews import signing
from portal.reviews.models import Diagnosis
from tests.portal_fixtures import PASSWORD

METHODS = ("get", "post", "put", "patch", "delete")
UNVALIDATED_QUERY = {"page", "page_size", "search", "ordering", "format"}


@pytest.fixture(scope="module")
def openapi() -> dict:
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.renderers import OpenApiJsonRenderer

    rendered = OpenApiJsonRenderer().render(SchemaGenerator().get_schema(public=True))
    return json.loads(rendered)


def _operations(openapi: dict):
    for path, item in openapi["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def _error_ref(response: dict) -> str:
    return response["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]


def _signs_in(operation: dict) -> bool:
    return any(requirement for requirement in operation.get("security", []))


def _validator(openapi: dict, name: str) -> jsonschema.Draft202012Validator:
    """The component as a standalone JSON Schema (refs resolved against the document)."""
    schema = {**openapi["components"]["schemas"][name], "components": openapi["components"]}
    return jsonschema.Draft202012Validator(schema)


def test_every_operation_lists_the_errors_of_the_shared_machinery(openapi):
    missing = []
    for path, method, operation in _operations(openapi):
        expected = {"503"}
        if _signs_in(operation):
            expected |= {"401", "403"}
        if "{" in path:
            expected.add("404")
        query = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        if "requestBody" in operation or query - UNVALIDATED_QUERY:
            expected.add("400")
        absent = expected - set(operation["responses"])
        if absent:
            missing.append(f"{method.upper()} {path}: {sorted(absent)}")
    assert not missing, "operations without their error answers:\n" + "\n".join(missing)


def test_every_write_lists_the_database_refusing_it(openapi):
    # portal.api.exceptions answers 409 to an IntegrityError (or a frozen row) on any write
    writes = [(p, m, o) for p, m, o in _operations(openapi) if m != "get"]
    assert len(writes) > 20
    missing = [f"{m.upper()} {p}" for p, m, o in writes if "409" not in o["responses"]]
    assert not missing, missing
    reads = [o for _, m, o in _operations(openapi) if m == "get"]
    assert any("409" not in o["responses"] for o in reads)  # a read does not clash


def test_token_operations_list_the_wrong_token_throttle_with_retry_after(openapi):
    for path, method, operation in _operations(openapi):
        if {"tokenAuth": []} in operation.get("security", []):
            throttled = operation["responses"].get("429")
            assert throttled, f"{method.upper()} {path} has no 429"
            assert "Retry-After" in throttled["headers"], f"{method.upper()} {path}"
            assert "Retry-After" in operation["responses"]["503"]["headers"]


def test_every_error_answer_has_the_shared_error_body(openapi):
    for path, method, operation in _operations(openapi):
        for code, response in operation["responses"].items():
            if int(code) < 400:
                continue
            expected = "ValidationError" if code == "400" else "Error"
            assert _error_ref(response) == expected, f"{method.upper()} {path} {code}"
            assert response["description"], f"{method.upper()} {path} {code} says nothing"


@pytest.mark.parametrize(
    ("path", "method", "code"),
    [
        ("/api/v1/diagnoses/{id}/sign/", "post", "409"),
        ("/api/v1/diagnoses/{id}/sign/", "post", "412"),
        ("/api/v1/diagnoses/{id}/sign/", "post", "429"),
        ("/api/v1/diagnoses/{id}/amend/", "post", "409"),
        ("/api/v1/diagnoses/{id}/", "patch", "428"),
        ("/api/v1/cases/{id}/amend-identity/", "post", "409"),
        ("/api/v1/cases/{id}/", "patch", "409"),
        ("/api/v1/cases/{id}/fhir/", "get", "409"),
        ("/api/v1/annotations/", "post", "409"),
        ("/api/v1/annotations/{id}/", "put", "412"),
        ("/api/v1/annotations/import/", "post", "404"),
        ("/api/v1/second-opinions/{id}/close/", "post", "409"),
        ("/api/v1/models/{id}/activate/", "post", "409"),
        ("/api/v1/uploads/", "post", "413"),
        ("/api/v1/uploads/{upload_id}", "patch", "413"),
        ("/api/v1/auth/login/", "post", "429"),
        ("/api/v1/cases/", "get", "404"),  # a page past the last
    ],
)
def test_views_declare_the_errors_only_they_answer(openapi, path, method, code):
    response = openapi["paths"][path][method]["responses"][code]
    assert _error_ref(response) == ("ValidationError" if code == "400" else "Error")


def test_the_login_page_needs_no_credentials_so_lists_no_401(openapi):
    assert "401" not in openapi["paths"]["/api/v1/auth/login/"]["post"]["responses"]


# -- the documented bodies are the real ones ---------------------------------------------------


@pytest.fixture
def real_errors(api_client_for, client, admin_user, path_a, path_b, case_a, prediction_a):
    """One real answer of each kind, from the running API."""
    draft = Diagnosis.objects.create(case=case_a, author=path_a, call="tumor")
    signed = signing.do_sign(draft, path_a)
    pathologist, outsider = api_client_for(path_a), api_client_for(path_b)
    return {
        "400 fields": pathologist.post("/api/v1/diagnoses/", {"case": "x"}, format="json"),
        "400 filter": pathologist.get("/api/v1/cases/?cohort=abc"),
        "401": client.get("/api/v1/cases/"),
        "403": pathologist.delete(f"/api/v1/cases/{case_a.pk}/"),
        "404": outsider.get(f"/api/v1/predictions/{prediction_a.pk}/scores/"),
        "404 page": pathologist.get("/api/v1/cases/?page=99"),
        "409": pathologist.post(
            f"/api/v1/diagnoses/{signed.pk}/sign/", {"password": PASSWORD}, format="json"
        ),
        "409 identity": api_client_for(admin_user).patch(
            f"/api/v1/cases/{case_a.pk}/", {"patient_id": "P-other"}, format="json"
        ),
    }


def test_real_error_answers_match_the_documented_bodies(openapi, real_errors):
    for kind, response in real_errors.items():
        code = kind.split()[0]
        assert response.status_code == int(code), (kind, response.content)
        name = "ValidationError" if code == "400" else "Error"
        _validator(openapi, name).validate(response.json())


def test_the_throttled_and_busy_answers_match_the_documented_body(
    openapi, api_client_for, admin_user, path_a, monkeypatch
):
    client = APIClient()
    for i in range(21):  # LOWMAG_WRONG_TOKEN_RATE: 20/min in tests
        client.credentials(HTTP_AUTHORIZATION=f"Token wrong-{i}")
        throttled = client.get("/api/v1/cases/")
    assert throttled.status_code == 429 and "Retry-After" in throttled.headers
    _validator(openapi, "Error").validate(throttled.json())

    def locked(*args, **kwargs):
        raise OperationalError("database is locked")

    monkeypatch.setattr(ApiToken, "issue", locked)
    busy = api_client_for(admin_user).post("/api/v1/tokens/", {"user": path_a.pk}, format="json")
    assert busy.status_code == 503 and "Retry-After" in busy.headers
    _validator(openapi, "Error").validate(busy.json())


def test_error_bodies_refuse_what_the_api_never_answers(openapi):
    with pytest.raises(jsonschema.ValidationError):
        _validator(openapi, "Error").validate({"message": "not our shape"})
    with pytest.raises(jsonschema.ValidationError):
        _validator(openapi, "ValidationError").validate({"case": 3})
