"""Outgoing webhooks for laboratory information systems, and the log of their deliveries."""

from __future__ import annotations

import secrets

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import URLValidator
from django.db import models

EVENTS = ("prediction.ready", "diagnosis.signed", "diagnosis.amended")


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


class Webhook(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhooks"
    )
    cohort = models.ForeignKey("cases.Cohort", on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(max_length=500, validators=[URLValidator(schemes=["http", "https"])])
    # Stored as issued: the HMAC signature needs the raw secret, so it cannot be hashed. It is
    # shown to the owner once, at creation, and never returned by the API afterwards.
    secret = models.CharField(max_length=100, default=new_secret, editable=False)
    events = models.JSONField(default=list)  # a subset of EVENTS
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.url} ({self.cohort}: {', '.join(self.events)})"


class WebhookDelivery(models.Model):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    STATUSES = [(PENDING, "Pending"), (DELIVERED, "Delivered"), (FAILED, "Failed")]

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=50)
    payload = models.JSONField(
        default=dict, encoder=DjangoJSONEncoder
    )  # the event's data; the envelope is added on send
    status = models.CharField(max_length=10, choices=STATUSES, default=PENDING)
    attempts = models.IntegerField(default=0)
    last_status_code = models.IntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "webhook deliveries"
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"{self.event} -> {self.webhook.url} ({self.status}, {self.attempts} attempts)"
