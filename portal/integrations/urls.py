from django.urls import include, path
from rest_framework.routers import DefaultRouter

from portal.integrations import views

app_name = "integrations"

router = DefaultRouter(trailing_slash="/?")
router.include_root_view = False
router.register("webhooks", views.WebhookViewSet, basename="webhook")

urlpatterns = [path("", include(router.urls))]
