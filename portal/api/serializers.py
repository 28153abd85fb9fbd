"""Serializers of the v1 API. Relations that accept ids only accept objects the user can see."""

from __future__ import annotations

import re

from django.contrib.auth import get_user_model
from drf_spectacular.utils import extend_schema_field, extend_schema_serializer
from rest_framework import serializers

from portal.analyses.models import AnalysisJob, ModelVersion, Prediction
from portal.api.models import ApiToken
from portal.cases.access import PATHOLOGIST, is_admin, role_in, visible
from portal.cases.models import Case, Cohort, Membership, Slide
from portal.reviews.geojson import GeometryError, validate_color, validate_geometry
from portal.reviews.models import Annotation, AuditEvent, Diagnosis, SecondOpinionRequest

User = get_user_model()


class VisibleRelatedField(serializers.PrimaryKeyRelatedField):
    """A related id restricted to the objects the requesting user may use.

    ``cohort_path`` leads from the related model to its cohort; ``roles`` narrows to cohorts
    where the user holds one of them (admins are never narrowed). An id outside that set reads
    exactly like a missing one.
    """

    def __init__(self, *, cohort_path: str, roles: tuple[str, ...] | None = None, **kwargs):
        self.cohort_path = cohort_path
        self.roles = roles
        super().__init__(**kwargs)

    def get_queryset(self):
        queryset = super().get_queryset()
        request = self.context.get("request")
        return visible(queryset, getattr(request, "user", None), self.cohort_path, self.roles)


class UsernameField(serializers.SlugRelatedField):
    def __init__(self, **kwargs):
        super().__init__(slug_field="username", read_only=True, **kwargs)


class CohortSerializer(serializers.ModelSerializer):
    my_role = serializers.SerializerMethodField()

    class Meta:
        model = Cohort
        fields = [
            "id",
            "name",
            "slug",
            "description",
            "required_magnification",
            "is_demo",
            "active_model",
            "created_at",
            "my_role",
        ]
        read_only_fields = ["active_model", "created_at"]
        extra_kwargs = {"required_magnification": {"min_value": 0.1, "max_value": 100.0}}

    def validate_is_demo(self, is_demo: bool) -> bool:
        model = self.instance.active_model if self.instance is not None else None
        if not is_demo and model is not None and model.is_demo:
            raise serializers.ValidationError(
                f"the cohort's active model {model} is a demo model; activate a clinical model "
                "before marking the cohort as not demo"
            )
        return is_demo

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_my_role(self, cohort: Cohort) -> str | None:
        return role_in(self.context["request"].user, cohort.pk)


class SlideBriefSerializer(serializers.ModelSerializer):
    class Meta:
        model = Slide
        fields = ["id", "original_name", "status", "magnification"]


class CaseSerializer(serializers.ModelSerializer):
    cohort = VisibleRelatedField(queryset=Cohort.objects.all(), cohort_path="pk")
    created_by = UsernameField(allow_null=True)
    slides = SlideBriefSerializer(many=True, read_only=True)

    class Meta:
        model = Case
        fields = [
            "id",
            "cohort",
            "patient_id",
            "accession_number",
            "clinical_question",
            "priority",
            "status",
            "created_by",
            "created_at",
            "updated_at",
            "slides",
        ]
        read_only_fields = ["status", "created_at", "updated_at"]


