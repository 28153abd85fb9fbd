"""Webhook deliveries run on the ``cpu`` queue, never inside the request that caused them."""

from __future__ import annotations

from celery import shared_task


@shared_task(acks_late=True, ignore_result=True)
def deliver_webhooks(delivery_ids: list[int]) -> None:
    """Attempt the new deliveries once; later attempts come from ``deliver_due``."""
    from portal.integrations.webhooks import attempt_new

    attempt_new(delivery_ids)
