"""Second opinions: asked of a colleague, answered once, every step in the audit trail."""

from __future__ import annotations

import pytest

from portal.reviews.models import AuditEvent, SecondOpinionRequest
from tests.portal_fixtures import make_user

pytestmark = pytest.mark.django_db


def test_a_colleague_answers_a_request_once_and_both_steps_are_audited(
    api_client_for, path_a, case_a, cohort_a
):
    colleague = make_user("path_colleague", cohort=cohort_a)
    asker = api_client_for(path_a)
    opened = asker.post(
        "/api/v1/second-opinions/",
        {"case": case_a.pk, "reason": "Margins?", "assigned_to": colleague.pk},
        format="json",
    )
    assert opened.status_code == 201, opened.content
    url = f"/api/v1/second-opinions/{opened.json()['id']}/answer/"
    own = asker.post(url, {"answer": "I agree with myself"}, format="json")
    assert own.status_code == 403
    answerer = api_client_for(colleague)
    assert answerer.post(url, {"answer": "   "}, format="json").status_code == 400
    answered = answerer.post(url, {"answer": "Margins clear."}, format="json")
    assert answered.status_code == 200, answered.content
    body = answered.json()
    assert body["status"] == "closed" and body["answer"] == "Margins clear."
    assert body["answered_by"] == "path_colleague"
    again = answerer.post(url, {"answer": "Changed my mind"}, format="json")
    assert again.status_code == 409
    assert SecondOpinionRequest.objects.get().answer == "Margins clear."
    actions = list(
        AuditEvent.objects.filter(case=case_a).order_by("pk").values_list("action", flat=True)
    )
    assert actions == ["second_opinion.open", "second_opinion.answer"]


def test_assigning_a_request_is_audited_and_outsiders_cannot_answer(
    api_client_for, path_a, path_b, case_a, cohort_a
):
    colleague = make_user("path_colleague", cohort=cohort_a)
    opinion = SecondOpinionRequest.objects.create(case=case_a, reason="AI disagrees")
    asker = api_client_for(path_a)
    patched = asker.patch(
        f"/api/v1/second-opinions/{opinion.pk}/", {"assigned_to": colleague.pk}, format="json"
    )
    assert patched.status_code == 200, patched.content
    event = AuditEvent.objects.get(action="second_opinion.assign")
    assert event.details["assigned_to"] == "path_colleague"
    outsider = api_client_for(path_b).post(
        f"/api/v1/second-opinions/{opinion.pk}/answer/", {"answer": "x"}, format="json"
    )
    assert outsider.status_code == 404
