"""Nothing signed changes: the case's identity, its report and its annotations."""

from __future__ import annotations

import pytest

from portal.reviews.models import AuditEvent, Diagnosis


@pytest.fixture
def signed_case(case_a, path_a):
    from portal.reviews import signing

    draft = Diagnosis.objects.create(case=case_a, author=path_a, call="tumor", version=1)
    signing.sign(draft, path_a)
    case_a.refresh_from_db()
    return case_a


def test_integration_patch_of_a_signed_cases_identity_is_refused_and_audited(
    api_client_for, integration_a, integration_token_a, signed_case
):
    client = api_client_for(integration_a, token=integration_token_a)
    response = client.patch(
        f"/api/v1/cases/{signed_case.pk}/",
        {"patient_id": "SOMEONE-ELSE", "accession_number": "X-9"},
        format="json",
    )
    assert response.status_code == 409
    assert "amend-identity" in response.json()["detail"]
    signed_case.refresh_from_db()
    assert (signed_case.patient_id, signed_case.accession_number) == ("P-A-001", "A-001")
    event = AuditEvent.objects.get(action="case.identity_refused")
    assert event.case_id == signed_case.pk
    assert event.details["fields"] == ["accession_number", "patient_id"]


def test_other_fields_of_a_signed_case_still_change(
    api_client_for, integration_a, integration_token_a, signed_case
):
    client = api_client_for(integration_a, token=integration_token_a)
    response = client.patch(
        f"/api/v1/cases/{signed_case.pk}/",
        {"priority": "urgent", "patient_id": "P-A-001"},  # identity sent unchanged
        format="json",
    )
    assert response.status_code == 200


def test_unsigned_case_identity_can_be_corrected(
    api_client_for, integration_a, integration_token_a, case_a
):
    client = api_client_for(integration_a, token=integration_token_a)
    response = client.patch(f"/api/v1/cases/{case_a.pk}/", {"patient_id": "P-2"}, format="json")
    assert response.status_code == 200


def test_admin_amends_a_signed_cases_identity_with_a_reason_audited(
    api_client_for, admin_user, path_a, signed_case
):
    url = f"/api/v1/cases/{signed_case.pk}/amend-identity/"
    body = {"patient_id": "P-RIGHT", "reason": "Registration typo, checked with the lab"}
    assert api_client_for(path_a).post(url, body, format="json").status_code == 403
    no_reason = api_client_for(admin_user).post(url, {"patient_id": "P-RIGHT"}, format="json")
    assert no_reason.status_code == 400
    response = api_client_for(admin_user).post(url, body, format="json")
    assert response.status_code == 200
    assert response.json()["patient_id"] == "P-RIGHT"
    event = AuditEvent.objects.get(action="case.identity_amend")
    assert event.details["patient_id"] == ["P-A-001", "P-RIGHT"]
    assert event.details["reason"] == body["reason"]
