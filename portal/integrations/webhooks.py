"""Signed webhook deliveries with retries, through an outbox.

``emit(event, cohort, payload)`` records one delivery per subscribed webhook (the outbox
rows); once the surrounding transaction commits, a task on the ``cpu`` queue
(``portal.integrations.tasks.deliver_webhooks``) tries each, so a slow receiver never holds
a user's request. Each attempt connects to an address ``destinations.resolve`` allowed and
gives up after ``TOTAL_TIMEOUT_S`` whatever the receiver does; the log keeps the status code
and a short reason, never the receiver's answer. A delivery is an HTTP POST of JSON::

    {"id": <delivery id>, "event": "...", "cohort": "<slug>", "created_at": "...", "data": {...}}

with headers ``X-LowMag-Event``, ``X-LowMag-Delivery`` (the id), ``X-LowMag-Timestamp`` (Unix
seconds) and ``X-LowMag-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``.
A receiver recomputes the HMAC over the raw body and rejects stale timestamps.

Any 2xx answer counts as delivered. Otherwise the delivery stays pending and is retried with
exponential backoff by ``deliver_due()`` (the ``deliver_webhooks`` management command, or a
periodic task) until ``MAX_ATTEMPTS``, then it is marked failed.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import socket
import ssl
import threading
import time
from collections import Counter
from datetime import datetime, timedelta

from celery import shared_task
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Q
from django.utils import timezone

from portal.cases.models import Cohort, Membership
from portal.integrations import destinations
from portal.integrations.models import EVENTS, Webhook, WebhookDelivery

MAX_ATTEMPTS = 8
TIMEOUT_S = 5.0  # connecting, and each read
TOTAL_TIMEOUT_S = 10.0  # the whole attempt, however the receiver trickles
BACKOFF_BASE = timedelta(minutes=1)  # 1, 2, 4, ... minutes between attempts
BACKOFF_CAP = timedelta(hours=6)
CLAIM_LEASE = timedelta(minutes=2)  # a claimed delivery is not picked up again meanwhile
SIGNATURE_PREFIX = "sha256="


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``."""
    message = f"{timestamp}.".encode("ascii") + body
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver does: recompute and compare in constant time."""
    if not timestamp.isdigit():
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


def subscribers(event: str, cohort: Cohort) -> list[Webhook]:
    """Active webhooks of the cohort that want ``event`` and whose owner may still see it."""
    integration_users = Membership.objects.filter(
        cohort=cohort, role=Membership.INTEGRATION
    ).values("user_id")
    owners_allowed = Q(owner__is_staff=True) | Q(owner__is_superuser=True)
    owners_allowed |= Q(owner_id__in=integration_users)
    hooks = Webhook.objects.filter(cohort=cohort, active=True, owner__is_active=True)
    return [hook for hook in hooks.filter(owners_allowed) if event in hook.events]


def emit(
    event: str, cohort: Cohort, payload: dict, now: datetime | None = None
) -> list[WebhookDelivery]:
    """Record a delivery per subscriber; attempt them after the current transaction commits."""
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}; expected one of {', '.join(EVENTS)}")
    now = now or timezone.now()
    deliveries = [
        WebhookDelivery.objects.create(
            webhook=hook, event=event, payload=payload, next_attempt_at=now
        )
        for hook in subscribers(event, cohort)
    ]
    ids = [d.pk for d in deliveries]
    if ids:
        from portal.core.dispatch import dispatch

        dispatch(deliver_webhooks, ids)
    return deliveries


@shared_task(
    name="portal.integrations.tasks.deliver_webhooks",  # routed to the cpu queue
    acks_late=True,
    ignore_result=True,
)
def deliver_webhooks(delivery_ids: list[int]) -> None:
    """Attempt the new deliveries once; later attempts come from ``deliver_due``."""
    attempt_new(delivery_ids)


def deliver_due(now: datetime | None = None, limit: int = 100) -> dict[str, int]:
    """Attempt pending deliveries whose time has come; counts by resulting status."""
    now = now or timezone.now()
    due = (
        WebhookDelivery.objects.filter(
            status=WebhookDelivery.PENDING, next_attempt_at__lte=now, webhook__active=True
        )
        .select_related("webhook__cohort")
        .order_by("next_attempt_at", "id")[:limit]
    )
    counts: Counter[str] = Counter()
    for delivery in due:
        if _claim(delivery, now):
            counts[attempt(delivery, now)] += 1
    return dict(counts)


def attempt(delivery: WebhookDelivery, now: datetime | None = None) -> str:
    """POST the delivery once and record the outcome; returns the new status."""
    now = now or timezone.now()
    status_code, error, final = _post(delivery)
    delivery.attempts += 1
    delivery.last_status_code = status_code
    delivery.last_error = error
    if not error:
        delivery.status = WebhookDelivery.DELIVERED
        delivery.delivered_at = now
        delivery.next_attempt_at = None
    elif final or delivery.attempts >= MAX_ATTEMPTS:
        delivery.status = WebhookDelivery.FAILED
        delivery.next_attempt_at = None
    else:
        delivery.next_attempt_at = now + backoff(delivery.attempts)
    delivery.save()
    return delivery.status


def backoff(attempts: int) -> timedelta:
    """Wait after the ``attempts``-th failure: 1, 2, 4, ... minutes, at most 6 hours."""
    return min(BACKOFF_BASE * 2 ** max(attempts - 1, 0), BACKOFF_CAP)


def body_of(delivery: WebhookDelivery) -> bytes:
    envelope = {
        "id": delivery.pk,
        "event": delivery.event,
        "cohort": delivery.webhook.cohort.slug,
        "created_at": delivery.created_at.isoformat(),
        "data": delivery.payload,
    }
    return json.dumps(envelope, cls=DjangoJSONEncoder, separators=(",", ":")).encode("utf-8")


def attempt_new(ids: list[int]) -> None:
    now = timezone.now()
    pending = WebhookDelivery.objects.filter(pk__in=ids, status=WebhookDelivery.PENDING)
    for delivery in pending.select_related("webhook__cohort"):
        if _claim(delivery, now):
            attempt(delivery, now)


def _claim(delivery: WebhookDelivery, now: datetime) -> bool:
    """Take the delivery for this worker: only one concurrent caller wins the update."""
    lease_until = now + CLAIM_LEASE
    won = WebhookDelivery.objects.filter(
        pk=delivery.pk,
        status=WebhookDelivery.PENDING,
        next_attempt_at=delivery.next_attempt_at,
    ).update(next_attempt_at=lease_until)
    delivery.next_attempt_at = lease_until
    return won == 1


def _post(delivery: WebhookDelivery) -> tuple[int | None, str, bool]:
    """(HTTP status or None, error text (empty when delivered), whether retrying is futile)."""
    try:
        destination = destinations.resolve(delivery.webhook.url)
    except destinations.UnsafeDestinationError as exc:
        return None, f"refused: {exc}"[:500], True
    body = body_of(delivery)
    timestamp = int(time.time())
    headers = {
        "Host": destination.host_header,
        "Content-Type": "application/json",
        "User-Agent": "LowMag-Webhooks/1",
        "X-LowMag-Event": delivery.event,
        "X-LowMag-Delivery": str(delivery.pk),
        "X-LowMag-Timestamp": str(timestamp),
        "X-LowMag-Signature": sign(delivery.webhook.secret, timestamp, body),
    }
    try:
        code = send(destination, body, headers)
    except TimeoutError:
        return None, f"no answer within {TOTAL_TIMEOUT_S:g} s", False
    except (OSError, http.client.HTTPException) as exc:
        return None, f"could not deliver ({exc.__class__.__name__})", False
    return code, ("" if 200 <= code < 300 else f"HTTP {code}"), False


def send(destination: destinations.Destination, body: bytes, headers: dict) -> int:
    """POST to the checked address; the status code. Raises ``TimeoutError`` once
    ``TOTAL_TIMEOUT_S`` has passed, even while the receiver is still trickling bytes."""
    expired = threading.Event()
    current: dict[str, socket.socket] = {}

    def cut_off() -> None:
        expired.set()
        sock = current.get("sock")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(TOTAL_TIMEOUT_S, cut_off)
    timer.daemon = True
    timer.start()
    try:
        current["sock"] = socket.create_connection(
            (destination.address, destination.port), timeout=TIMEOUT_S
        )
        if destination.scheme == "https":
            context = ssl.create_default_context()
            current["sock"] = context.wrap_socket(current["sock"], server_hostname=destination.host)
        connection = http.client.HTTPConnection(destination.host, destination.port)
        connection.sock = current["sock"]
        try:
            connection.request("POST", destination.target, body=body, headers=headers)
            status = connection.getresponse().status  # the body is never read
        finally:
            connection.close()
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()
    if expired.is_set():  # cut off mid-headers: the answer is incomplete
        raise TimeoutError
    return status
