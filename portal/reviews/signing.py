"""The diagnosis rules: one draft per case, row versions, signing, amendments, supersession,
and routing AI disagreements to a second opinion.

``check_*`` functions refuse with a ``DiagnosisRuleError`` (nothing changed); ``do_*`` functions
make the change. The API maps each error class to its status code (``portal.api.exceptions``)
and keeps only serialisation; any other caller gets the same rules.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models import Exists, Max
from django.utils import timezone

from portal.analyses.calls import call_of, latest_predictions
from portal.cases.access import is_admin
from portal.cases.models import Case
from portal.reviews import audit
from portal.reviews.models import Diagnosis, SecondOpinionRequest

log = logging.getLogger(__name__)

CONTENT = ("call", "diagnosis_text", "free_text")  # what an author writes


class DiagnosisRuleError(Exception):
    """A diagnosis rule refused the change; the message says what to do instead."""


class DiagnosisConflict(DiagnosisRuleError):
    """The diagnosis is not in a state that allows this (409)."""


class NotAllowed(DiagnosisRuleError):
    """The user may see the diagnosis but not do this to it (403)."""


class StaleRowVersion(DiagnosisRuleError):
    """The row changed since the client read it (412)."""


class RowVersionRequired(DiagnosisRuleError):
    """The change needs the row version the client read (428)."""

    def __init__(self):
        super().__init__(
            "Send the row_version you read, as an If-Match header or a row_version field, "
            "so a concurrent change is not overwritten."
        )


class InvalidInput(DiagnosisRuleError):
    """A field's value breaks a rule (400, keyed by the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# -- checks ------------------------------------------------------------------------------------


def check_new_draft(case: Case) -> None:
    """A case has at most one draft, and none once it is signed."""
    existing = Diagnosis.objects.filter(case=case)
    if existing.filter(status=Diagnosis.SIGNED).exists():
        raise DiagnosisConflict("This case is signed; amend its latest diagnosis instead.")
    draft = existing.filter(status=Diagnosis.DRAFT).first()
    if draft is not None:
        raise DiagnosisConflict(
            f"This case already has a draft diagnosis ({draft.pk}); edit that one."
        )


def check_draft_editable(diagnosis: Diagnosis, user) -> None:
    """Only an unsigned draft changes, and only by its author (or an admin)."""
    if diagnosis.is_signed:
        raise DiagnosisConflict("A signed diagnosis cannot be changed; amend it with a reason.")
    if diagnosis.author_id != user.pk and not is_admin(user):
        raise NotAllowed("Only the draft's author (or an admin) can change it.")


def check_row_version(diagnosis: Diagnosis, expected: int | None) -> None:
    """An edit names the row version it was made on; a stale one is refused."""
    if expected is None:
        raise RowVersionRequired()
    if expected != diagnosis.row_version:
        raise StaleRowVersion(
            f"Diagnosis {diagnosis.pk} is at row_version {diagnosis.row_version}, you sent "
            f"{expected}: someone changed it since you read it. Reload and apply again."
        )


def check_password(user, password: str) -> None:
    if not user.check_password(password):
        raise NotAllowed("The password is not correct; signing needs your own password.")


def check_signable(diagnosis: Diagnosis, user, password: str) -> None:
    """Only a draft is signed, with the signer's own password."""
    if diagnosis.is_signed:
        raise DiagnosisConflict("This diagnosis is already signed.")
    check_password(user, password)


def check_unchanged_since_read(diagnosis: Diagnosis, expected: int | None) -> None:
    """Signing what the signer read: a row version, when sent, must be the current one."""
    if expected is not None and expected != diagnosis.row_version:
        raise StaleRowVersion(
            f"Diagnosis {diagnosis.pk} changed since you read it (row_version "
            f"{diagnosis.row_version}, not {expected}); review it before signing."
        )


def latest_version(case_id: int) -> int:
    return Diagnosis.objects.filter(case=case_id).aggregate(v=Max("version"))["v"] or 0


def check_amendable(previous: Diagnosis, user, password: str, reason: str) -> str:
    """Only the latest signed version is amended, with a reason; returns the reason, trimmed."""
    if not previous.is_signed:
        raise DiagnosisConflict("Only a signed diagnosis can be amended; edit the draft instead.")
    latest = latest_version(previous.case_id)
    if previous.version != latest:
        raise DiagnosisConflict(
            f"Version {previous.version} is superseded; amend version {latest}."
        )
    check_password(user, password)
    reason = reason.strip()
    if not reason:
        raise InvalidInput("reason", "An amendment needs a reason.")
    return reason


# -- changes -----------------------------------------------------------------------------------


def do_create_draft(case: Case, author, content: dict) -> Diagnosis:
    """The case's first draft (version 1); the case moves into review."""
    check_new_draft(case)
    diagnosis = Diagnosis.objects.create(
        case=case,
        author=author,
        version=1,
        row_version=1,
        **{k: v for k, v in content.items() if k in CONTENT},
    )
    case.start_review()
    return diagnosis


def do_edit_draft(diagnosis: Diagnosis, content: dict) -> Diagnosis:
    """Apply an author's changes to a draft and bump its row version."""
    for field in CONTENT:
        if field in content:
            setattr(diagnosis, field, content[field])
    diagnosis.row_version += 1
    diagnosis.save()
    return diagnosis


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


ANNOTATIONS_LOCKED = (
    "The case is signed: its annotations are part of the signed record and cannot change. "
    "Amend the diagnosis to record a new finding."
)


def is_signed(case: Case | int) -> bool:
    return Diagnosis.objects.filter(case=case, status=Diagnosis.SIGNED).exists()


def signed_case_exists(case_ref) -> Exists:
    """For ``.annotate()``: whether the case at ``case_ref`` (an ``OuterRef``) is signed."""
    return Exists(Diagnosis.objects.filter(case=case_ref, status=Diagnosis.SIGNED))


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
    suggestion = diagnosis.ai_suggestion
    if suggestion is None or not _disagrees(diagnosis):
        return None
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
    from portal.integrations.webhooks import emit

    case = diagnosis.case
    if diagnosis.signed_by is None or diagnosis.signed_at is None:
        raise ValueError(f"diagnosis {diagnosis.pk} is not signed; nothing to announce")
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
def do_sign(diagnosis: Diagnosis, signer, request=None) -> Diagnosis:
    """Seal a draft: snapshot the AI suggestion, hash the content, audit, notify."""
    _seal(diagnosis, signer)
    audit.record(
        signer, "diagnosis.sign", diagnosis, request=request, content_hash=diagnosis.content_hash
    )
    _route_disagreement(diagnosis, request)
    _emit("diagnosis.signed", diagnosis)
    return diagnosis


@transaction.atomic
def do_amend(previous: Diagnosis, author, reason: str, content: dict, request=None) -> Diagnosis:
    """A new signed version linked to ``previous``; ``content`` overrides its call and texts."""
    next_version = latest_version(previous.case_id) + 1
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


sign = do_sign  # the names callers used before the check_/do_ split
amend = do_amend