class CaseIdentityAmendSerializer(serializers.Serializer):
    patient_id = serializers.CharField(max_length=100, required=False)
    accession_number = serializers.CharField(max_length=100, required=False)
    reason = serializers.CharField(max_length=2000, help_text="Why the identity is corrected.")

    def validate_reason(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("A correction needs a reason.")
        return value


_SERVER_PATH = re.compile(r"(?<![\w:/.])(?:/[^/\s'\"():,;]+)+/([^/\s'\"():,;]+)")


def without_server_paths(text: str) -> str:
    """``/srv/lowmag/slides/7/a.svs`` -> ``a.svs``: messages name files, never server paths."""
    return _SERVER_PATH.sub(r"\1", text or "")


class SlideSerializer(serializers.ModelSerializer):
    cohort = serializers.IntegerField(source="case.cohort_id", read_only=True)

    class Meta:
        model = Slide
        exclude = ["file"]
        read_only_fields = [f.name for f in Slide._meta.fields if f.name != "file"]

    def to_representation(self, slide: Slide) -> dict:
        data = super().to_representation(slide)
        data["failure_reason"] = without_server_paths(data.get("failure_reason", ""))
        return data


class ModelVersionSerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelVersion
        # The validation report names cases of one cohort: it is shown on the model card only.
        # Where the bundle lies on the server is nobody's business outside it.
        exclude = ["report", "bundle_path"]
        read_only_fields = [
            f.name for f in ModelVersion._meta.fields if f.name not in ("report", "bundle_path")
        ]


class ActivateModelSerializer(serializers.Serializer):
    cohort = serializers.PrimaryKeyRelatedField(
        queryset=Cohort.objects.all(),
        required=False,
        allow_null=True,
        help_text="Also make this the cohort's model for new analyses.",
    )
    reason = serializers.CharField(
        max_length=2000, help_text="Why this version is activated (kept in the audit trail)."
    )


class AnalysisJobSerializer(serializers.ModelSerializer):
    class Meta:
        model = AnalysisJob
        exclude = ["claimed_by", "lease_expires_at"]  # which worker holds it: internal
        read_only_fields = [f.name for f in AnalysisJob._meta.fields]

    def to_representation(self, job: AnalysisJob) -> dict:
        data = super().to_representation(job)
        data["error"] = without_server_paths(data.get("error", ""))
        return data


class PredictionSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model_version.__str__", read_only=True)
    n_instances = serializers.SerializerMethodField()
    grid_shape = serializers.SerializerMethodField()

    class Meta:
        model = Prediction
        exclude = ["instance_scores", "grid", "clusters", "evidence_scores"]
        read_only_fields = [f.name for f in Prediction._meta.fields]

    def get_n_instances(self, prediction: Prediction) -> int:
        return len(bytes(prediction.instance_scores)) // 2

    @extend_schema_field(
        {
            "type": "object",
            "properties": {"n_rows": {"type": "integer"}, "n_cols": {"type": "integer"}},
        }
    )
    def get_grid_shape(self, prediction: Prediction) -> dict:
        grid = prediction.grid or {}
        return {"n_rows": grid.get("n_rows", 0), "n_cols": grid.get("n_cols", 0)}


def _rounded(values) -> list[float]:
    return [round(float(v), 4) for v in values]


@extend_schema_serializer(deprecate_fields=["scores"])
class PredictionScoresSerializer(serializers.Serializer):
    """A prediction's per-patch values, one per grid cell in grid order (see ``grid``)."""

    grid = serializers.JSONField(
        help_text="n_rows, n_cols, l0_patch_size (level-0 pixels) and grid_rc of the cells."
    )
    attention = serializers.ListField(
        child=serializers.FloatField(),
        help_text="Attention: where the model looked. Class-agnostic, so a benign slide has "
        "hot cells too; the heatmap's score layer.",
    )
    evidence = serializers.ListField(
        child=serializers.FloatField(),
        allow_null=True,
        help_text="Signed class evidence for evidence_class, in logit units: positive argues "
        "for the class, negative against it; the heatmap's evidence layer. Null when the model "
        "gives none (TransMIL) and for predictions made before class evidence was stored.",
    )
    evidence_class = serializers.CharField(
        allow_null=True,
        help_text="The class the evidence is for: the predicted class, or for a reference call "
        "(normal, benign, ...) the most probable other class. Null without evidence.",
    )
    scores = serializers.ListField(
        child=serializers.FloatField(),
        help_text="The attention again, for clients written before evidence; use attention.",
    )

    def to_representation(self, instance: Prediction) -> dict:
        attention = _rounded(instance.scores())
        evidence = instance.evidence()
        has_evidence = len(evidence) > 0
        return {
            "grid": instance.grid,
            "attention": attention,
            "evidence": _rounded(evidence) if has_evidence else None,
            "evidence_class": (instance.evidence_class or None) if has_evidence else None,
            "scores": attention,
        }


class ClassificationSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, allow_blank=True)
    color = serializers.ListField(
        child=serializers.IntegerField(min_value=0, max_value=255),
        min_length=3,
        max_length=3,
        allow_null=True,
        required=False,
    )


