"""``/api/v1/integrations/webhooks/``: integration users and admins manage their own webhooks.

Create (answers with the secret, once), list, retrieve, update (url, events, active), delete,
and ``/webhooks/<id>/deliveries/`` (the delivery log, newest first). Only webhooks the user
owns are visible; a cohort can be chosen only where the user is an integration member (or
the user is an admin).
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from portal.integrations.models import Webhook
from portal.integrations.serializers import (
    WebhookCreatedSerializer,
    WebhookDeliverySerializer,
    WebhookSerializer,
)
from portal.reviews import audit


class WebhookViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = WebhookSerializer
    filter_params = {"cohort": ("cohort_id", int), "active": ("active", bool)}

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return Webhook.objects.none()
        return Webhook.objects.filter(owner=self.request.user).select_related("cohort")

    def get_serializer_class(self):
        if self.action == "create":
            return WebhookCreatedSerializer
        if self.action == "deliveries":
            return WebhookDeliverySerializer
        return WebhookSerializer

    def perform_create(self, serializer) -> None:
        hook = serializer.save(owner=self.request.user)
        audit.record(self.request.user, "webhook.create", obj=hook, request=self.request)

    def perform_destroy(self, instance: Webhook) -> None:
        audit.record(self.request.user, "webhook.delete", obj=instance, request=self.request)
        instance.delete()

    @extend_schema(responses=WebhookDeliverySerializer(many=True))
    @action(detail=True, methods=["get"])
    def deliveries(self, request: Request, pk=None) -> Response:
        hook = self.get_object()
        deliveries = hook.deliveries.order_by("-created_at", "-id")
        status = request.query_params.get("status")
        if status:
            deliveries = deliveries.filter(status=status)
        page = self.paginate_queryset(deliveries)
        data = WebhookDeliverySerializer(page, many=True).data
        return self.get_paginated_response(data)
