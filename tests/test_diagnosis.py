"""Diagnosis life cycle: draft -> signed (immutable) -> amended versions; locking; AI disagreement."""

from __future__ import annotations

import sys
import types

import pytest

from portal.reviews.models import AuditEvent, Diagnosis, ImmutableRowError, SecondOpinionRequest
from tests.portal_fixtures import PASSWORD

pytestmark = pytest.mark.django_db


def _draft(client, case, **fields):
    body = {"case": case.pk, "call": "tumor", "diagnosis_text": "Invasive carcinoma", **fields}
    response = client.post("/api/v1/diagnoses/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def _sign(client, diagnosis_id, password=PASSWORD):
    return client.post(
        f"/api/v1/diagnoses/{diagnosis_id}/sign/", {"password": password}, format="json"
    )


@pytest.fixture
def client_a(api_client_for, path_a):
    return api_client_for(path_a)


@pytest.fixture
def signed(client_a, case_a):
    draft = _draft(client_a, case_a)
    response = _sign(client_a, draft["id"])
    assert response.status_code == 200, response.content
    return response.json()


def test_a_new_draft_puts_the_case_in_review(client_a, case_a):
    draft = _draft(client_a, case_a)
    assert (draft["status"], draft["version"], draft["row_version"]) == ("draft", 1, 1)
    case_a.refresh_from_db()
    assert case_a.status == "in_review"


def test_a_second_draft_for_the_same_case_is_refused(client_a, case_a):
    _draft(client_a, case_a)
    response = client_a.post("/api/v1/diagnoses/", {"case": case_a.pk}, format="json")
    assert response.status_code == 409


def test_signing_with_a_wrong_password_is_refused(client_a, case_a):
    draft = _draft(client_a, case_a)
    response = _sign(client_a, draft["id"], password="not-my-password")
    assert response.status_code == 403
    assert "password" in response.json()["detail"]
    assert Diagnosis.objects.get(pk=draft["id"]).status == "draft"
    assert not AuditEvent.objects.filter(action="diagnosis.sign").exists()


def test_signing_seals_the_draft_with_a_content_hash(signed, case_a, path_a):
    assert signed["status"] == "signed"
    assert signed["signed_by"] == "path_a"
    assert len(signed["content_hash"]) == 64
    stored = Diagnosis.objects.get(pk=signed["id"])
    assert stored.content_hash == stored.compute_content_hash()
    case_a.refresh_from_db()
    assert case_a.status == "signed"


@pytest.mark.parametrize("method", ["patch", "put", "delete"])
def test_a_signed_diagnosis_cannot_be_changed_through_the_api(client_a, signed, method):
    body = {"call": "normal", "diagnosis_text": "changed", "row_version": signed["row_version"]}
    response = getattr(client_a, method)(f"/api/v1/diagnoses/{signed['id']}/", body, format="json")
    assert response.status_code == 409
    stored = Diagnosis.objects.get(pk=signed["id"])
    assert (stored.call, stored.diagnosis_text) == ("tumor", "Invasive carcinoma")


def test_a_signed_diagnosis_cannot_be_signed_again(client_a, signed):
    assert _sign(client_a, signed["id"]).status_code == 409


def test_a_signed_diagnosis_cannot_be_changed_through_the_orm(signed):
    diagnosis = Diagnosis.objects.get(pk=signed["id"])
    diagnosis.call = "normal"
    with pytest.raises(ImmutableRowError):
        diagnosis.save()
    with pytest.raises(ImmutableRowError):
        Diagnosis.objects.filter(pk=diagnosis.pk).update(call="normal")
    with pytest.raises(ImmutableRowError):
        Diagnosis.objects.bulk_update([diagnosis], ["call"])
    with pytest.raises(ImmutableRowError):
        Diagnosis.objects.filter(pk=diagnosis.pk).delete()
    with pytest.raises(ImmutableRowError):
        diagnosis.delete()
    assert Diagnosis.objects.get(pk=diagnosis.pk).call == "tumor"


def test_a_draft_can_still_be_changed_through_the_orm(client_a, case_a):
    draft = _draft(client_a, case_a)
    assert Diagnosis.objects.filter(pk=draft["id"]).update(free_text="note") == 1


def test_an_amendment_is_a_new_signed_version_with_its_reason(client_a, signed):
    response = client_a.post(
        f"/api/v1/diagnoses/{signed['id']}/amend/",
        {"password": PASSWORD, "reason": "Margin re-measured", "call": "normal"},
        format="json",
    )
    assert response.status_code == 201, response.content
    amendment = response.json()
    assert (amendment["version"], amendment["status"]) == (2, "signed")
    assert amendment["previous"] == signed["id"]
    assert amendment["amendment_reason"] == "Margin re-measured"
    assert amendment["call"] == "normal"
    assert amendment["diagnosis_text"] == "Invasive carcinoma"  # carried over
    assert amendment["content_hash"] != signed["content_hash"]
    assert Diagnosis.objects.get(pk=signed["id"]).call == "tumor"  # the original is untouched


def test_an_amendment_needs_a_reason_and_the_password(client_a, signed):
    url = f"/api/v1/diagnoses/{signed['id']}/amend/"
    no_reason = client_a.post(url, {"password": PASSWORD, "reason": "  "}, format="json")
    assert no_reason.status_code == 400
    wrong_password = client_a.post(url, {"password": "nope", "reason": "typo"}, format="json")
    assert wrong_password.status_code == 403
    assert Diagnosis.objects.count() == 1


def test_only_the_latest_version_can_be_amended(client_a, signed):
    url = f"/api/v1/diagnoses/{signed['id']}/amend/"
    assert client_a.post(url, {"password": PASSWORD, "reason": "one"}).status_code == 201
    assert client_a.post(url, {"password": PASSWORD, "reason": "two"}).status_code == 409


def test_a_draft_cannot_be_amended(client_a, case_a):
    draft = _draft(client_a, case_a)
    response = client_a.post(
        f"/api/v1/diagnoses/{draft['id']}/amend/", {"password": PASSWORD, "reason": "x"}
    )
    assert response.status_code == 409


def test_a_stale_draft_write_is_refused_and_nothing_is_lost(api_client_for, path_a, case_a):
    first, second = api_client_for(path_a), api_client_for(path_a)
    draft = _draft(first, case_a)
    url = f"/api/v1/diagnoses/{draft['id']}/"
    ok = first.patch(url, {"free_text": "first edit"}, format="json", HTTP_IF_MATCH='"1"')
    assert ok.status_code == 200
    assert ok["ETag"] == '"2"'
    stale = second.patch(url, {"free_text": "second edit"}, format="json", HTTP_IF_MATCH='"1"')
    assert stale.status_code == 412
    stale_field = second.patch(url, {"free_text": "again", "row_version": 1}, format="json")
    assert stale_field.status_code == 412
    stored = Diagnosis.objects.get(pk=draft["id"])
    assert (stored.free_text, stored.row_version) == ("first edit", 2)


def test_a_draft_write_without_a_row_version_is_refused(client_a, case_a):
    draft = _draft(client_a, case_a)
    response = client_a.patch(f"/api/v1/diagnoses/{draft['id']}/", {"free_text": "x"})
    assert response.status_code == 428


def test_a_malformed_if_match_header_is_a_400(client_a, case_a):
    draft = _draft(client_a, case_a)
    response = client_a.patch(
        f"/api/v1/diagnoses/{draft['id']}/", {"free_text": "x"}, HTTP_IF_MATCH='"abc"'
    )
    assert response.status_code == 400


def test_disagreeing_with_the_ai_call_opens_a_second_opinion(client_a, case_a, prediction_a):
    draft = _draft(client_a, case_a, call="normal")
    signed = _sign(client_a, draft["id"]).json()
    assert signed["ai_suggestion"]["predicted_class"] == "tumor"
    opinion = SecondOpinionRequest.objects.get(case=case_a)
    assert opinion.status == "open"
    assert opinion.diagnosis_id == signed["id"]
    assert "tumor" in opinion.reason and "normal" in opinion.reason
    queue = client_a.get("/api/v1/worklist/?queue=second-opinion").json()["results"]
    assert [c["id"] for c in queue] == [case_a.pk]


def test_agreeing_with_the_ai_call_opens_no_second_opinion(client_a, case_a, prediction_a):
    draft = _draft(client_a, case_a, call="Tumor")
    _sign(client_a, draft["id"])
    assert not SecondOpinionRequest.objects.exists()


def test_sign_and_amend_leave_audit_events(client_a, signed, case_a):
    client_a.post(
        f"/api/v1/diagnoses/{signed['id']}/amend/", {"password": PASSWORD, "reason": "typo"}
    )
    actions = list(AuditEvent.objects.filter(case=case_a).values_list("action", flat=True))
    assert "diagnosis.sign" in actions and "diagnosis.amend" in actions


def test_viewing_a_signed_case_leaves_an_audit_event(client_a, signed, case_a, path_a):
    client_a.get(f"/api/v1/cases/{case_a.pk}/")
    client_a.get(f"/api/v1/diagnoses/{signed['id']}/")
    views = AuditEvent.objects.filter(actor=path_a, action__in=["case.view", "diagnosis.view"])
    assert sorted(views.values_list("action", flat=True)) == ["case.view", "diagnosis.view"]


def test_viewing_an_unsigned_case_is_not_audited(client_a, case_a):
    client_a.get(f"/api/v1/cases/{case_a.pk}/")
    assert not AuditEvent.objects.filter(action="case.view").exists()


def test_fhir_export_of_a_signed_case_is_audited(client_a, signed, case_a, monkeypatch):
    fake = types.ModuleType("portal.integrations.fhir")
    fake.diagnostic_report = lambda case: {"resourceType": "DiagnosticReport", "id": str(case.pk)}
    monkeypatch.setitem(sys.modules, "portal.integrations.fhir", fake)
    response = client_a.get(f"/api/v1/cases/{case_a.pk}/fhir")
    assert response.status_code == 200
    assert response.json()["resourceType"] == "DiagnosticReport"
    assert AuditEvent.objects.filter(action="fhir.export", case=case_a).count() == 1


def test_fhir_export_of_an_unsigned_case_is_a_conflict(client_a, case_a):
    assert client_a.get(f"/api/v1/cases/{case_a.pk}/fhir/").status_code == 409


def test_signing_and_amending_emit_webhooks_after_commit(
    client_a, case_a, monkeypatch, django_capture_on_commit_callbacks
):
    emitted = []
    fake = types.ModuleType("portal.integrations.webhooks")
    fake.emit = lambda event, cohort, payload: emitted.append((event, cohort.pk, payload))
    monkeypatch.setitem(sys.modules, "portal.integrations.webhooks", fake)
    draft = _draft(client_a, case_a)
    with django_capture_on_commit_callbacks(execute=True):
        _sign(client_a, draft["id"])
    with django_capture_on_commit_callbacks(execute=True):
        client_a.post(
            f"/api/v1/diagnoses/{draft['id']}/amend/", {"password": PASSWORD, "reason": "typo"}
        )
    assert [(e, c) for e, c, _ in emitted] == [
        ("diagnosis.signed", case_a.cohort_id),
        ("diagnosis.amended", case_a.cohort_id),
    ]
    assert emitted[0][2]["accession_number"] == "A-001"
    assert emitted[1][2]["version"] == 2


def test_only_the_author_edits_a_draft(api_client_for, path_a, cohort_a, case_a):
    from tests.portal_fixtures import make_user

    colleague = make_user("colleague", cohort=cohort_a)
    draft = _draft(api_client_for(path_a), case_a)
    response = api_client_for(colleague).patch(
        f"/api/v1/diagnoses/{draft['id']}/", {"free_text": "mine now"}, HTTP_IF_MATCH='"1"'
    )
    assert response.status_code == 403
