"""The permission matrix: every role x every API route, on objects of cohort A.

Routes come from the router itself, so a new endpoint without a row in ``MATRIX`` fails
``test_every_api_route_is_in_the_permission_matrix``. Roles: admin, path_a (pathologist of A),
path_b (pathologist of B: the outsider, who must get 404 for A's objects), integration_a
(token of A's LIS: reads and creates cases, never annotates or signs), anonymous (401).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from django.urls import reverse

from portal.api.urls import router, urlpatterns
from portal.reviews import audit, signing
from portal.reviews.models import Annotation, Diagnosis, SecondOpinionRequest
from tests.portal_fixtures import PASSWORD, make_case

ROLES = ["admin", "path_a", "path_b", "integration_a", "anonymous"]
POLYGON = {"type": "Polygon", "coordinates": [[[10, 10], [200, 10], [200, 150], [10, 10]]]}
FEATURES = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "geometry": POLYGON,
            "properties": {"classification": {"name": "Tumor", "color": [200, 0, 0]}},
        }
    ],
}


def expect(admin, path_a, path_b, integration_a, anonymous=401) -> dict[str, int]:
    return dict(zip(ROLES, [admin, path_a, path_b, integration_a, anonymous], strict=True))


READ_IN_A = expect(200, 200, 404, 200)  # a detail of cohort A's object
LIST = expect(200, 200, 200, 200)  # lists answer everyone authenticated, filtered
ADMIN_ONLY = expect(200, 403, 403, 403)
PATHOLOGIST_WRITE = expect(200, 200, 404, 403)


@dataclass
class Row:
    expected: dict[str, int]
    payload: Any = None  # a dict, or a function of the world
    query: str = ""
    target: str | None = None  # which object of the world a detail route acts on
    headers: dict[str, str] = field(default_factory=dict)


MATRIX: dict[tuple[str, str], Row] = {
    ("cohort", "list"): Row(LIST),
    ("cohort", "create"): Row(expect(201, 403, 403, 403), {"name": "C", "slug": "c"}),
    ("cohort", "retrieve"): Row(READ_IN_A),
    ("cohort", "update"): Row(ADMIN_ONLY, {"name": "A2", "slug": "a2"}),
    ("cohort", "partial_update"): Row(ADMIN_ONLY, {"description": "x"}),
    ("cohort", "destroy"): Row(expect(409, 403, 403, 403)),  # its cases protect it
    ("case", "list"): Row(LIST),
    ("case", "create"): Row(
        expect(201, 403, 400, 201),
        lambda w: {"cohort": w["cohort"].pk, "patient_id": "P9", "accession_number": "A-900"},
    ),
    ("case", "retrieve"): Row(READ_IN_A),
    ("case", "update"): Row(
        expect(200, 403, 404, 200),
        lambda w: {"cohort": w["cohort"].pk, "patient_id": "P1", "accession_number": "A-001"},
    ),
    ("case", "partial_update"): Row(expect(200, 403, 404, 200), {"priority": "urgent"}),
    ("case", "destroy"): Row(expect(409, 403, 404, 403)),  # its diagnosis protects it
    ("case", "fhir"): Row(expect(409, 409, 404, 409)),  # not signed yet
    ("case", "amend_identity"): Row(
        expect(200, 403, 403, 403), {"patient_id": "P-NEW", "reason": "registration typo"}
    ),
    ("slide", "list"): Row(LIST),
    ("slide", "retrieve"): Row(READ_IN_A),
    ("job", "list"): Row(LIST),
    ("job", "retrieve"): Row(READ_IN_A),
    ("job", "cancel"): Row(expect(409, 409, 404, 409)),  # the world's job has finished
    ("job", "retry"): Row(expect(409, 409, 404, 409)),
    ("prediction", "list"): Row(LIST),
    ("prediction", "retrieve"): Row(READ_IN_A),
    ("prediction", "scores"): Row(READ_IN_A),
    ("modelversion", "list"): Row(LIST),
    ("modelversion", "retrieve"): Row(expect(200, 200, 200, 200)),  # models are global
    ("modelversion", "activate"): Row(  # the fixture version has no weights: refused
        expect(409, 403, 403, 403), lambda w: {"cohort": w["cohort"].pk, "reason": "r"}
    ),
    ("trainingrun", "list"): Row(ADMIN_ONLY),
    ("trainingrun", "retrieve"): Row(ADMIN_ONLY),
    ("trainingrun", "create"): Row(  # one signed case: too few for a training set
        expect(400, 403, 403, 403),
        lambda w: {
            "cohort": w["cohort"].pk,
            "signed_from": "2020-01-01",
            "signed_to": "2100-01-01",
        },
    ),
    ("shadowdeployment", "list"): Row(ADMIN_ONLY),
    ("shadowdeployment", "retrieve"): Row(ADMIN_ONLY),
    ("shadowdeployment", "create"): Row(  # no weights behind the candidate: refused
        expect(409, 403, 403, 403),
        lambda w: {"candidate": w["modelversion"].pk, "cohort": w["cohort"].pk},
    ),
    ("shadowdeployment", "stop"): Row(ADMIN_ONLY),
    ("activation", "list"): Row(ADMIN_ONLY),
    ("activation", "rollback"): Row(  # nothing was activated in the world
        expect(409, 403, 403, 403), lambda w: {"cohort": w["cohort"].pk, "reason": "r"}
    ),
    ("annotation", "list"): Row(LIST),
    ("annotation", "create"): Row(
        expect(201, 201, 400, 403), lambda w: {"slide": w["slide"].pk, "geometry": POLYGON}
    ),
    ("annotation", "retrieve"): Row(READ_IN_A),
    ("annotation", "update"): Row(
        PATHOLOGIST_WRITE, lambda w: {"slide": w["slide"].pk, "geometry": POLYGON}
    ),
    ("annotation", "partial_update"): Row(PATHOLOGIST_WRITE, {"name": "renamed"}),
    ("annotation", "destroy"): Row(expect(204, 204, 404, 403)),
    ("annotation", "history"): Row(READ_IN_A),
    ("annotation", "import_geojson"): Row(
        expect(201, 201, 404, 403), FEATURES, query="slide={slide}"
    ),
    ("annotation", "export_geojson"): Row(READ_IN_A, query="slide={slide}"),
    ("diagnosis", "list"): Row(LIST),
    ("diagnosis", "create"): Row(
        expect(201, 201, 400, 403), lambda w: {"case": w["undiagnosed_case"].pk, "call": "tumor"}
    ),
    ("diagnosis", "retrieve"): Row(READ_IN_A),
    ("diagnosis", "update"): Row(
        PATHOLOGIST_WRITE,
        lambda w: {"case": w["case"].pk, "call": "normal"},
        headers={"HTTP_IF_MATCH": '"1"'},
    ),
    ("diagnosis", "partial_update"): Row(
        PATHOLOGIST_WRITE, {"free_text": "edited", "row_version": 1}
    ),
    ("diagnosis", "destroy"): Row(expect(204, 204, 404, 403)),
    ("diagnosis", "sign"): Row(PATHOLOGIST_WRITE, {"password": PASSWORD}),
    ("diagnosis", "amend"): Row(
        expect(201, 201, 404, 403), {"password": PASSWORD, "reason": "typo"}, target="signed"
    ),
    ("secondopinion", "list"): Row(LIST),
    ("secondopinion", "create"): Row(
        expect(201, 201, 400, 403), lambda w: {"case": w["case"].pk, "reason": "unsure"}
    ),
    ("secondopinion", "retrieve"): Row(READ_IN_A),
    ("secondopinion", "update"): Row(
        PATHOLOGIST_WRITE, lambda w: {"case": w["case"].pk, "reason": "still unsure"}
    ),
    ("secondopinion", "partial_update"): Row(PATHOLOGIST_WRITE, {"reason": "hmm"}),
    ("secondopinion", "close"): Row(PATHOLOGIST_WRITE),
    # the request is path_a's own: a second opinion comes from someone else
    ("secondopinion", "answer"): Row(expect(200, 403, 404, 403), {"answer": "Agree."}),
    ("worklist", "list"): Row(LIST),
    ("apitoken", "list"): Row(ADMIN_ONLY),
    ("apitoken", "create"): Row(
        expect(201, 403, 403, 403), lambda w: {"user": w["integration_a"].pk, "name": "x"}
    ),
    ("apitoken", "retrieve"): Row(ADMIN_ONLY),
    ("apitoken", "revoke"): Row(ADMIN_ONLY),
    ("auditevent", "list"): Row(ADMIN_ONLY),
    ("auditevent", "retrieve"): Row(ADMIN_ONLY),
}

# Routes outside the router, by URL name: (method, expected, payload).
OTHER_ROUTES = {
    "api-root": ("get", LIST, None),
    "auth-login": (
        "post",
        expect(200, 200, 200, 200, 200),
        {"username": "admin", "password": PASSWORD},
    ),
    "auth-logout": ("post", expect(204, 204, 204, 204), None),
    "auth-me": ("get", LIST, None),
    "schema": ("get", LIST, None),
    "swagger-ui": ("get", LIST, None),
}


def router_routes() -> list[tuple[str, str, str, str, bool]]:
    """(basename, action, http method, url name, detail) of every route the router serves."""
    routes = []
    for _prefix, viewset, basename in router.registry:
        for route in router.get_routes(viewset):
            for method, action in route.mapping.items():
                if hasattr(viewset, action):
                    name = route.name.format(basename=basename)
                    routes.append((basename, action, method, name, route.detail))
    return routes


ROUTES = router_routes()


def test_every_api_route_is_in_the_permission_matrix():
    served = {(basename, action) for basename, action, *_ in ROUTES}
    assert served == set(MATRIX), (
        f"missing rows: {sorted(served - set(MATRIX))}; stale rows: {sorted(set(MATRIX) - served)}"
    )
    named = {p.name for p in urlpatterns if getattr(p, "name", None)} | {"api-root"}
    assert named - {"swagger-asset"} == set(OTHER_ROUTES)


@pytest.fixture
def world(
    admin_user,
    path_a,
    path_b,
    integration_a,
    integration_token_a,
    cohort_a,
    case_a,
    slide_a,
    prediction_a,
):
    """One object of each kind in cohort A."""
    annotation = Annotation.objects.create(slide=slide_a, author=path_a, geometry=POLYGON)
    annotation.snapshot(path_a)
    draft = Diagnosis.objects.create(case=case_a, author=path_a, call="tumor")
    signed_case = make_case(cohort_a, "A-002")
    signed = Diagnosis.objects.create(case=signed_case, author=path_a, call="tumor")
    signing.do_sign(signed, path_a)
    opinion = SecondOpinionRequest.objects.create(case=case_a, reason="?", requested_by=path_a)
    from portal.analyses.models import ShadowDeployment, TrainingRun

    model = prediction_a.model_version
    return {
        "trainingrun": TrainingRun.objects.create(
            cohort=cohort_a, signed_from="2020-01-01", signed_to="2020-12-31", state="failed"
        ),
        "shadowdeployment": ShadowDeployment.objects.create(
            cohort=cohort_a, candidate=model, baseline=model
        ),
        "activation": None,
        "cohort": cohort_a,
        "case": case_a,
        "slide": slide_a,
        "job": prediction_a.job,
        "prediction": prediction_a,
        "modelversion": prediction_a.model_version,
        "annotation": annotation,
        "diagnosis": draft,
        "signed": signed,
        "secondopinion": opinion,
        "worklist": None,
        "apitoken": integration_a.api_tokens.get(),
        "auditevent": audit.record(admin_user, "test.event", case_a),
        "undiagnosed_case": make_case(cohort_a, "A-003"),
        "users": {"admin": admin_user, "path_a": path_a, "path_b": path_b},
        "integration_a": integration_a,
        "token": integration_token_a,
    }


def client_as(role: str, world, api_client_for):
    if role == "integration_a":
        return api_client_for(token=world["token"])
    return api_client_for(world["users"].get(role))


@pytest.mark.django_db
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    "basename,action,method,name,detail",
    ROUTES,
    ids=[f"{method.upper()}-{name}" for _b, _a, method, name, _d in ROUTES],
)
def test_permission_matrix(world, api_client_for, role, basename, action, method, name, detail):
    row = MATRIX[(basename, action)]
    target = world[row.target or basename]
    url = reverse(name, kwargs={"pk": target.pk} if detail else None) + "/"
    if row.query:
        url += "?" + row.query.format(slide=world["slide"].pk)
    payload = row.payload(world) if callable(row.payload) else row.payload
    client = client_as(role, world, api_client_for)
    response = getattr(client, method)(url, payload, format="json", **row.headers)
    assert response.status_code == row.expected[role], (role, url, response.content[:300])


@pytest.mark.django_db
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", sorted(OTHER_ROUTES))
def test_non_router_routes(world, api_client_for, role, name):
    method, expected, payload = OTHER_ROUTES[name]
    client = client_as(role, world, api_client_for)
    response = getattr(client, method)(reverse(name), payload, format="json")
    assert response.status_code == expected[role], (role, name, response.content[:300])


LIST_ROUTES = [(b, n) for b, a, m, n, d in ROUTES if a == "list" and b not in ("worklist",)]
COHORT_SCOPED = {
    "cohort",
    "case",
    "slide",
    "job",
    "prediction",
    "annotation",
    "diagnosis",
    "secondopinion",
}


@pytest.mark.django_db
@pytest.mark.parametrize("basename,name", [r for r in LIST_ROUTES if r[0] in COHORT_SCOPED])
def test_lists_never_show_the_outsider_another_cohorts_objects(
    world, api_client_for, basename, name
):
    target = world[basename].pk
    for role, should_see in [("path_a", True), ("path_b", False), ("admin", True)]:
        body = client_as(role, world, api_client_for).get(reverse(name) + "/").json()
        ids = [item["id"] for item in body["results"]]
        assert (target in ids) is should_see, (role, basename, ids)


@pytest.mark.django_db
def test_pathologist_of_a_gets_404_for_cohort_b_objects(
    api_client_for, path_a, path_b, case_b, slide_b, prediction_b
):
    annotation = Annotation.objects.create(slide=slide_b, author=path_b, geometry=POLYGON)
    diagnosis = Diagnosis.objects.create(case=case_b, author=path_b, call="tumor")
    client = api_client_for(path_a)
    for url in [
        f"/api/v1/cases/{case_b.pk}/",
        f"/api/v1/slides/{slide_b.pk}/",
        f"/api/v1/predictions/{prediction_b.pk}/",
        f"/api/v1/annotations/{annotation.pk}/",
        f"/api/v1/annotations/export/?slide={slide_b.pk}",
        f"/api/v1/diagnoses/{diagnosis.pk}/",
    ]:
        assert client.get(url).status_code == 404, url
    assert client.get(f"/api/v1/annotations/?slide={slide_b.pk}").json()["count"] == 0


@pytest.mark.django_db
def test_an_integration_token_cannot_sign(
    api_client_for, integration_a, integration_token_a, case_a, path_a
):
    draft = Diagnosis.objects.create(case=case_a, author=path_a, call="tumor")
    client = api_client_for(token=integration_token_a)
    response = client.post(f"/api/v1/diagnoses/{draft.pk}/sign/", {"password": PASSWORD})
    assert response.status_code == 403
    assert Diagnosis.objects.get(pk=draft.pk).status == "draft"


@pytest.mark.django_db
def test_anonymous_gets_healthz_but_nothing_else(client):
    assert client.get("/healthz").status_code == 200
    response = client.get("/api/v1/cases/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
