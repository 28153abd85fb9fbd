"""FHIR R4 DiagnosticReport of a signed case, validated with fhir.resources (R4B models).

fhir.resources 8 has no plain R4 package; R4B (4.3) keeps R4's DiagnosticReport, Observation,
Patient, Specimen, Practitioner and Device structure, so its models are the validator here.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from portal.integrations.fhir import NotSignedError, diagnostic_report
from portal.reviews.models import Diagnosis


def sign(case, pathologist, text: str, version: int = 1, previous=None, call: str = "tumor"):
    return Diagnosis.objects.create(
        case=case,
        version=version,
        status=Diagnosis.SIGNED,
        call=call,
        diagnosis_text=text,
        amendment_reason="re-read" if previous else "",
        previous=previous,
        author=pathologist,
        signed_by=pathologist,
        signed_at=timezone.now() + timedelta(minutes=version),
    )


def contained(report: dict, resource_type: str) -> list[dict]:
    return [r for r in report["contained"] if r["resourceType"] == resource_type]


def test_signed_case_report_validates_and_carries_the_diagnosis_and_ai_result(
    case_a, path_a, prediction_a
):
    path_a.first_name, path_a.last_name = "Ada", "Lovelace"
    path_a.save()
    diagnosis = sign(case_a, path_a, "Basal cell carcinoma, nodular type.")
    report = diagnostic_report(case_a)

    DiagnosticReport.model_validate(report)
    for resource in report["contained"]:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)

    assert report["status"] == "final"
    assert report["code"]["coding"][0]["system"] == "http://loinc.org"
    assert report["code"]["coding"][0]["code"] == "60567-5"
    assert report["conclusion"] == "Basal cell carcinoma, nodular type."
    assert report["issued"] == diagnosis.signed_at.isoformat()
    (patient,) = contained(report, "Patient")
    assert patient["identifier"][0]["value"] == case_a.patient_id
    assert report["subject"] == {"reference": "#patient"}
    (specimen,) = contained(report, "Specimen")
    assert specimen["accessionIdentifier"]["value"] == "A-001"
    (signer,) = contained(report, "Practitioner")
    assert signer["name"] == [{"text": "Ada Lovelace"}]
    assert report["performer"] == [{"reference": "#signer"}]
    (observation,) = contained(report, "Observation")
    assert report["result"] == [{"reference": f"#{observation['id']}"}]
    assert observation["valueCodeableConcept"]["text"] == "tumor"
    probabilities = {
        c["code"]["text"]: c["valueQuantity"]["value"] for c in observation["component"]
    }
    assert probabilities == {"probability of tumor": 0.9, "probability of normal": 0.1}
    (device,) = contained(report, "Device")
    assert observation["device"] == {"reference": f"#{device['id']}"}
    assert device["deviceName"][0]["name"] == "gltrans-demo"
    assert device["version"][0]["value"] == "1.0"


def test_amended_diagnosis_gives_an_amended_report_with_the_new_text(case_a, path_a):
    first = sign(case_a, path_a, "Dermatofibroma.", call="normal")
    sign(case_a, path_a, "Basal cell carcinoma.", version=2, previous=first)
    report = diagnostic_report(case_a)
    DiagnosticReport.model_validate(report)
    assert report["status"] == "amended"
    assert report["conclusion"] == "Basal cell carcinoma."
    assert report["result"] == []


def test_case_without_a_signed_diagnosis_has_no_report(case_a, path_a):
    Diagnosis.objects.create(case=case_a, author=path_a, diagnosis_text="draft")
    with pytest.raises(NotSignedError, match="A-001"):
        diagnostic_report(case_a)
