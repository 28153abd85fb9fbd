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


def test_a_slide_uploaded_after_sign_off_leaves_the_signed_report_byte_for_byte(
    settings, tmp_path, api_client_for, integration_a, path_a, model_version, prediction_a
):
    from portal.cases.models import Slide
    from portal.reviews import signing
    from tests.conftest import shared_slide
    from tests.portal_fixtures import make_prediction
    from tests.test_uploads import create_upload, patch

    settings.UPLOAD_DIR, settings.SLIDE_DIR = tmp_path / "uploads", tmp_path / "slides"
    case = prediction_a.slide.case
    lis = api_client_for(integration_a)
    data = shared_slide("cmu-1-small-region.svs").read_bytes()
    half = len(data) // 2
    upload = create_upload(lis, case, "late.svs", len(data))  # started before sign-off
    assert patch(lis, upload, 0, data[:half]).status_code == 204

    draft = Diagnosis.objects.create(case=case, author=path_a, call="tumor", version=1)
    signing.sign(draft, path_a)
    reader = api_client_for(path_a)
    signed_report = reader.get(f"/api/v1/cases/{case.pk}/fhir/").content

    finished = patch(lis, upload, half, data[half:])  # ...and finished after it
    assert finished.status_code == 204
    late = Slide.objects.get(pk=int(finished["Upload-Slide-Id"]))
    assert late.status == "ready", late.failure_reason
    make_prediction(late, model_version)  # its analysis finished too

    assert reader.get(f"/api/v1/cases/{case.pk}/fhir/").content == signed_report
    assert AuditEvent.objects.filter(action="slide.addendum", object_id=str(late.pk)).exists()

    # The addendum reaches the report when the pathologist amends the diagnosis.
    amended = reader.post(
        f"/api/v1/diagnoses/{draft.pk}/amend/",
        {"password": "histology-is-fun-42", "reason": "late slide reviewed"},
        format="json",
    )
    assert amended.status_code == 201
    report = reader.get(f"/api/v1/cases/{case.pk}/fhir/").json()
    assert report["status"] == "amended"
    assert len(report["result"]) == 2
    assert "late.svs" in report["contained"][1]["note"][0]["text"]


POINT = {"type": "Point", "coordinates": [10, 20]}


def test_annotations_of_a_signed_case_are_locked_for_every_kind_of_change(
    api_client_for, path_a, slide_a
):
    from portal.reviews import signing

    client = api_client_for(path_a)
    client.default_format = "json"
    created = client.post("/api/v1/annotations/", {"slide": slide_a.pk, "geometry": POINT})
    assert created.status_code == 201 and created.json()["locked"] is None
    url = f"/api/v1/annotations/{created.json()['id']}/"
    draft = Diagnosis.objects.create(case=slide_a.case, author=path_a, call="tumor", version=1)
    signing.sign(draft, path_a)

    refused = [
        client.post("/api/v1/annotations/", {"slide": slide_a.pk, "geometry": POINT}),
        client.patch(url, {"name": "changed"}),
        client.put(url, {"slide": slide_a.pk, "geometry": POINT}),
        client.delete(url),
        client.post(
            f"/api/v1/annotations/import/?slide={slide_a.pk}",
            {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": POINT}]},
        ),
    ]
    assert [r.status_code for r in refused] == [409] * 5
    assert all("signed" in r.json()["detail"] for r in refused)
    shown = client.get(url).json()
    assert shown["locked"] == signing.ANNOTATIONS_LOCKED and shown["name"] == ""
    assert client.get("/api/v1/annotations/").json()["results"][0]["locked"]


def test_every_annotation_change_is_audited(api_client_for, path_a, slide_a):
    client = api_client_for(path_a)
    client.default_format = "json"
    created = client.post("/api/v1/annotations/", {"slide": slide_a.pk, "geometry": POINT})
    url = f"/api/v1/annotations/{created.json()['id']}/"
    assert client.patch(url, {"name": "renamed"}).status_code == 200
    assert client.delete(url).status_code == 204
    events = AuditEvent.objects.filter(object_type="reviews.annotation").order_by("id")
    assert [(e.action, e.details["version"]) for e in events] == [
        ("annotation.create", 1),
        ("annotation.update", 2),
        ("annotation.delete", 3),
    ]
    assert {e.case_id for e in events} == {slide_a.case_id}
