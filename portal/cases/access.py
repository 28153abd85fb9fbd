"""Who sees what, and who may do what: the one place these rules live.

- admin (``is_staff`` or superuser): everything.
- pathologist: views, annotates and diagnoses in the cohorts they belong to.
- integration (LIS token): creates cases and reads results in its cohorts; never signs or annotates.

Visibility is enforced by filtering querysets on membership (``visible``), so an object outside
the user's cohorts answers 404 and its existence is never revealed. Role checks on writes
(``require_role``) answer 403 for objects the user can see. Every page, endpoint, websocket and
tile goes through these functions.
"""

from __future__ import annotations

from django.db.models import QuerySet
from rest_framework.exceptions import PermissionDenied

from portal.cases.models import Cohort, Membership

PATHOLOGIST = Membership.PATHOLOGIST
INTEGRATION = Membership.INTEGRATION


def is_admin(user) -> bool:
    return bool(user and user.is_authenticated and (user.is_staff or user.is_superuser))


def cohort_ids(user, roles: tuple[str, ...] | None = None) -> QuerySet:
    """Ids of the cohorts where ``user`` holds one of ``roles`` (any role when None)."""
    memberships = Membership.objects.filter(user=user)
    if roles:
        memberships = memberships.filter(role__in=roles)
    return memberships.values_list("cohort_id", flat=True)


def visible(
    queryset: QuerySet, user, cohort_path: str, roles: tuple[str, ...] | None = None
) -> QuerySet:
    """``queryset`` limited to rows whose cohort (reached through ``cohort_path``) is the user's.

    ``roles`` narrows to cohorts where the user holds one of them; admins are never narrowed.
    """
    if is_admin(user):
        return queryset
    if user is None or not user.is_authenticated:
        return queryset.none()
    return queryset.filter(**{f"{cohort_path}__in": cohort_ids(user, roles)})


def role_in(user, cohort_id: int) -> str | None:
    if is_admin(user):
        return "admin"
    return (
        Membership.objects.filter(user=user, cohort_id=cohort_id)
        .values_list("role", flat=True)
        .first()
    )


def require_role(user, cohort_id: int, roles: tuple[str, ...], doing: str) -> None:
    """Raise 403 unless ``user`` is an admin or holds one of ``roles`` in the cohort."""
    if is_admin(user) or role_in(user, cohort_id) in roles:
        return
    names = " or ".join(f"{r}s" for r in roles)
    cohort = Cohort.objects.filter(pk=cohort_id).values_list("name", flat=True).first()
    raise PermissionDenied(f"Only {names} of cohort '{cohort}' (or admins) can {doing}.")


def cohort_id_of(obj, cohort_path: str) -> int:
    """Follow ``cohort_path`` ("slide__case__cohort") from ``obj`` to the cohort's id."""
    *hops, last = cohort_path.split("__")
    for hop in hops:
        obj = getattr(obj, hop)
    return getattr(obj, f"{last}_id")
