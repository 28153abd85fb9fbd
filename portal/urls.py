from django.contrib import admin
from django.urls import include, path

from portal.core.metrics import metrics
from portal.core.views import healthz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/v1/uploads/", include("portal.uploads.urls")),
    path("api/v1/integrations/", include("portal.integrations.urls")),
    path("api/", include("portal.api.urls")),
    path("", include("portal.analyses.urls")),
    path("", include("portal.viewer.urls")),
]
