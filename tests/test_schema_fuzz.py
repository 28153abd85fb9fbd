"""Property-based fuzzing of the v1 API from its own OpenAPI schema (schemathesis).

Every operation of the portal core is called in-process (WSGI) with generated requests, as an
admin and as a pathologist (token auth), checking that no response is a server error and that
documented responses match their schema. Bounded and derandomised for CI.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from portal.api.models import ApiToken
from portal.reviews import signing
from portal.reviews.models import Annotation, AuditEvent, Diagnosis, SecondOpinionRequest
from portal.wsgi import application
from tests.portal_fixtures import make_case, make_prediction

# Other parts of the portal (uploads, integrations) fuzz their own endpoints.
OWN_PREFIXES = tuple(
    f"/api/v1/{p}"
    for p in (
        "cohorts", "cases", "slides", "jobs", "predictions", "models", "annotations",
        "diagnoses", "second-opinions", "worklist", "tokens", "audit-events", "auth/me",
    )
)  # fmt: skip


def _openapi() -> dict:
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.renderers import OpenApiJsonRenderer

    document = json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(public=True)))
    document["paths"] = {
        path: item for path, item in document["paths"].items() if path.startswith(OWN_PREFIXES)
    }
    return document


schema = schemathesis.openapi.from_dict(_openapi())
schema.app = application
schema.config.phases.update(phases=["examples", "fuzzing"])  # coverage phase: too slow here

# Ids of the objects that exist in the current test, by URL collection ("cases", ...), so that
# most generated requests reach real objects instead of stopping at 404.
KNOWN_IDS: dict[str, list[int]] = {}


def _known(collection: str, generated):
    ids = KNOWN_IDS.get(collection)
    if (
        not ids
        or isinstance(generated, bool)
        or not isinstance(generated, int)
        or generated % 4 == 0
    ):
        return generated  # keep some generated ids, to exercise the misses too
    return ids[generated % len(ids)]


@schema.hook
def map_path_parameters(ctx, path_parameters):
    if path_parameters and "id" in path_parameters:
        collection = ctx.operation.path.split("/")[3]
        path_parameters["id"] = _known(collection, path_parameters["id"])
    return path_parameters


@schema.hook
def map_query(ctx, query):
    for name, collection in [("slide", "slides"), ("case", "cases"), ("cohort", "cohorts")]:
        if query and name in query:
            query[name] = _known(collection, query[name])
    return query


@pytest.fixture
def keep_connection_open():
    """As Django's test client does: a request must not close the test's transaction."""
    from django.core import signals
    from django.db import close_old_connections

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def fuzz_tokens(
    keep_connection_open, admin_user, path_a, cohort_a, case_a, slide_a, prediction_a, model_version
):
    """A small world in cohort A (some ids exist), and a token for each fuzzing user."""
    case_2 = make_case(cohort_a, "A-002")
    make_prediction(case_2.slides.get(), model_version, "normal")
    annotation = Annotation.objects.create(
        slide=slide_a, author=path_a, geometry={"type": "Point", "coordinates": [1, 2]}
    )
    draft = Diagnosis.objects.create(case=case_a, author=path_a, call="tumor")
    signed = signing.do_sign(Diagnosis.objects.create(case=case_2, author=path_a), path_a)
    opinion = SecondOpinionRequest.objects.create(case=case_a, reason="?")
    tokens = {"admin": ApiToken.issue(admin_user), "pathologist": ApiToken.issue(path_a)}
    KNOWN_IDS.update(
        {
            "cohorts": [cohort_a.pk],
            "cases": [case_a.pk, case_2.pk],
            "slides": [slide_a.pk],
            "jobs": [prediction_a.job_id],
            "predictions": [prediction_a.pk],
            "models": [model_version.pk],
            "annotations": [annotation.pk],
            "diagnoses": [draft.pk, signed.pk],
            "second-opinions": [opinion.pk],
            "tokens": [tokens["admin"][0].pk],
            "audit-events": list(AuditEvent.objects.values_list("pk", flat=True)),
        }
    )
    yield {role: raw for role, (_token, raw) in tokens.items()}
    KNOWN_IDS.clear()


@pytest.mark.django_db
@pytest.mark.parametrize("role", ["admin", "pathologist"])
@schema.parametrize()
@settings(
    max_examples=10,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_never_errors_and_matches_its_schema(case, role, fuzz_tokens):
    case.call_and_validate(
        headers={"Authorization": f"Token {fuzz_tokens[role]}"},
        checks=[not_a_server_error, response_schema_conformance],
    )
