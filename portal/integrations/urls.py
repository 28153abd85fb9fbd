from django.urls import include, path
from rest_framework.routers import DefaultRouter

from portal.integrations import views

app_name = "integrations"

# DRF takes a pattern here (documented), though the stubs type it as a bool.
router = DefaultRouter(trailing_slash="/?")  # type: ignore[arg-type]
router.include_root_view = False
router.register("webhooks", views.WebhookViewSet, basename="webhook")

urlpatterns = [path("", include(router.urls))]
