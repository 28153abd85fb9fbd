"""Response headers every page and API answer carries, and a busy database as a clean 503.

- ``Content-Security-Policy`` on every response: scripts, styles, images and connections from
  this origin only (the viewer is built into static files; nothing comes from a CDN).
- ``Cache-Control: no-store`` on every ``/api/`` answer that did not set its own policy: they
  carry patient data, which no browser or proxy cache should keep.
- A database that stays locked past the busy timeout (the embedded SQLite under heavy writes)
  answers JSON 503 with ``Retry-After`` instead of an HTML 500.
"""

from __future__ import annotations

import logging

from django.db import OperationalError
from django.http import JsonResponse

log = logging.getLogger(__name__)

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        # style attributes (confidence bars) and OpenSeadragon's inline styles
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "connect-src 'self' ws: wss:",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
RETRY_AFTER_S = 2


def is_database_busy(exc: BaseException) -> bool:
    """SQLite's "database is locked"/"database table is locked" after the busy timeout."""
    return isinstance(exc, OperationalError) and "locked" in str(exc).lower()


def busy_response() -> JsonResponse:
    response = JsonResponse(
        {"detail": "The database is busy with other writes; retry in a moment."}, status=503
    )
    response["Retry-After"] = str(RETRY_AFTER_S)
    return response


class SecurityHeadersMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        if request.path.startswith("/api/") and "Cache-Control" not in response.headers:
            response["Cache-Control"] = "no-store"
        return response

    def process_exception(self, request, exception):
        if is_database_busy(exception):
            log.warning("database busy on %s %s: %s", request.method, request.path, exception)
            return busy_response()
        return None
