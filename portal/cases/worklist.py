"""The worklist: which cases a user has to work on, most urgent first.

One query serves the API (``/api/v1/worklist/``) and the worklist page, so the two always show
the same cases in the same order. The order is decided by the database before any slice:
frozen sections, then urgent, then routine cases; within a priority the oldest first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import models
from django.db.models import IntegerField, Q, QuerySet, Value, When

from portal.cases.access import visible
from portal.cases.models import Case

# queue -> what the page shows as its name
QUEUES = {
    "unsigned": "Not yet signed",
    "mine": "My drafts and second opinions",
    "second-opinion": "Open second opinions",
    "signed": "Signed",
    "all": "All cases",
}
DEFAULT_QUEUE = "unsigned"
FILTERS = ("cohort", "status", "priority", "q")

PRIORITY_RANK = models.Case(
    When(priority=Case.Priority.FROZEN, then=Value(0)),
    When(priority=Case.Priority.URGENT, then=Value(1)),
    default=Value(2),
    output_field=IntegerField(),
)
ORDER = ("rank", "created_at", "id")


class UnknownQueue(ValueError):
    """The queue named is not one of ``QUEUES``."""

    def __init__(self, queue: str):
        super().__init__(f"'{queue[:40]}' is not one of {', '.join(QUEUES)}")


def _queue(cases: QuerySet[Case], user, queue: str) -> QuerySet[Case]:
    # Relations are named by lookup strings, so this module imports no other app's models.
    if queue == "unsigned":
        return cases.exclude(status=Case.Status.SIGNED)
    if queue == "signed":
        return cases.filter(status=Case.Status.SIGNED)
    if queue == "mine":
        return cases.filter(
            Q(diagnoses__author=user, diagnoses__status="draft")
            | Q(second_opinions__assigned_to=user, second_opinions__status="open")
        )
    if queue == "second-opinion":
        return cases.filter(second_opinions__status="open")
    if queue == "all":
        return cases
    raise UnknownQueue(queue)


def worklist(
    user, queue: str = DEFAULT_QUEUE, filters: Mapping[str, Any] | None = None
) -> QuerySet[Case]:
    """The cases of ``queue`` that ``user`` may see, filtered, in worklist order.

    ``filters`` (all optional, already validated by the caller): ``cohort`` (id), ``status``,
    ``priority``, ``q`` (part of an accession number or patient id). Raises ``UnknownQueue``.
    """
    cases = _queue(visible(Case.objects.select_related("cohort"), user, "cohort"), user, queue)
    filters = filters or {}
    if filters.get("cohort") is not None:
        cases = cases.filter(cohort_id=filters["cohort"])
    if filters.get("status"):
        cases = cases.filter(status=filters["status"])
    if filters.get("priority"):
        cases = cases.filter(priority=filters["priority"])
    if filters.get("q"):
        query = str(filters["q"]).strip()[:100]
        cases = cases.filter(Q(accession_number__icontains=query) | Q(patient_id__icontains=query))
    # distinct() before ordering: a case with two drafts or two open requests is listed once.
    return cases.distinct().annotate(rank=PRIORITY_RANK).order_by(*ORDER)
