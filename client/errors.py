"""What ``lowmag send`` can fail with: each a ``SendError`` (an ``AnalysisError``) whose message
says what failed and what to do, so the command prints one line."""

from __future__ import annotations

from analysis.errors import AnalysisError


class SendError(AnalysisError):
    """Sending a slide to a LowMag server failed."""


class ServerUnreachableError(SendError):
    """The server did not answer (refused, timed out, name unknown) after every retry."""


class TokenRefusedError(SendError):
    """The server refused the token (401) or what it allows (403)."""


class CaseNotFoundError(SendError):
    """No such case among the cohorts the token may upload to."""


class SlideRefusedError(SendError):
    """The upload completed but ingest refused the slide; the message carries the server's reason."""


class AnalysisFailedError(SendError):
    """The slide's analysis job failed, was cancelled, or did not finish in time."""
