"""``/api/v1/...`` (the router), ``/api/schema/`` (OpenAPI 3) and ``/api/docs/`` (Swagger UI).

Swagger UI's JavaScript and CSS are served from the portal itself (drf-spectacular-sidecar),
never from a CDN: hospital networks often block them.
"""

from __future__ import annotations

from pathlib import Path

import drf_spectacular_sidecar
from django.http import FileResponse, Http404
from django.urls import include, path, re_path, reverse
from django.views.decorators.cache import cache_control
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import IsAuthenticated
from rest_framework.routers import DefaultRouter

from portal.api import lifecycle as lifecycle_api
from portal.api import views


class Router(DefaultRouter):
    """Every route answers with or without its trailing slash (``/cases/1/fhir`` too)."""

    def __init__(self) -> None:
        super().__init__()
        self.trailing_slash = "/?"


router = Router()
router.register("cohorts", views.CohortViewSet, basename="cohort")
router.register("cases", views.CaseViewSet, basename="case")
router.register("slides", views.SlideViewSet, basename="slide")
router.register("jobs", views.AnalysisJobViewSet, basename="job")
router.register("predictions", views.PredictionViewSet, basename="prediction")
router.register("models", views.ModelVersionViewSet, basename="modelversion")
router.register("annotations", views.AnnotationViewSet, basename="annotation")
router.register("diagnoses", views.DiagnosisViewSet, basename="diagnosis")
router.register("second-opinions", views.SecondOpinionViewSet, basename="secondopinion")
router.register("worklist", views.WorklistViewSet, basename="worklist")
router.register("tokens", views.ApiTokenViewSet, basename="apitoken")
router.register("audit-events", views.AuditEventViewSet, basename="auditevent")
router.register("training-runs", lifecycle_api.TrainingRunViewSet, basename="trainingrun")
router.register(
    "shadow-deployments", lifecycle_api.ShadowDeploymentViewSet, basename="shadowdeployment"
)
router.register("model-activations", lifecycle_api.ModelActivationViewSet, basename="activation")

SWAGGER_DIST = (
    Path(drf_spectacular_sidecar.__file__).parent
    / "static"
    / ("drf_spectacular_sidecar/swagger-ui-dist")
)
SWAGGER_ASSETS = {
    "swagger-ui.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "favicon-32x32.png",
}


@cache_control(max_age=86400, public=True)
def swagger_asset(request, name: str):
    if name not in SWAGGER_ASSETS:
        raise Http404(name)
    return FileResponse(open(SWAGGER_DIST / name, "rb"))  # noqa: SIM115 - FileResponse closes it


class SwaggerView(SpectacularSwaggerView):
    permission_classes = [IsAuthenticated]

    @staticmethod
    def _swagger_ui_resource(filename):
        return reverse("swagger-asset", args=[filename])

    @staticmethod
    def _swagger_ui_favicon():
        return reverse("swagger-asset", args=["favicon-32x32.png"])


urlpatterns = [
    re_path(r"^v1/auth/login/?$", views.LoginView.as_view(), name="auth-login"),
    re_path(r"^v1/auth/logout/?$", views.LogoutView.as_view(), name="auth-logout"),
    re_path(r"^v1/auth/me/?$", views.MeView.as_view(), name="auth-me"),
    path("v1/", include(router.urls)),
    path(
        "schema/", SpectacularAPIView.as_view(permission_classes=[IsAuthenticated]), name="schema"
    ),
    path("docs/", SwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("docs/assets/<str:name>", swagger_asset, name="swagger-asset"),
]
