"""The audit trail: one function that records what happened, by whom, from where."""

from __future__ import annotations

from django.db import models

from portal.reviews.models import AuditEvent


def _client_ip(request) -> str | None:
    if request is None:
        return None
    return request.META.get("REMOTE_ADDR") or None


def record(actor, action: str, obj: models.Model | None = None, case=None, request=None, **details):
    """Append an ``AuditEvent``; ``case`` defaults to ``obj.case`` (or ``obj`` for a Case)."""
    if case is None and obj is not None:
        case = obj if obj._meta.label == "cases.Case" else getattr(obj, "case", None)
    if actor is not None and not actor.is_authenticated:
        actor = None
    return AuditEvent.objects.create(
        actor=actor,
        actor_name=actor.get_username() if actor is not None else "",
        action=action,
        object_type=obj._meta.label_lower if obj is not None else "",
        object_id=str(obj.pk) if obj is not None else "",
        case=case,
        details=details,
        ip=_client_ip(request),
    )
