"""The v1 REST API: one ViewSet per resource on a router, extras as ``@action``.

Every queryset is filtered by cohort membership first (``portal.cases.access.visible``), so objects of
other cohorts answer 404; role checks on writes answer 403.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate, login, logout
from django.db import transaction
from django.db.models import OuterRef
from django.middleware.csrf import get_token
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.authentication import SessionAuthentication
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, Throttled, ValidationError
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.analyses.models import AnalysisJob, ModelVersion, Prediction
from portal.api import serializers as s
from portal.api.exceptions import (
    Conflict,
    PreconditionFailed,
)
from portal.api.filters import QueryParamFilter
from portal.api.models import ApiToken
from portal.api.permissions import CohortRolePermission, IsAdmin, IsAdminOrReadOnly
from portal.cases.access import INTEGRATION, PATHOLOGIST, is_admin, require_role, visible
from portal.cases.models import Case, Cohort, Slide
from portal.cases.worklist import DEFAULT_QUEUE, QUEUES, UnknownQueue, worklist
from portal.reviews import audit, geojson, signing
from portal.reviews.models import Annotation, AuditEvent, Diagnosis, SecondOpinionRequest


class FhirJSONRenderer(JSONRenderer):
    """FHIR's own media type, for clients that ask with ``Accept: application/fhir+json``."""

    media_type = "application/fhir+json"
    format = "fhir"


DETAIL = inline_serializer("Detail", {"detail": serializers.CharField()})
# Each viewset's ``error_responses`` ({action: {status: why}}) lists the refusals only its own
# actions give; portal.api.schema adds those every operation shares (401, 403, 404, 429, ...).
IDENTITY_FROZEN = (
    "The case is signed: its patient, accession number and cohort are locked "
    "(an admin corrects them with amend-identity)."
)
ANNOTATIONS_LOCKED = "The case is signed: its annotations are locked."
NO_SUCH_SLIDE = "No such slide among your cohorts' (?slide=<id>)."
STALE_VERSION = "The object changed since you read it (If-Match); reload it and apply again."
CLOSED_OPINION = "The request is already answered or closed."
SIGNED_DIAGNOSIS = "A signed diagnosis never changes; amend it with a reason."
PASSWORD_LOCKOUT = "Too many wrong passwords: the account is locked; retry after Retry-After."
WRONG_PASSWORD = "The password is not yours, or your role in the cohort does not allow this."


def _expected_version(request) -> int | None:
    """The row version the client read: ``If-Match: "3"`` (or W/"3") or a ``row_version`` field."""
    header = request.headers.get("If-Match")
    if header:
        value = header.strip().removeprefix("W/").strip('"')
        if not value.isdigit() or len(value) > 18:
            raise ValidationError(
                {"If-Match": f'expected a row version like "3", got {header!r:.40}'}
            )
        return int(value)
    raw = request.data.get("row_version") if hasattr(request.data, "get") else None
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | str) or not str(raw).isdigit():
        raise ValidationError({"row_version": "must be a positive integer"})
    return int(raw)


class CohortViewSet(viewsets.ModelViewSet):
    """Cohorts you belong to (all of them for admins). Only admins create or change them."""

    serializer_class = s.CohortSerializer
    permission_classes = [IsAdminOrReadOnly]
    search_fields = ["name", "slug", "description"]
    ordering_fields = ["name", "created_at"]

    def get_queryset(self):
        return visible(Cohort.objects.all(), self.request.user, "pk")