GEOMETRY_SCHEMA = {
    "type": "object",
    "description": "GeoJSON Point, LineString, Polygon or MultiPolygon in level-0 pixels.",
    "properties": {
        "type": {"type": "string", "enum": ["Point", "LineString", "Polygon", "MultiPolygon"]},
        "coordinates": {"type": "array", "items": {}},
    },
    "required": ["type", "coordinates"],
}


@extend_schema_field(GEOMETRY_SCHEMA)
class GeometryField(serializers.JSONField):
    pass


class AnnotationSerializer(serializers.ModelSerializer):
    slide = VisibleRelatedField(queryset=Slide.objects.all(), cohort_path="case__cohort")
    author = UsernameField()
    geometry = GeometryField()
    classification = ClassificationSerializer(required=False, allow_null=True)

    class Meta:
        model = Annotation
        fields = [
            "id",
            "slide",
            "author",
            "geometry",
            "name",
            "classification",
            "version",
            "deleted",
            "locked",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["version", "deleted", "created_at", "updated_at"]

    locked = serializers.SerializerMethodField(
        help_text="null, or why the annotation cannot change (its case is signed)."
    )

    def get_locked(self, annotation: Annotation) -> str | None:
        from portal.reviews.signing import ANNOTATIONS_LOCKED, is_signed

        signed = getattr(annotation, "case_signed", None)
        if signed is None:
            signed = is_signed(annotation.slide.case)
        return ANNOTATIONS_LOCKED if signed else None

    def to_representation(self, annotation: Annotation) -> dict:
        data = super().to_representation(annotation)
        data["classification"] = (
            {"name": annotation.classification_name, "color": annotation.classification_color}
            if annotation.classification_name or annotation.classification_color
            else None
        )
        return data

    def validate(self, attrs: dict) -> dict:
        slide = attrs.get("slide") or getattr(self.instance, "slide", None)
        if "geometry" in attrs:
            bounds = (slide.width, slide.height) if slide and slide.width else None
            try:
                attrs["geometry"] = validate_geometry(attrs["geometry"], bounds)
            except GeometryError as exc:
                raise serializers.ValidationError({"geometry": str(exc)}) from exc
        if "classification" in attrs:
            classification = attrs.pop("classification") or {}
            attrs["classification_name"] = classification.get("name", "")
            try:
                attrs["classification_color"] = validate_color(classification.get("color"))
            except GeometryError as exc:
                raise serializers.ValidationError({"classification": str(exc)}) from exc
        return attrs


class AnnotationVersionSerializer(serializers.Serializer):
    version = serializers.IntegerField()
    geometry = GeometryField()
    name = serializers.CharField()
    classification_name = serializers.CharField()
    classification_color = serializers.ListField(child=serializers.IntegerField(), allow_null=True)
    deleted = serializers.BooleanField()
    edited_by = serializers.CharField(source="edited_by.username")
    created_at = serializers.DateTimeField()


FEATURE_COLLECTION_SCHEMA = {
    "type": "object",
    "description": "GeoJSON FeatureCollection (QuPath export format), level-0 pixel coordinates.",
    "properties": {
        "type": {"type": "string", "enum": ["FeatureCollection"]},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "enum": ["Feature"]},
                    "geometry": GEOMETRY_SCHEMA,
                    "properties": {"type": "object", "additionalProperties": True},
                },
                "required": ["type", "geometry"],
            },
        },
    },
    "required": ["type", "features"],
}


class ImportResultSerializer(serializers.Serializer):
    created = serializers.IntegerField()
    replaced = serializers.IntegerField()
    ids = serializers.ListField(child=serializers.IntegerField())


class DiagnosisSerializer(serializers.ModelSerializer):
    case = VisibleRelatedField(queryset=Case.objects.all(), cohort_path="cohort")
    author = UsernameField()
    signed_by = UsernameField(allow_null=True)
    row_version = serializers.IntegerField(
        required=False,
        min_value=1,
        help_text="On update: the row_version you read (or send If-Match). A stale one gets 412.",
    )

    class Meta:
        model = Diagnosis
        fields = [
            "id",
            "case",
            "version",
            "status",
            "call",
            "diagnosis_text",
            "free_text",
            "amendment_reason",
            "previous",
            "ai_suggestion",
            "author",
            "signed_by",
            "signed_at",
            "content_hash",
            "row_version",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "version",
            "status",
            "amendment_reason",
            "previous",
            "ai_suggestion",
            "signed_at",
            "content_hash",
            "created_at",
            "updated_at",
        ]
        validators: list = []  # one draft per case and version numbers are the view's business

    def get_fields(self):
        fields = super().get_fields()
        if self.instance is not None and not isinstance(self.instance, list):
            fields["case"].read_only = True
        return fields


