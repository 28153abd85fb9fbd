"""The viewer's background work: pre-rendering a new slide's tiles before anyone opens it."""

from __future__ import annotations

import logging

from celery import shared_task

log = logging.getLogger(__name__)


@shared_task(acks_late=True, ignore_result=True)
def pretile_slide(slide_id: int) -> int:
    """Pre-render the slide's DeepZoom tiles (coarse levels first) into its folder."""
    from portal.cases.models import Slide
    from portal.viewer.tileservice import pretile

    slide = Slide.objects.filter(pk=slide_id, status=Slide.Status.READY).first()
    if slide is None:
        return 0
    try:
        return pretile(slide.path)
    except Exception as exc:  # noqa: BLE001 - tiles then render on demand, as without it
        log.warning("pre-rendering tiles of slide %s failed: %s", slide_id, exc)
        return 0
