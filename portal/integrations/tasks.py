"""Webhook deliveries run on the ``cpu`` queue, never inside the request that caused them.

The task lives beside the delivery code (``portal.integrations.webhooks.deliver_webhooks``);
this module is where Celery's autodiscovery finds it.
"""

from __future__ import annotations

from portal.integrations.webhooks import deliver_webhooks

__all__ = ["deliver_webhooks"]
