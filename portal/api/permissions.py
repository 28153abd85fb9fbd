"""DRF permission classes over the rules in ``portal.cases.access``."""

from __future__ import annotations

from rest_framework import permissions

from portal.cases.access import cohort_id_of, is_admin, require_role


class IsAdmin(permissions.BasePermission):
    message = "Only admins can do this."

    def has_permission(self, request, view) -> bool:
        return is_admin(request.user)


class IsAdminOrReadOnly(permissions.BasePermission):
    message = "Only admins can change this."

    def has_permission(self, request, view) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        return request.method in permissions.SAFE_METHODS or is_admin(request.user)


class CohortRolePermission(permissions.BasePermission):
    """Writes on a visible object need one of ``view.write_roles`` in the object's cohort."""

    def has_permission(self, request, view) -> bool:
        return bool(request.user and request.user.is_authenticated)

    def has_object_permission(self, request, view, obj) -> bool:
        if request.method in permissions.SAFE_METHODS:
            return True
        require_role(
            request.user,
            cohort_id_of(obj, view.cohort_path),
            view.write_roles,
            f"change this {obj._meta.verbose_name}",
        )
        return True
