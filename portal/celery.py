"""The Celery app: Redis broker in production, the same task code run in-process by default.

Queues: ``gpu`` (analyses: model inference) and ``cpu`` (ingest, webhooks). A worker is
started per queue: ``celery -A portal worker -Q gpu -c 1`` on each GPU machine,
``celery -A portal worker -Q cpu`` elsewhere. With no ``REDIS_URL`` (the embedded default)
``portal.jobs.dispatch`` runs the task in a background thread of the web process instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import Celery  # noqa: E402
from celery.signals import worker_process_init  # noqa: E402

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _preload_models(**_: object) -> None:
    """A worker child with ``LOWMAG_PRELOAD_MODELS`` (the gpu queue's) loads the active models
    on its device before its first task."""
    from django.conf import settings

    if getattr(settings, "LOWMAG_PRELOAD_MODELS", False):
        from portal.analyses.tasks import preload_active_models

        preload_active_models()