class CaseViewSet(viewsets.ModelViewSet):
    """Cases of your cohorts. Integrations and admins create them; only admins delete them."""

    serializer_class = s.CaseSerializer
    permission_classes = [CohortRolePermission]
    write_roles = (INTEGRATION,)
    cohort_path = "cohort"
    filter_params = {
        "cohort": ("cohort_id", int),
        "status": ("status", [c for c, _ in Case.STATUSES]),
        "priority": ("priority", [c for c, _ in Case.PRIORITIES]),
        "patient_id": ("patient_id", str),
        "accession_number": ("accession_number", str),
    }
    search_fields = ["patient_id", "accession_number", "clinical_question"]
    ordering_fields = ["created_at", "updated_at", "priority", "status", "accession_number"]
    error_responses = {
        "update": {409: IDENTITY_FROZEN},
        "partial_update": {409: IDENTITY_FROZEN},
        "amend_identity": {409: "Nothing to change: give a new patient_id or accession_number."},
        "fhir": {409: "Only signed cases have a diagnostic report; sign the diagnosis first."},
    }

    def get_queryset(self):
        cases = Case.objects.select_related("created_by").prefetch_related("slides")
        return visible(cases, self.request.user, "cohort")

    def perform_create(self, serializer):
        cohort = serializer.validated_data["cohort"]
        require_role(self.request.user, cohort.pk, self.write_roles, "create cases")
        serializer.save(created_by=self.request.user)

    def perform_update(self, serializer):
        cohort = serializer.validated_data.get("cohort")
        if cohort is not None:
            require_role(self.request.user, cohort.pk, self.write_roles, "move cases into it")
        frozen = signing.check_identity_frozen(
            serializer.instance, serializer.validated_data, self.request.user, self.request
        )
        if frozen:
            raise Conflict(
                f"This case is signed: its {', '.join(sorted(frozen))} cannot change. An admin "
                "corrects them with POST /api/v1/cases/<id>/amend-identity/ and a reason."
            )
        serializer.save()

    @extend_schema(
        request=s.CaseIdentityAmendSerializer,
        responses=s.CaseSerializer,
    )
    @action(detail=True, methods=["post"], url_path="amend-identity", permission_classes=[IsAdmin])
    def amend_identity(self, request, pk=None):
        """Correct a signed case's patient id or accession number (admins; audited)."""
        case = self.get_object()
        body = s.CaseIdentityAmendSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        reason = body.validated_data.pop("reason").strip()
        if not signing.identity_changes(case, body.validated_data):
            raise Conflict("Nothing to change: give a new patient_id or accession_number.")
        case = signing.amend_identity(case, request.user, body.validated_data, reason, request)
        return Response(self.get_serializer(case).data)

    def perform_destroy(self, case):
        if not is_admin(self.request.user):
            raise PermissionDenied("Only admins can delete cases.")
        case.delete()

    def retrieve(self, request, *args, **kwargs):
        case = self.get_object()
        if case.is_signed:
            audit.record(request.user, "case.view", case, request=request)
        return Response(self.get_serializer(case).data)

    @extend_schema(responses={200: OpenApiResponse(description="FHIR R4 DiagnosticReport (JSON)")})
    @action(
        detail=True,
        methods=["get"],
        url_path="fhir",
        renderer_classes=[JSONRenderer, FhirJSONRenderer],
    )
    def fhir(self, request, pk=None):
        """FHIR R4 DiagnosticReport of a signed case."""
        case = self.get_object()
        if not case.diagnoses.filter(status=Diagnosis.SIGNED).exists():
            raise Conflict("Only signed cases have a diagnostic report; sign the diagnosis first.")
        from portal.integrations.fhir import diagnostic_report

        report = diagnostic_report(case)
        audit.record(request.user, "fhir.export", case, request=request)
        return Response(report)


class SlideViewSet(viewsets.ReadOnlyModelViewSet):
    """Slide records of your cohorts' cases (files arrive through the upload endpoint)."""

    serializer_class = s.SlideSerializer
    filter_params = {
        "case": ("case_id", int),
        "cohort": ("case__cohort_id", int),
        "status": ("status", [c for c, _ in Slide.STATUSES]),
        "sha256": ("sha256", str),
    }
    search_fields = ["original_name"]
    ordering_fields = ["created_at", "original_name", "size_bytes"]

    def get_queryset(self):
        slides = Slide.objects.select_related("case")
        return visible(slides, self.request.user, "case__cohort")


class ModelVersionViewSet(viewsets.ReadOnlyModelViewSet):
    """Registered model bundles. Admins activate them."""

    serializer_class = s.ModelVersionSerializer
    queryset = ModelVersion.objects.all()
    filter_params = {"task": ("task", str), "active": ("active", bool), "name": ("name", str)}
    search_fields = ["name", "version", "task"]
    ordering_fields = ["name", "created_at"]
    error_responses = {
        "activate": {
            409: "The weights do not verify against their SHA-256, or a demo model would serve "
            "a cohort not marked as demo."
        }
    }

    @extend_schema(request=s.ActivateModelSerializer, responses=s.ModelVersionSerializer)
    @action(detail=True, methods=["post"], permission_classes=[IsAdmin])
    def activate(self, request, pk=None):
        """Mark the model active; with ``cohort``, also make it that cohort's model.

        Refused (409) when the weights do not verify against their SHA-256 or a demo model
        would go to a cohort not marked as demo; ``reason`` is required and audited.
        """
        from portal.analyses.lifecycle import ActivationError, activate, mark_active

        model = self.get_object()
        body = s.ActivateModelSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        cohort, reason = body.validated_data.get("cohort"), body.validated_data["reason"]
        try:
            if cohort is not None:
                activate(model, cohort, request.user, reason, request=request)
            else:
                mark_active(model, request.user, reason, request=request)
        except ActivationError as exc:
            raise Conflict(str(exc)) from exc
        model.refresh_from_db()
        return Response(self.get_serializer(model).data)


