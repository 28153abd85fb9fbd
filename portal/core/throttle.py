"""Guessing protection: django-axes locks an account after repeated wrong passwords (API
login, page login, admin login and the signing password all count), DRF throttling slows down
wrong API tokens, and every failure and lockout lands in the audit trail.
"""

from __future__ import annotations

from django.contrib.auth.signals import user_login_failed
from django.dispatch import receiver
from django.http import JsonResponse
from rest_framework.throttling import SimpleRateThrottle

from portal.reviews import audit


def lockout_response(request, original_response=None, credentials=None):
    """Axes' answer to a locked account: JSON 429 with Retry-After, on pages and API alike."""
    from axes.helpers import get_cool_off

    cool_off = get_cool_off(request)
    seconds = int(cool_off.total_seconds()) if cool_off else 3600
    response = JsonResponse(
        {
            "detail": "Too many wrong passwords: this account is locked for "
            f"{max(1, seconds // 60)} minutes. An admin can unlock it sooner "
            "(manage.py axes_reset_username <username>)."
        },
        status=429,
    )
    response["Retry-After"] = str(seconds)
    return response


class WrongTokenThrottle(SimpleRateThrottle):
    """Wrong API tokens per client address (``LOWMAG_WRONG_TOKEN_RATE``)."""

    scope = "wrong_token"

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


@receiver(user_login_failed)
def _audit_failed_login(sender, credentials, request=None, **kwargs):
    audit.record(
        None,
        "auth.login_failed",
        request=request,
        username=str(credentials.get("username", ""))[:150],
        path=getattr(request, "path", "")[:200],
    )


def _audit_lockout(sender, request=None, username=None, ip_address=None, **kwargs):
    audit.record(None, "auth.locked_out", request=request, username=str(username or "")[:150])


def connect_lockout_signal() -> None:
    from axes.signals import user_locked_out

    user_locked_out.connect(_audit_lockout, dispatch_uid="portal-audit-lockout")
