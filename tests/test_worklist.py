"""One worklist for the API and the page: same cases, same order, ordered before any slice;
and one AI call per case, the same for signing, the worklist and the case page."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from django.utils import timezone

from portal.cases.models import Case, Slide
from portal.reviews.signing import ai_suggestion
from tests.portal_fixtures import make_case, make_prediction, make_user

N_CASES = 600


@pytest.fixture
def many_open_cases(cohort_a):
    """600 unsigned cases; the 100 oldest are frozen sections, the rest mixed."""
    rng = random.Random(12)
    now = timezone.now()
    cases = Case.objects.bulk_create(
        Case(
            cohort=cohort_a,
            patient_id=f"P{i}",
            accession_number=f"W-{i:04d}",
            priority="frozen" if i < 100 else rng.choice(["routine", "urgent", "frozen"]),
            status=rng.choice(["new", "analysing", "ready", "in_review"]),
        )
        for i in range(N_CASES)
    )
    for i, case in enumerate(cases):  # case i was created i minutes after case 0; a few ties
        case.created_at = now - timedelta(minutes=N_CASES - (i - i % 7))
    Case.objects.bulk_update(cases, ["created_at"])
    return cases


def _expected_order(cases) -> list[str]:
    rank = {"frozen": 0, "urgent": 1, "routine": 2}
    fresh = Case.objects.filter(pk__in=[c.pk for c in cases])
    return [
        c.accession_number
        for c in sorted(fresh, key=lambda c: (rank[c.priority], c.created_at, c.pk))
    ]


def test_600_open_cases_come_in_the_same_order_through_the_api_and_the_page(
    client, api_client_for, path_a, many_open_cases
):
    api = api_client_for(path_a)
    through_api = []
    for page in (1, 2):
        response = api.get(f"/api/v1/worklist/?queue=unsigned&page_size=500&page={page}")
        assert response.status_code == 200
        through_api += [c["accession_number"] for c in response.json()["results"]]
    expected = _expected_order(many_open_cases)
    assert through_api == expected

    client.force_login(path_a)
    rows = client.get("/?queue=unsigned").context["rows"]
    through_page = [row["case"].accession_number for row in rows]
    # The page shows the 500 most urgent, never the 500 newest: all 100 oldest frozen sections.
    assert through_page == expected[:500]
    assert {f"W-{i:04d}" for i in range(100)} <= set(through_page)


def test_filters_narrow_both_ways_alike(client, api_client_for, path_a, many_open_cases):
    query = "queue=unsigned&priority=urgent&status=ready&q=W-0"
    through_api = api_client_for(path_a).get(f"/api/v1/worklist/?{query}&page_size=500")
    names = [c["accession_number"] for c in through_api.json()["results"]]
    client.force_login(path_a)
    rows = client.get(f"/?{query}").context["rows"]
    assert names and names == [row["case"].accession_number for row in rows]
    assert all(n.startswith("W-0") for n in names)


def test_a_bad_filter_value_is_a_400_that_names_it(api_client_for, path_a):
    response = api_client_for(path_a).get("/api/v1/worklist/?priority=soon")
    assert response.status_code == 400 and "priority" in response.json()


def test_my_queue_means_the_same_on_the_page_as_in_the_api(
    client, api_client_for, path_a, cohort_a, case_a
):
    colleague = make_user("colleague", cohort=cohort_a)
    other = make_case(cohort_a, "A-050")
    make_case(cohort_a, "A-051")  # not mine
    api_client_for(path_a).post("/api/v1/diagnoses/", {"case": case_a.pk}, format="json")
    api_client_for(colleague).post(
        "/api/v1/second-opinions/",
        {"case": other.pk, "reason": "margins?", "assigned_to": path_a.pk},
        format="json",
    )
    through_api = api_client_for(path_a).get("/api/v1/worklist/?queue=mine").json()["results"]
    client.force_login(path_a)
    rows = client.get("/?queue=mine").context["rows"]
    assert [c["accession_number"] for c in through_api] == [
        r["case"].accession_number for r in rows
    ]
    assert sorted(r["case"].accession_number for r in rows) == ["A-001", "A-050"]


def test_the_ai_call_is_one_answer_for_signing_the_worklist_and_the_case_page(
    client, path_a, case_a, model_version
):
    first = case_a.slides.get()
    second = Slide.objects.create(
        case=case_a, original_name="second.tiff", sha256="cd" * 32, status="ready"
    )
    make_prediction(first, model_version, "tumor", 0.71)
    make_prediction(second, model_version, "normal", 0.93)  # the more confident one

    assert ai_suggestion(case_a)["predicted_class"] == "normal"
    client.force_login(path_a)
    rows = client.get("/").context["rows"]
    assert [r["ai"].predicted_class for r in rows if r["case"].pk == case_a.pk] == ["normal"]
    config = client.get(f"/cases/{case_a.pk}/").context["viewer_config"]
    assert config["ai_call"]["predicted_class"] == "normal"
    assert config["ai_call"]["confidence"] == pytest.approx(0.93)


def test_a_case_without_predictions_has_no_ai_call(client, path_a, case_a):
    client.force_login(path_a)
    assert client.get(f"/cases/{case_a.pk}/").context["viewer_config"]["ai_call"] is None
