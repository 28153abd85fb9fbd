"""Extract a cohort's patch features as one ``gpu``-queue task per slide.

``extract_slide_features`` wraps ``analysis.cohort.extract_slide``: idempotent (a slide whose
feature file already matches is skipped) and resumable (files appear complete or not at all),
so a re-delivered message or a re-run of a half-done cohort only does what is missing. With a
Redis broker N ``gpu`` workers extract N slides at once; without one the same task runs in
this process (``portal.core.dispatch``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

log = logging.getLogger(__name__)


@shared_task(
    name="portal.analyses.extraction.extract_slide_features",
    acks_late=True,
    autoretry_for=(OSError,),
    retry_backoff=True,
    max_retries=3,
)
def extract_slide_features(slide_path: str, out_dir: str, settings: dict[str, Any]) -> dict:
    from analysis.cohort import ExtractSettings, extract_slide
    from analysis.errors import AnalysisError

    try:
        result = extract_slide(slide_path, out_dir, ExtractSettings(**settings))
    except AnalysisError as exc:  # a bad slide is reported, never retried
        log.warning("feature extraction of %s failed: %s", slide_path, exc)
        return {"slide": slide_path, "status": "failed", "reason": str(exc)}
    log.info("feature extraction of %s: %s", slide_path, result["status"])
    return result
