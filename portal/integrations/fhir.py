"""FHIR R4 ``DiagnosticReport`` for a signed case.

One self-contained resource (Patient, Specimen, Practitioner, Device and Observations are
``contained``), so a LIS can import it without resolving references on this server.

- ``code``: LOINC 60567-5 "Comprehensive pathology report panel"; ``category``: HL7 v2-0074
  ``SP`` (surgical pathology).
- ``status``: ``final``, or ``amended`` when the signed diagnosis amends an earlier one.
- ``conclusion``: the signed diagnosis text; ``conclusionCode``: the class the pathologist
  called (text only: cohort classes have no standard code).
- ``result``: one Observation per AI prediction the signer saw (the diagnosis' snapshot of
  the AI suggestion; a slide or analysis arriving after sign-off waits for an amendment): predicted class as the
  value, each class probability as a component, the model (name, version) as a contained
  Device and its bundle checksum in a note.
- ``issued``: when the diagnosis was signed; ``performer`` and ``resultsInterpreter``: the
  signing pathologist.
"""

from __future__ import annotations

from portal.analyses.models import Prediction
from portal.cases.models import Case
from portal.reviews.models import Diagnosis

LOINC = "http://loinc.org"
REPORT_CODE = {
    "system": LOINC,
    "code": "60567-5",
    "display": "Comprehensive pathology report panel",
}
CATEGORY_SP = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "SP",
    "display": "Surgical Pathology",
}
ACCESSION_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
    "code": "ACSN",
    "display": "Accession ID",
}
UCUM = "http://unitsofmeasure.org"
IDENTIFIER_BASE = "urn:lowmag"


class NotSignedError(ValueError):
    """The case has no signed diagnosis, so there is no report to export."""


def signed_diagnosis(case: Case) -> Diagnosis:
    """The case's latest signed diagnosis (the newest amendment, if any)."""
    diagnosis = (
        Diagnosis.objects.filter(case=case, status=Diagnosis.SIGNED)
        .select_related("signed_by")
        .order_by("-version")
        .first()
    )
    if diagnosis is None:
        raise NotSignedError(f"case {case.accession_number} has no signed diagnosis yet")
    return diagnosis


def diagnostic_report(case: Case) -> dict:
    """The signed report of ``case`` as a FHIR R4 DiagnosticReport (JSON-ready dict)."""
    diagnosis = signed_diagnosis(case)
    signed_at = diagnosis.signed_at
    if signed_at is None:
        raise NotSignedError(f"case {case.accession_number}'s diagnosis has no signing time")
    # Only what the pathologist saw when signing: a slide or analysis that arrives later is an
    # addendum, reported when the diagnosis is amended, never slipped into this report.
    predictions = list(
        _signed_predictions(diagnosis, case)
        .select_related("model_version", "slide")
        .order_by("slide_id", "id")
    )
    slides = case.slides.filter(created_at__lte=diagnosis.signed_at).order_by("id")
    contained = [_patient(case), _specimen(case, slides), _practitioner(diagnosis.signed_by)]
    contained += _devices(predictions)
    observations = [_observation(p) for p in predictions]
    contained += observations
    report = {
        "resourceType": "DiagnosticReport",
        "id": f"case-{case.pk}-v{diagnosis.version}",
        "contained": contained,
        "identifier": [_accession_identifier(case)],
        "status": "amended" if diagnosis.previous_id else "final",
        "category": [{"coding": [CATEGORY_SP]}],
        "code": {"coding": [REPORT_CODE], "text": "Pathology report"},
        "subject": {"reference": "#patient"},
        "issued": signed_at.isoformat(),
        "performer": [{"reference": "#signer"}],
        "resultsInterpreter": [{"reference": "#signer"}],
        "specimen": [{"reference": "#specimen"}],
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": diagnosis.diagnosis_text or diagnosis.call,
    }
    if diagnosis.call:
        report["conclusionCode"] = [{"text": diagnosis.call}]
    return report


def _signed_predictions(diagnosis: Diagnosis, case: Case):
    """The predictions the signer saw: the diagnosis' AI snapshot, or (for a diagnosis signed
    without one) those that existed when it was signed."""
    predictions = Prediction.objects.filter(slide__case=case)
    if diagnosis.ai_suggestion is None:
        return predictions.filter(created_at__lte=diagnosis.signed_at)
    slides = diagnosis.ai_suggestion.get("slides", [])
    return predictions.filter(pk__in=[s["prediction"] for s in slides if "prediction" in s])


def _accession_identifier(case: Case) -> dict:
    return {
        "type": {"coding": [ACCESSION_TYPE]},
        "system": f"{IDENTIFIER_BASE}:cohort:{case.cohort.slug}:accession",
        "value": case.accession_number,
    }


def _patient(case: Case) -> dict:
    return {
        "resourceType": "Patient",
        "id": "patient",
        "identifier": [
            {
                "system": f"{IDENTIFIER_BASE}:cohort:{case.cohort.slug}:patient",
                "value": case.patient_id,
            }
        ],
    }


def _specimen(case: Case, slides) -> dict:
    slide_names = [s.original_name for s in slides]
    specimen = {
        "resourceType": "Specimen",
        "id": "specimen",
        "accessionIdentifier": _accession_identifier(case),
        "subject": {"reference": "#patient"},
    }
    if slide_names:
        specimen["note"] = [{"text": "Whole-slide images: " + ", ".join(slide_names)}]
    return specimen


def _practitioner(user) -> dict:
    name = user.get_full_name() or user.get_username()
    return {
        "resourceType": "Practitioner",
        "id": "signer",
        "identifier": [{"system": f"{IDENTIFIER_BASE}:user", "value": user.get_username()}],
        "name": [{"text": name}],
    }


def _device_id(prediction: Prediction) -> str:
    return f"model-{prediction.model_version_id}"


def _devices(predictions: list[Prediction]) -> list[dict]:
    models = {p.model_version_id: p.model_version for p in predictions}
    return [
        {
            "resourceType": "Device",
            "id": f"model-{model.pk}",
            "deviceName": [{"name": model.name, "type": "model-name"}],
            "version": [{"value": model.version}],
            "note": [{"text": f"{model.task}; bundle weights sha256 {model.sha256}"}],
        }
        for model in models.values()
    ]


def _observation(prediction: Prediction) -> dict:
    model = prediction.model_version
    slide = prediction.slide
    note = (
        f"slide {slide.original_name} (sha256 {prediction.input_sha256 or slide.sha256}); "
        f"confidence {prediction.confidence:.4f}"
    )
    return {
        "resourceType": "Observation",
        "id": f"prediction-{prediction.pk}",
        "status": "final",
        "code": {"text": f"AI slide classification ({model.task})"},
        "subject": {"reference": "#patient"},
        "specimen": {"reference": "#specimen"},
        "device": {"reference": f"#{_device_id(prediction)}"},
        "method": {"text": f"{model.name} {model.version} at {model.magnification:g}x"},
        "issued": prediction.created_at.isoformat(),
        "valueCodeableConcept": {"text": prediction.predicted_class},
        "component": [_probability(name, p) for name, p in prediction.probabilities.items()],
        "note": [{"text": note}],
    }


def _probability(class_name: str, probability: float) -> dict:
    return {
        "code": {"text": f"probability of {class_name}"},
        "valueQuantity": {"value": round(float(probability), 6), "system": UCUM, "code": "1"},
    }
