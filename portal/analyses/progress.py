"""Live updates over Channels: job progress and worklist changes.

Group names: ``job.<id>`` (one analysis job), ``training.<id>`` (one training run) and
``cohort.<id>`` (every worklist showing that
cohort). Sending never fails the caller: a missing or unreachable channel layer only logs.
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)


def _send(group: str, message: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception as exc:  # noqa: BLE001 - live updates are best effort
        log.warning("live update to %s not sent: %s", group, exc)


def job_update(job_id: int, fields: dict) -> None:
    _send(f"job.{job_id}", {"type": "job.update", "job": job_id, **_jsonable(fields)})


def training_update(run_id: int, fields: dict) -> None:
    _send(f"training.{run_id}", {"type": "training.update", "run": run_id, **_jsonable(fields)})


def worklist_update(case) -> None:
    _send(
        f"cohort.{case.cohort_id}",
        {"type": "worklist.update", "case": case.pk, "status": case.status},
    )


def _jsonable(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if isinstance(v, str | int | float | bool | dict)}
