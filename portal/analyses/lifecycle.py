"""Which model a cohort uses: the guards on activation, activation itself, and rollback.

Guards (each refusal is one sentence and changes nothing):
- a version whose weight files do not verify against its recorded SHA-256 cannot be active;
- a demo bundle cannot be activated in a cohort that is not marked as demo;
- only admins activate or roll back, and each activation records who did it and why.

Every activation is a ``ModelActivation`` row (with the model it replaced) and an audit event;
rollback restores the replaced model and is audited too.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from portal.analyses.models import ModelActivation, ModelVersion, ShadowDeployment
from portal.analyses.weights import ActivationError, weights_problem
from portal.cases.models import Cohort
from portal.reviews import audit


def check_can_activate(model: ModelVersion, cohort: Cohort | None) -> None:
    """Raise ``ActivationError`` unless ``model`` may become ``cohort``'s active model."""
    if problem := weights_problem(model):
        raise ActivationError(f"{model} cannot be activated: {problem}.")
    if cohort is not None and model.is_demo and not cohort.is_demo:
        raise ActivationError(
            f"{model} is a demo model (not for diagnosis) and cohort '{cohort.name}' is not a "
            "demo cohort; train or register a clinical model for it"
        )


def _require_admin(actor) -> None:
    from portal.cases.access import is_admin

    if not is_admin(actor):
        raise PermissionError("Only admins can activate or roll back models.")


@transaction.atomic
def activate(
    model: ModelVersion, cohort: Cohort, actor, reason: str, request=None, *, system=False
) -> ModelActivation:
    """Make ``model`` the cohort's active model (guards first); ends its shadow deployment.

    ``system=True`` is for operators at the command line (``register_model``), who hold no
    portal account; every other caller must be an admin.
    """
    if not system:
        _require_admin(actor)
    reason = (reason or "").strip()
    if not reason:
        raise ActivationError("Say why this model is being activated (a reason is required).")
    cohort = Cohort.objects.select_for_update().get(pk=cohort.pk)
    check_can_activate(model, cohort)
    previous = cohort.active_model
    if previous is not None and previous.pk == model.pk:
        raise ActivationError(f"{model} is already the active model of cohort '{cohort.name}'.")
    record = ModelActivation.objects.create(
        cohort=cohort,
        model_version=model,
        previous=previous,
        activated_by=actor if actor is not None and actor.is_authenticated else None,
        reason=reason,
    )
    ModelVersion.objects.filter(pk=model.pk).update(active=True)
    Cohort.objects.filter(pk=cohort.pk).update(active_model=model)
    ShadowDeployment.objects.filter(cohort=cohort, candidate=model, active=True).update(
        active=False, ended_at=timezone.now()
    )
    audit.record(
        actor,
        "model.activate",
        model,
        request=request,
        cohort=cohort.pk,
        previous=previous.pk if previous else None,
        reason=reason,
        sha256=model.sha256,
    )
    model.refresh_from_db()
    return record


@transaction.atomic
def mark_active(model: ModelVersion, actor, reason: str, request=None, *, system=False) -> None:
    """Mark ``model`` usable without making it any cohort's model (guards, reason and audit as
    ``activate``); ``system=True`` for operators at the command line."""
    if not system:
        _require_admin(actor)
    reason = (reason or "").strip()
    if not reason:
        raise ActivationError("Say why this model is being activated (a reason is required).")
    check_can_activate(model, None)
    ModelVersion.objects.filter(pk=model.pk).update(active=True)
    audit.record(
        actor, "model.activate", model, request=request, reason=reason, sha256=model.sha256
    )
    model.refresh_from_db()


@transaction.atomic
def rollback(cohort: Cohort, actor, reason: str, request=None) -> ModelActivation:
    """Undo the cohort's latest activation: its previous model becomes active again."""
    _require_admin(actor)
    reason = (reason or "").strip()
    if not reason:
        raise ActivationError("Say why the model is being rolled back (a reason is required).")
    cohort = Cohort.objects.select_for_update().get(pk=cohort.pk)
    last = (
        ModelActivation.objects.filter(cohort=cohort, rolled_back_at__isnull=True)
        .select_related("model_version", "previous")
        .first()
    )
    if last is None or last.model_version_id != cohort.active_model_id:
        raise ActivationError(f"Cohort '{cohort.name}' has no activation to roll back.")
    if last.previous is not None:
        check_can_activate(last.previous, cohort)
    ModelActivation.objects.filter(pk=last.pk).update(
        rolled_back_at=timezone.now(),
        rolled_back_by=actor if actor is not None and actor.is_authenticated else None,
    )
    Cohort.objects.filter(pk=cohort.pk).update(active_model=last.previous)
    if not Cohort.objects.filter(active_model=last.model_version).exists():
        ModelVersion.objects.filter(pk=last.model_version_id).update(active=False)
    audit.record(
        actor,
        "model.rollback",
        last.model_version,
        request=request,
        cohort=cohort.pk,
        restored=last.previous_id,
        reason=reason,
    )
    last.refresh_from_db()
    return last