class SignSerializer(serializers.Serializer):
    password = serializers.CharField(
        write_only=True, help_text="Your account password, re-entered to sign."
    )
    row_version = serializers.IntegerField(required=False, min_value=1)


class AmendSerializer(serializers.Serializer):
    password = serializers.CharField(write_only=True)
    reason = serializers.CharField(max_length=2000, help_text="Why the signed diagnosis changes.")
    call = serializers.CharField(max_length=100, required=False, allow_blank=True)
    diagnosis_text = serializers.CharField(required=False, allow_blank=True)
    free_text = serializers.CharField(required=False, allow_blank=True)


class SecondOpinionAnswerSerializer(serializers.Serializer):
    answer = serializers.CharField(max_length=4000, help_text="The second opinion, in words.")


class SecondOpinionSerializer(serializers.ModelSerializer):
    case = VisibleRelatedField(queryset=Case.objects.all(), cohort_path="cohort")
    requested_by = UsernameField(allow_null=True)
    answered_by = UsernameField(allow_null=True)
    assigned_to = serializers.PrimaryKeyRelatedField(
        queryset=User.objects.filter(is_active=True), required=False, allow_null=True
    )
    # One answer for "no such user" and "not a pathologist of this cohort": user ids of other
    # cohorts cannot be probed through this field.
    NOT_ASSIGNABLE = "The assignee must be a pathologist of the case's cohort."

    class Meta:
        model = SecondOpinionRequest
        fields = [
            "id",
            "case",
            "diagnosis",
            "reason",
            "requested_by",
            "assigned_to",
            "status",
            "created_at",
            "closed_at",
            "answer",
            "answered_by",
        ]
        read_only_fields = [
            "diagnosis",
            "status",
            "created_at",
            "closed_at",
            "answer",
            "answered_by",
        ]

    def to_internal_value(self, data):
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError as exc:
            if isinstance(exc.detail, dict) and "assigned_to" in exc.detail:
                exc.detail["assigned_to"] = [self.NOT_ASSIGNABLE]
            raise

    def validate(self, attrs: dict) -> dict:
        case = attrs.get("case") or getattr(self.instance, "case", None)
        assignee = attrs.get("assigned_to")
        if assignee is not None and case is not None:
            member = Membership.objects.filter(
                user=assignee, cohort_id=case.cohort_id, role=PATHOLOGIST
            ).exists()
            if not member:
                raise serializers.ValidationError({"assigned_to": self.NOT_ASSIGNABLE})
        return attrs


class ApiTokenSerializer(serializers.ModelSerializer):
    user = serializers.PrimaryKeyRelatedField(queryset=User.objects.all())

    class Meta:
        model = ApiToken
        fields = ["id", "user", "name", "prefix", "created_at", "last_used_at", "revoked_at"]
        read_only_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    token = serializers.CharField(
        read_only=True, help_text="The raw token. Returned once, now; store it safely."
    )

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "token"]


class AuditEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = "__all__"
        read_only_fields = [f.name for f in AuditEvent._meta.fields]


class LoginSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=1000, write_only=True)


class MembershipBriefSerializer(serializers.ModelSerializer):
    cohort_name = serializers.CharField(source="cohort.name", read_only=True)

    class Meta:
        model = Membership
        fields = ["cohort", "cohort_name", "role"]


class MeSerializer(serializers.ModelSerializer):
    is_admin = serializers.SerializerMethodField()
    memberships = MembershipBriefSerializer(many=True, read_only=True)

    class Meta:
        model = User
        fields = ["id", "username", "first_name", "last_name", "email", "is_admin", "memberships"]

    def get_is_admin(self, user) -> bool:
        return is_admin(user)
