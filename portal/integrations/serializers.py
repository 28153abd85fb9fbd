"""Webhooks as the API shows them: the secret appears once, in the answer to the creation."""

from __future__ import annotations

from urllib.parse import urlsplit

from rest_framework import serializers

from portal.api.serializers import VisibleRelatedField
from portal.cases.access import INTEGRATION
from portal.cases.models import Cohort
from portal.integrations import destinations
from portal.integrations.models import EVENTS, Webhook, WebhookDelivery


class WebhookSerializer(serializers.ModelSerializer):
    cohort = VisibleRelatedField(
        cohort_path="id", roles=(INTEGRATION,), queryset=Cohort.objects.all()
    )
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=EVENTS), allow_empty=False, max_length=len(EVENTS)
    )

    class Meta:
        model = Webhook
        fields = ["id", "cohort", "url", "events", "active", "created_at"]
        read_only_fields = ["id", "created_at"]

    def validate_url(self, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https"):
            raise serializers.ValidationError("Only http and https URLs can receive webhooks.")
        try:
            destinations.check_registration(value)
        except destinations.UnsafeDestinationError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        return value

    def validate_events(self, value: list[str]) -> list[str]:
        return sorted(set(value), key=EVENTS.index)


class WebhookCreatedSerializer(WebhookSerializer):
    """The creation answer: the only time the signing secret is shown."""

    secret = serializers.CharField(read_only=True)

    class Meta(WebhookSerializer.Meta):
        fields = WebhookSerializer.Meta.fields + ["secret"]


class WebhookDeliverySerializer(serializers.ModelSerializer):
    class Meta:
        model = WebhookDelivery
        fields = [
            "id",
            "event",
            "payload",
            "status",
            "attempts",
            "last_status_code",
            "last_error",
            "next_attempt_at",
            "delivered_at",
            "created_at",
        ]
        read_only_fields = fields
