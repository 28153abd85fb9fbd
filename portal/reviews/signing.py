"""Signing and amending diagnoses, and routing AI disagreements to a second opinion."""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from portal.analyses.calls import call_of, latest_predictions
from portal.cases.models import Case
from portal.reviews import audit
from portal.reviews.models import Diagnosis, SecondOpinionRequest

log = logging.getLogger(__name__)


def ai_suggestion(case: Case) -> dict | None:
    """The AI's view of the case now: the latest prediction of each slide.

    The case-level call is the most confident of those slide predictions.
    """
    latest = latest_predictions([case.pk]).get(case.pk, [])
    top = call_of(latest)
    if top is None:
        return None
    slides = [
        {
            "prediction": p.pk,
            "slide": p.slide_id,
            "model": str(p.model_version),
            "model_sha256": p.model_version.sha256,
            "predicted_class": p.predicted_class,
            "confidence": p.confidence,
            "probabilities": p.probabilities,
        }
        for p in latest
    ]
    return {
        "predicted_class": top.predicted_class,
        "confidence": top.confidence,
        "model": str(top.model_version),
        "slides": slides,
    }


# A signed report names the patient and the accession: once any diagnosis is signed these
# change only through ``amend_identity`` (admins, with a reason, audited).
IDENTITY_FIELDS = ("cohort", "patient_id", "accession_number")


def is_signed(case: Case) -> bool:
    return Diagnosis.objects.filter(case=case, status=Diagnosis.SIGNED).exists()


def identity_changes(case: Case, proposed: dict) -> dict[str, list]:
    """``{field: [old, new]}`` for the identity fields ``proposed`` would change."""
    changes = {}
    for field in IDENTITY_FIELDS:
        if field not in proposed:
            continue
        old = case.cohort_id if field == "cohort" else getattr(case, field)
        new = getattr(proposed[field], "pk", proposed[field])
        if old != new:
            changes[field] = [old, new]
    return changes


def check_identity_frozen(case: Case, proposed: dict, actor, request=None) -> dict[str, list]:
    """The identity changes refused because the case is signed (audited); empty when allowed."""
    changes = identity_changes(case, proposed)
    if not changes or not is_signed(case):
        return {}
    audit.record(actor, "case.identity_refused", case, request=request, fields=sorted(changes))
    return changes


@transaction.atomic
def amend_identity(case: Case, admin, changes: dict, reason: str, request=None) -> Case:
    """Correct a signed case's patient id or accession number (admins), keeping before/after."""
    applied = identity_changes(case, changes)
    for field, (_old, new) in applied.items():
        setattr(case, field, new)
    case.save(update_fields=[*applied, "updated_at"])
    audit.record(admin, "case.identity_amend", case, request=request, reason=reason, **applied)
    return case


def _disagrees(diagnosis: Diagnosis) -> bool:
    suggestion = diagnosis.ai_suggestion
    if not suggestion or not diagnosis.call:
        return False
    return diagnosis.call.strip().lower() != str(suggestion["predicted_class"]).strip().lower()


def _route_disagreement(diagnosis: Diagnosis, request) -> SecondOpinionRequest | None:
    if not _disagrees(diagnosis):
        return None
    suggestion = diagnosis.ai_suggestion
    opinion = SecondOpinionRequest.objects.create(
        case=diagnosis.case,
        diagnosis=diagnosis,
        reason=(
            f"The AI call '{suggestion['predicted_class']}' ({suggestion['model']}, confidence "
            f"{suggestion['confidence']:.2f}) disagrees with the signed call '{diagnosis.call}'."
        ),
    )
    audit.record(
        None, "second_opinion.open", opinion, case=diagnosis.case, request=request, automatic=True
    )
    return opinion


def _emit(event: str, diagnosis: Diagnosis) -> None:
    try:
        from portal.integrations.webhooks import emit
    except ImportError:
        return
    case = diagnosis.case
    payload = {
        "case": case.pk,
        "accession_number": case.accession_number,
        "patient_id": case.patient_id,
        "diagnosis": diagnosis.pk,
        "version": diagnosis.version,
        "call": diagnosis.call,
        "signed_by": diagnosis.signed_by.get_username(),
        "signed_at": diagnosis.signed_at.isoformat(),
        "content_hash": diagnosis.content_hash,
    }
    transaction.on_commit(lambda: emit(event, case.cohort, payload))


def _seal(diagnosis: Diagnosis, signer) -> None:
    diagnosis.ai_suggestion = ai_suggestion(diagnosis.case)
    diagnosis.status = Diagnosis.SIGNED
    diagnosis.signed_by = signer
    diagnosis.signed_at = timezone.now()
    diagnosis.content_hash = diagnosis.compute_content_hash()
    diagnosis.save()
    diagnosis.case.mark_signed()


@transaction.atomic
def sign(diagnosis: Diagnosis, signer, request=None) -> Diagnosis:
    """Seal a draft: snapshot the AI suggestion, hash the content, audit, notify."""
    _seal(diagnosis, signer)
    audit.record(
        signer, "diagnosis.sign", diagnosis, request=request, content_hash=diagnosis.content_hash
    )
    _route_disagreement(diagnosis, request)
    _emit("diagnosis.signed", diagnosis)
    return diagnosis


@transaction.atomic
def amend(previous: Diagnosis, author, reason: str, content: dict, request=None) -> Diagnosis:
    """A new signed version linked to ``previous``; ``content`` overrides its call and texts."""
    next_version = (
        Diagnosis.objects.filter(case=previous.case_id).aggregate(v=Max("version"))["v"] or 0
    ) + 1
    amendment = Diagnosis(
        case=previous.case,
        version=next_version,
        previous=previous,
        author=author,
        amendment_reason=reason,
        call=content.get("call", previous.call),
        diagnosis_text=content.get("diagnosis_text", previous.diagnosis_text),
        free_text=content.get("free_text", previous.free_text),
    )
    _seal(amendment, author)
    audit.record(
        author,
        "diagnosis.amend",
        amendment,
        request=request,
        previous=previous.pk,
        reason=reason,
        content_hash=amendment.content_hash,
    )
    _route_disagreement(amendment, request)
    _emit("diagnosis.amended", amendment)
    return amendment