class AnalysisJobViewSet(viewsets.ReadOnlyModelViewSet):
    """Analysis jobs on your cohorts' slides, with stage and progress."""

    serializer_class = s.AnalysisJobSerializer
    filter_params = {
        "slide": ("slide_id", int),
        "case": ("slide__case_id", int),
        "state": ("state", [c for c, _ in AnalysisJob.STATES]),
    }
    ordering_fields = ["created_at", "finished_at"]
    error_responses = {
        "cancel": {409: "The job already ended; only queued or running jobs are cancelled."},
        "retry": {409: "Only failed or cancelled jobs are retried."},
    }

    def get_queryset(self):
        return visible(AnalysisJob.objects.all(), self.request.user, "slide__case__cohort")

    def _job_for_change(self, request, doing: str) -> AnalysisJob:
        job = self.get_object()
        cohort_id = Slide.objects.filter(pk=job.slide_id).values_list("case__cohort_id", flat=True)
        require_role(request.user, cohort_id.get(), (PATHOLOGIST, INTEGRATION), doing)
        return job

    @extend_schema(request=None, responses=s.AnalysisJobSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Stop a queued or running analysis (a running one stops at its next progress step)."""
        from portal.analyses.tasks import cancel_job

        job = self._job_for_change(request, "cancel analyses")
        if not cancel_job(job):
            raise Conflict(
                f"Job {job.pk} is {job.state}; only queued or running jobs can be cancelled."
            )
        audit.record(request.user, "job.cancel", job, case=job.slide.case, request=request)
        job.refresh_from_db()
        return Response(self.get_serializer(job).data)

    @extend_schema(request=None, responses={202: s.AnalysisJobSerializer})
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        """Queue a failed or cancelled analysis again (same slide, same model)."""
        from portal.analyses.tasks import request_analysis

        job = self._job_for_change(request, "retry analyses")
        if job.state not in AnalysisJob.RETRYABLE:
            raise Conflict(
                f"Job {job.pk} is {job.state}; only failed or cancelled jobs are retried."
            )
        request_analysis(job.slide, job.model_version)
        audit.record(request.user, "job.retry", job, case=job.slide.case, request=request)
        job.refresh_from_db()
        return Response(self.get_serializer(job).data, status=status.HTTP_202_ACCEPTED)


class PredictionViewSet(viewsets.ReadOnlyModelViewSet):
    """Slide-level predictions; per-patch attention and class evidence through ``scores``."""

    serializer_class = s.PredictionSerializer
    filter_params = {
        "slide": ("slide_id", int),
        "case": ("slide__case_id", int),
        "model_version": ("model_version_id", int),
        "predicted_class": ("predicted_class", str),
    }
    ordering_fields = ["created_at", "confidence"]

    def get_queryset(self):
        predictions = Prediction.objects.select_related("model_version")
        return visible(predictions, self.request.user, "slide__case__cohort")

    @extend_schema(responses=s.PredictionScoresSerializer)
    @action(detail=True, methods=["get"])
    def scores(self, request, pk=None):
        """Per-patch attention and class evidence (one value per grid cell, grid order)."""
        return Response(s.PredictionScoresSerializer(self.get_object()).data)


SLIDE_PARAM = OpenApiParameter("slide", int, required=True, description="Slide id")


@extend_schema_view(
    destroy=extend_schema(description="Mark the annotation deleted (kept in history).")
)
class AnnotationViewSet(viewsets.ModelViewSet):
    """Annotations in level-0 pixels; QuPath GeoJSON through ``import`` and ``export``."""

    serializer_class = s.AnnotationSerializer
    permission_classes = [CohortRolePermission]
    write_roles = (PATHOLOGIST,)
    cohort_path = "slide__case__cohort"
    filter_params = {
        "slide": ("slide_id", int),
        "case": ("slide__case_id", int),
        "classification": ("classification_name", str),
    }
    ordering_fields = ["created_at", "updated_at"]
    error_responses = {
        "create": {409: ANNOTATIONS_LOCKED},
        "update": {409: f"{ANNOTATIONS_LOCKED} Or it was deleted.", 412: STALE_VERSION},
        "partial_update": {409: f"{ANNOTATIONS_LOCKED} Or it was deleted.", 412: STALE_VERSION},
        "destroy": {
            400: "If-Match is not a row version.",
            409: f"{ANNOTATIONS_LOCKED} Or it was deleted.",
            412: STALE_VERSION,
        },
        "import_geojson": {404: NO_SUCH_SLIDE, 409: ANNOTATIONS_LOCKED},
        "export_geojson": {404: NO_SUCH_SLIDE},
    }

    def get_queryset(self):
        annotations = Annotation.objects.select_related("author", "slide").annotate(
            case_signed=signing.signed_case_exists(OuterRef("slide__case"))
        )
        if self.action == "list" and self.request.query_params.get("include_deleted") != "true":
            annotations = annotations.filter(deleted=False)
        return visible(annotations, self.request.user, "slide__case__cohort")

    @staticmethod
    def _check_unlocked(slide: Slide) -> None:
        if signing.is_signed(slide.case_id):
            raise Conflict(signing.ANNOTATIONS_LOCKED)

    def _audit(self, action: str, annotation: Annotation) -> None:
        audit.record(
            self.request.user,
            action,
            annotation,
            case=annotation.slide.case,
            request=self.request,
            slide=annotation.slide_id,
            version=annotation.version,
        )

    def _check_author(self, annotation: Annotation) -> None:
        self._check_unlocked(annotation.slide)
        if annotation.author_id != self.request.user.pk and not is_admin(self.request.user):
            raise PermissionDenied("Only the annotation's author (or an admin) can change it.")
        if annotation.deleted:
            raise Conflict("This annotation was deleted.")
        expected = _expected_version(self.request)
        if expected is not None and expected != annotation.version:
            raise PreconditionFailed(
                f"Annotation {annotation.pk} is at version {annotation.version}, not {expected}; "
                "reload it and apply your change again."
            )

    def perform_create(self, serializer):
        slide = serializer.validated_data["slide"]
        require_role(self.request.user, slide.case.cohort_id, self.write_roles, "annotate")
        self._check_unlocked(slide)
        with transaction.atomic():
            annotation = serializer.save(author=self.request.user)
            annotation.snapshot(self.request.user)
            self._audit("annotation.create", annotation)

    def perform_update(self, serializer):
        self._check_author(serializer.instance)
        with transaction.atomic():
            annotation = serializer.save(version=serializer.instance.version + 1)
            annotation.snapshot(self.request.user)
            self._audit("annotation.update", annotation)

    def perform_destroy(self, annotation):
        self._check_author(annotation)
        with transaction.atomic():
            annotation.deleted = True
            annotation.version += 1
            annotation.save(update_fields=["deleted", "version", "updated_at"])
            annotation.snapshot(self.request.user)
            self._audit("annotation.delete", annotation)

    @extend_schema(responses=s.AnnotationVersionSerializer(many=True))
    @action(detail=True, methods=["get"], pagination_class=None, filter_backends=[])
    def history(self, request, pk=None):
        """Every version of the annotation, oldest first."""
        annotation = self.get_object()
        versions = annotation.versions.select_related("edited_by")
        return Response(s.AnnotationVersionSerializer(versions, many=True).data)

    def _slide_from_query(self) -> Slide:
        raw = self.request.query_params.get("slide", "")
        if not raw.isdigit() or len(raw) > 18:
            raise ValidationError({"slide": "give the slide id as ?slide=<id>"})
        slides = visible(Slide.objects.select_related("case"), self.request.user, "case__cohort")
        return get_object_or_404(slides, pk=int(raw))

    @extend_schema(
        parameters=[
            SLIDE_PARAM,
            OpenApiParameter(
                "mode",
                str,
                enum=["merge", "replace"],
                description="merge (default): add to the slide's annotations; replace: delete "
                "your own annotations on the slide first.",
            ),
        ],
        request={"application/json": s.FEATURE_COLLECTION_SCHEMA},
        responses={201: s.ImportResultSerializer},
    )
    @action(detail=False, methods=["post"], url_path="import", filter_backends=[])
    def import_geojson(self, request):
        """Create one annotation per feature of a GeoJSON FeatureCollection (all or nothing)."""
        slide = self._slide_from_query()
        require_role(request.user, slide.case.cohort_id, self.write_roles, "annotate")
        self._check_unlocked(slide)
        mode = request.query_params.get("mode", "merge")
        if mode not in ("merge", "replace"):
            raise ValidationError({"mode": "mode is 'merge' (keep existing) or 'replace'"})
        bounds = (slide.width, slide.height) if slide.width else None
        try:
            features = geojson.split_multipoints(geojson.features_of(request.data))
            parsed = [self._parse_feature(i, f, bounds) for i, f in enumerate(features)]
        except geojson.GeometryError as exc:
            raise ValidationError({"detail": str(exc)}) from exc
        replaced = 0
        with transaction.atomic():
            if mode == "replace":  # the importer's own annotations (an admin's: all) go
                mine = slide.annotations.filter(deleted=False)
                if not is_admin(request.user):
                    mine = mine.filter(author=request.user)
                for annotation in mine.select_for_update():
                    annotation.deleted = True
                    annotation.version += 1
                    annotation.save(update_fields=["deleted", "version", "updated_at"])
                    annotation.snapshot(request.user)
                    replaced += 1
            created = [
                Annotation.objects.create(slide=slide, author=request.user, **p) for p in parsed
            ]
            for annotation in created:
                annotation.snapshot(request.user)
            audit.record(
                request.user,
                "annotation.import",
                slide,
                case=slide.case,
                request=request,
                count=len(created),
                mode=mode,
                replaced=replaced,
            )
        return Response(
            {"created": len(created), "replaced": replaced, "ids": [a.pk for a in created]},
            status=201,
        )

    @staticmethod
    def _parse_feature(index: int, feature, bounds) -> dict:
        try:
            return geojson.parse_feature(feature, bounds)
        except geojson.GeometryError as exc:
            raise geojson.GeometryError(f"feature {index}: {exc}") from exc

    @extend_schema(
        parameters=[
            SLIDE_PARAM,
            OpenApiParameter(
                "frame",
                str,
                enum=["slide", "source"],
                description="slide (default): this file's level-0 pixels; source: the original "
                "scan's pixels, from the export's recorded source size (QuPath on the original).",
            ),
        ],
        responses={
            200: OpenApiResponse(response=s.FEATURE_COLLECTION_SCHEMA, description="GeoJSON")
        },
    )
    @action(
        detail=False, methods=["get"], url_path="export", filter_backends=[], pagination_class=None
    )
    def export_geojson(self, request):
        """The slide's live annotations as a QuPath-readable GeoJSON FeatureCollection."""
        slide = self._slide_from_query()
        frame = request.query_params.get("frame", "slide")
        if frame not in ("slide", "source"):
            raise ValidationError({"frame": "frame is 'slide' (this file's pixels) or 'source'"})
        annotations = slide.annotations.filter(deleted=False).select_related("author")
        collection = geojson.feature_collection(annotations)
        frame_info = {"frame": "slide", "width": slide.width, "height": slide.height}
        if frame == "source":
            import openslide

            with openslide.OpenSlide(slide.path) as opened:
                source = geojson.source_frame(opened.properties, slide.width, slide.height)
            if source is None:
                raise ValidationError(
                    {
                        "frame": "this slide records no original scan (it is not a LowMag export); "
                        "export in the slide frame"
                    }
                )
            sx, sy = source["scale"]
            for feature in collection["features"]:
                feature["geometry"] = geojson.scale_geometry(feature["geometry"], sx, sy)
            frame_info = source
        collection["lowmag_frame"] = {**frame_info, "slide_mpp": slide.mpp}
        audit.record(
            request.user, "annotation.export", slide, case=slide.case, request=request, frame=frame
        )
        return Response(collection)


class DiagnosisViewSet(viewsets.ModelViewSet):
    """Diagnoses: drafts are edited with optimistic locking, then signed; signed ones are amended."""

    serializer_class = s.DiagnosisSerializer
    permission_classes = [CohortRolePermission]
    write_roles = (PATHOLOGIST,)
    cohort_path = "case__cohort"
    filter_params = {
        "case": ("case_id", int),
        "cohort": ("case__cohort_id", int),
        "status": ("status", [c for c, _ in Diagnosis.STATUSES]),
    }
    ordering_fields = ["created_at", "signed_at", "version"]
    error_responses = {
        "create": {409: "The case is signed (amend its latest diagnosis) or already has a draft."},
        "update": {
            409: SIGNED_DIAGNOSIS,
            412: STALE_VERSION,
            428: "Send the row version you read: If-Match or row_version.",
        },
        "partial_update": {
            409: SIGNED_DIAGNOSIS,
            412: STALE_VERSION,
            428: "Send the row version you read: If-Match or row_version.",
        },
        "destroy": {409: SIGNED_DIAGNOSIS},
        "sign": {
            403: WRONG_PASSWORD,
            409: "This diagnosis is already signed.",
            412: STALE_VERSION,
            429: PASSWORD_LOCKOUT,
        },
        "amend": {
            403: WRONG_PASSWORD,
            409: "Only the latest signed version is amended.",
            429: PASSWORD_LOCKOUT,
        },
    }

    def get_queryset(self):
        diagnoses = Diagnosis.objects.select_related("case", "author", "signed_by")
        return visible(diagnoses, self.request.user, "case__cohort")

    def _respond(self, diagnosis: Diagnosis, code: int = 200) -> Response:
        response = Response(self.get_serializer(diagnosis).data, status=code)
        response["ETag"] = f'"{diagnosis.row_version}"'
        return response

    def retrieve(self, request, *args, **kwargs):
        diagnosis = self.get_object()
        if diagnosis.case.is_signed:
            audit.record(request.user, "diagnosis.view", diagnosis, request=request)
        return self._respond(diagnosis)

    def perform_create(self, serializer):
        case = serializer.validated_data["case"]
        require_role(self.request.user, case.cohort_id, self.write_roles, "write diagnoses")
        serializer.instance = signing.do_create_draft(
            case, self.request.user, serializer.validated_data
        )

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        self.perform_create(serializer)
        return self._respond(serializer.instance, status.HTTP_201_CREATED)

    @extend_schema(
        parameters=[OpenApiParameter("If-Match", str, OpenApiParameter.HEADER, required=False)],
        responses=s.DiagnosisSerializer,
    )
    def update(self, request, *args, **kwargs):
        partial = kwargs.pop("partial", False)
        with transaction.atomic():
            diagnosis = self._locked(self.get_object())
            signing.check_draft_editable(diagnosis, request.user)
            signing.check_row_version(diagnosis, _expected_version(request))
            serializer = self.get_serializer(diagnosis, data=request.data, partial=partial)
            serializer.is_valid(raise_exception=True)
            diagnosis = signing.do_edit_draft(diagnosis, serializer.validated_data)
        return self._respond(diagnosis)

    @extend_schema(
        parameters=[OpenApiParameter("If-Match", str, OpenApiParameter.HEADER, required=False)],
        responses=s.DiagnosisSerializer,
    )
    def partial_update(self, request, *args, **kwargs):
        return self.update(request, *args, partial=True, **kwargs)

    def perform_destroy(self, diagnosis):
        signing.check_draft_editable(diagnosis, self.request.user)
        diagnosis.delete()

    def _check_password(self, password: str) -> None:
        """The signer's own password; wrong ones count towards the account's lockout."""
        user = self.request.user
        http_request = self.request._request
        checked = authenticate(http_request, username=user.get_username(), password=password)
        if getattr(http_request, "axes_locked_out", False):
            raise Throttled(detail="Too many wrong passwords: this account is locked for now.")
        if checked is None or checked.pk != user.pk:
            raise PermissionDenied("The password is not correct; signing needs your own password.")

    @staticmethod
    def _locked(diagnosis: Diagnosis) -> Diagnosis:
        return Diagnosis.objects.select_for_update().get(pk=diagnosis.pk)

    @extend_schema(
        request=s.SignSerializer,
        responses=s.DiagnosisSerializer,
    )
    @action(detail=True, methods=["post"])
    def sign(self, request, pk=None):
        """Sign a draft (re-enter your password). Signed diagnoses never change again."""
        body = s.SignSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        self._check_password(body.validated_data["password"])  # a failure must be kept
        with transaction.atomic():
            diagnosis = self._locked(self.get_object())
            require_role(request.user, diagnosis.case.cohort_id, self.write_roles, "sign diagnoses")
            signing.check_signable(diagnosis, request.user, body.validated_data["password"])
            signing.check_unchanged_since_read(diagnosis, _expected_version(request))
            signing.do_sign(diagnosis, request.user, request=request)
        return self._respond(diagnosis)

    @extend_schema(
        request=s.AmendSerializer,
        responses={201: s.DiagnosisSerializer},
    )
    @action(detail=True, methods=["post"])
    def amend(self, request, pk=None):
        """Amend a signed diagnosis: a new signed version with your reason, linked to this one."""
        body = s.AmendSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        content = dict(body.validated_data)
        self._check_password(content["password"])  # a failure must be kept
        with transaction.atomic():
            previous = self.get_object()
            require_role(request.user, previous.case.cohort_id, self.write_roles, "amend diagnoses")
            reason = signing.check_amendable(
                previous, request.user, content.pop("password"), content.pop("reason")
            )
            amendment = signing.do_amend(previous, request.user, reason, content, request=request)
        return self._respond(amendment, status.HTTP_201_CREATED)


class SecondOpinionViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    """Second-opinion requests: opened by pathologists or automatically on AI disagreement."""

    serializer_class = s.SecondOpinionSerializer
    permission_classes = [CohortRolePermission]
    write_roles = (PATHOLOGIST,)
    cohort_path = "case__cohort"
    filter_params = {
        "case": ("case_id", int),
        "status": ("status", [c for c, _ in SecondOpinionRequest.STATUSES]),
        "assigned_to": ("assigned_to_id", int),
    }
    ordering_fields = ["created_at"]
    error_responses = {
        action: {409: CLOSED_OPINION} for action in ("update", "partial_update", "answer", "close")
    }

    def get_queryset(self):
        opinions = SecondOpinionRequest.objects.select_related("case", "requested_by")
        return visible(opinions, self.request.user, "case__cohort")

    def perform_create(self, serializer):
        case = serializer.validated_data["case"]
        require_role(self.request.user, case.cohort_id, self.write_roles, "request second opinions")
        opinion = serializer.save(requested_by=self.request.user)
        audit.record(
            self.request.user, "second_opinion.open", opinion, case=case, request=self.request
        )

    def perform_update(self, serializer):
        opinion = serializer.instance
        if opinion.status == SecondOpinionRequest.CLOSED:
            raise Conflict("This request is closed; open a new one.")
        before = opinion.assigned_to_id
        opinion = serializer.save()
        if opinion.assigned_to_id != before:
            audit.record(
                self.request.user,
                "second_opinion.assign",
                opinion,
                case=opinion.case,
                request=self.request,
                assigned_to=opinion.assigned_to.get_username() if opinion.assigned_to else None,
            )

    @extend_schema(
        request=s.SecondOpinionAnswerSerializer,
        responses=s.SecondOpinionSerializer,
    )
    @action(detail=True, methods=["post"])
    def answer(self, request, pk=None):
        """Give the second opinion: the answer is kept with the request, which closes."""
        body = s.SecondOpinionAnswerSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        text = body.validated_data["answer"].strip()
        if not text:
            raise ValidationError({"answer": "Write the opinion before sending it."})
        visible_opinion = self.get_object()
        with transaction.atomic():
            locked = SecondOpinionRequest.objects.select_for_update()
            opinion = locked.select_related("case").get(pk=visible_opinion.pk)
            require_role(
                request.user, opinion.case.cohort_id, self.write_roles, "give second opinions"
            )
            if opinion.status == SecondOpinionRequest.CLOSED:
                raise Conflict("This request was already answered or closed.")
            if opinion.requested_by_id == request.user.pk:
                raise PermissionDenied(
                    "A second opinion comes from a colleague, not the requester."
                )
            opinion.give_answer(request.user, text)
            audit.record(
                request.user, "second_opinion.answer", opinion, case=opinion.case, request=request
            )
        return Response(self.get_serializer(opinion).data)

    @extend_schema(request=None, responses=s.SecondOpinionSerializer)
    @action(detail=True, methods=["post"])
    def close(self, request, pk=None):
        """Close the request (the second opinion was given)."""
        opinion = self.get_object()
        require_role(
            request.user, opinion.case.cohort_id, self.write_roles, "close second opinions"
        )
        if opinion.status == SecondOpinionRequest.CLOSED:
            raise Conflict("This request is already closed.")
        opinion.close()
        audit.record(request.user, "second_opinion.close", opinion, request=request)
        return Response(self.get_serializer(opinion).data)


WORKLIST_FILTERS: dict[str, Any] = {
    "cohort": int,
    "status": list(Case.Status.values),
    "priority": list(Case.Priority.values),
    "q": str,
}


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter(
                "queue",
                str,
                enum=list(QUEUES),
                description="unsigned: cases not yet signed (the default); mine: your drafts and "
                "second opinions assigned to you; second-opinion: cases with an open request; "
                "signed; all.",
            ),
            OpenApiParameter("cohort", int),
            OpenApiParameter("status", str, enum=WORKLIST_FILTERS["status"]),
            OpenApiParameter("priority", str, enum=WORKLIST_FILTERS["priority"]),
            OpenApiParameter("q", str, description="part of an accession number or patient id"),
        ]
    )
)
class WorklistViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Cases to work on, most urgent first (frozen, urgent, routine; then oldest)."""

    serializer_class = s.CaseSerializer

    def get_queryset(self):
        params = self.request.query_params
        filters = {
            name: QueryParamFilter.parse(name, params[name], kind)
            for name, kind in WORKLIST_FILTERS.items()
            if params.get(name)
        }
        try:
            cases = worklist(self.request.user, params.get("queue", DEFAULT_QUEUE), filters)
        except UnknownQueue as exc:
            raise ValidationError({"queue": str(exc)}) from exc
        return cases.prefetch_related("slides")


class ApiTokenViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """Integration tokens (admins only). The raw token is shown once, in the create response."""

    serializer_class = s.ApiTokenSerializer
    permission_classes = [IsAdmin]
    queryset = ApiToken.objects.select_related("user")
    filter_params = {"user": ("user_id", int)}

    @extend_schema(responses={201: s.ApiTokenCreatedSerializer})
    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token, raw = ApiToken.issue(
            serializer.validated_data["user"], serializer.validated_data.get("name", "")
        )
        audit.record(request.user, "token.create", token, request=request, user=token.user_id)
        data = self.get_serializer(token).data
        data["token"] = raw
        return Response(data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=s.ApiTokenSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        """Revoke the token; requests carrying it are refused from now on."""
        token = self.get_object()
        token.revoke()
        audit.record(request.user, "token.revoke", token, request=request)
        return Response(self.get_serializer(token).data)


class AuditEventViewSet(viewsets.ReadOnlyModelViewSet):
    """The audit trail (admins only, read-only)."""

    serializer_class = s.AuditEventSerializer
    permission_classes = [IsAdmin]
    queryset = AuditEvent.objects.all()
    filter_params = {
        "case": ("case_id", int),
        "actor": ("actor_id", int),
        "action": ("action", str),
        "object_type": ("object_type", str),
    }
    ordering_fields = ["created_at"]


class LoginView(APIView):
    """Session login for the browser: JSON ``{username, password}``; sets the session cookie.

    Like every unsafe request with a session, it needs the CSRF token: ``GET`` this endpoint
    first for the ``csrftoken`` cookie and send it back as ``X-CSRFToken``.
    """

    permission_classes = [AllowAny]
    authentication_classes: list = []

    @extend_schema(request=None, responses={200: DETAIL})
    def get(self, request):
        get_token(request)
        return Response({"detail": "CSRF cookie set; POST username and password with X-CSRFToken."})

    @extend_schema(
        request=s.LoginSerializer,
        responses={
            200: s.MeSerializer,
            400: OpenApiResponse(description="Invalid username or password."),
            403: OpenApiResponse(description="The CSRF token is missing (GET this URL first)."),
            429: OpenApiResponse(description=PASSWORD_LOCKOUT),
        },
    )
    def post(self, request):
        SessionAuthentication().enforce_csrf(request)
        body = s.LoginSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        user = authenticate(request._request, **body.validated_data)
        if user is None:
            raise ValidationError({"detail": "Invalid username or password."})
        login(request, user)
        get_token(request)  # a fresh CSRF cookie for the next unsafe request
        audit.record(user, "auth.login", request=request)
        return Response(s.MeSerializer(user).data)


class LogoutView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(request=None, responses={204: None})
    def post(self, request):
        logout(request)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MeView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(responses=s.MeSerializer)
    def get(self, request):
        return Response(s.MeSerializer(request.user).data)
