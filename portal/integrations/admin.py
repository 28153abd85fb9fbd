from django.contrib import admin

from portal.integrations.models import Webhook, WebhookDelivery


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    list_display = ("url", "cohort", "owner", "events", "active", "created_at")
    list_filter = ("active", "cohort")
    search_fields = ("url", "owner__username")
    exclude = ("secret",)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "event",
        "webhook",
        "status",
        "attempts",
        "last_status_code",
        "created_at",
    )
    list_filter = ("status", "event")
    readonly_fields = (
        "webhook",
        "event",
        "payload",
        "attempts",
        "last_status_code",
        "last_error",
        "delivered_at",
        "created_at",
    )
