"""API of the model lifecycle: training runs, shadow deployments, rollback (admins only).

- ``POST /api/v1/training-runs/`` ``{cohort, signed_from, signed_to, options?}``: check the
  training set and queue the run (400 with the reason on bad input; nothing is created);
  ``GET /api/v1/training-runs/<id>/``: state, stage and progress (live), the model it made.
- ``POST /api/v1/shadow-deployments/`` ``{candidate, cohort, min_signed?}``: run a candidate
  beside the active model; ``GET .../<id>/``: the comparison; ``POST .../<id>/stop/``.
- ``POST /api/v1/model-activations/rollback/`` ``{cohort, reason}``.
Activation itself: ``POST /api/v1/models/<id>/activate/`` (``portal/api/views.py``).
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from portal.analyses.lifecycle import ActivationError, rollback
from portal.analyses.models import ModelActivation, ShadowDeployment, TrainingRun
from portal.analyses.shadow import ShadowError, comparison, start_shadow, stop_shadow
from portal.analyses.training import start_training
from portal.analyses.trainingset import TrainingSetError
from portal.api.exceptions import Conflict
from portal.api.permissions import IsAdmin
from portal.cases.models import Cohort


class TrainingRunSerializer(serializers.ModelSerializer):
    class Meta:
        model = TrainingRun
        exclude = ["work_dir"]
        read_only_fields = [
            f.name for f in TrainingRun._meta.fields if f.name not in ("cohort", "options")
        ] + ["signed_from", "signed_to"]


class StartTrainingSerializer(serializers.Serializer):
    cohort = serializers.PrimaryKeyRelatedField(queryset=Cohort.objects.all())
    signed_from = serializers.DateField()
    signed_to = serializers.DateField()
    options = serializers.DictField(required=False, default=dict)


class ShadowDeploymentSerializer(serializers.ModelSerializer):
    class Meta:
        model = ShadowDeployment
        fields = "__all__"
        read_only_fields = [f.name for f in ShadowDeployment._meta.fields]


class StartShadowSerializer(serializers.Serializer):
    candidate = serializers.IntegerField()
    cohort = serializers.PrimaryKeyRelatedField(queryset=Cohort.objects.all())
    min_signed = serializers.IntegerField(min_value=1, default=10)


class RollbackSerializer(serializers.Serializer):
    cohort = serializers.PrimaryKeyRelatedField(queryset=Cohort.objects.all())
    reason = serializers.CharField(max_length=2000)


class ModelActivationSerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelActivation
        fields = "__all__"


class TrainingRunViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """Training and validation runs on signed cases (admins only)."""

    permission_classes = [IsAdmin]
    serializer_class = TrainingRunSerializer
    queryset = TrainingRun.objects.all()

    @extend_schema(request=StartTrainingSerializer, responses={202: TrainingRunSerializer})
    def create(self, request, *args, **kwargs):
        body = StartTrainingSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            run = start_training(
                data["cohort"],
                data["signed_from"],
                data["signed_to"],
                request.user,
                data["options"],
                request=request,
            )
        except TrainingSetError as exc:
            raise ValidationError({"detail": str(exc)}) from exc
        run.refresh_from_db()
        return Response(TrainingRunSerializer(run).data, status=status.HTTP_202_ACCEPTED)


class ShadowDeploymentViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """Candidates in shadow mode and their comparison with the active model (admins only)."""

    permission_classes = [IsAdmin]
    serializer_class = ShadowDeploymentSerializer
    queryset = ShadowDeployment.objects.all()
    error_responses = {
        "create": {
            409: "The candidate cannot run in shadow mode in this cohort (the reason says why)."
        }
    }

    @extend_schema(request=StartShadowSerializer, responses={201: ShadowDeploymentSerializer})
    def create(self, request, *args, **kwargs):
        from portal.analyses.models import ModelVersion

        body = StartShadowSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        candidate = ModelVersion.objects.filter(pk=data["candidate"]).first()
        if candidate is None:
            raise ValidationError({"candidate": f"no model version {data['candidate']}"})
        try:
            deployment = start_shadow(
                candidate, data["cohort"], request.user, data["min_signed"], request=request
            )
        except ShadowError as exc:
            raise Conflict(str(exc)) from exc
        return Response(ShadowDeploymentSerializer(deployment).data, status=status.HTTP_201_CREATED)

    def retrieve(self, request, *args, **kwargs):
        """The deployment with both models' agreement with the signed calls."""
        from portal.reviews import audit

        deployment = self.get_object()
        result = comparison(deployment)
        audit.record(
            request.user,
            "model.shadow.compare",
            deployment.candidate,
            request=request,
            cohort=deployment.cohort_id,
            n_signed=result["n_signed"],
        )
        return Response(result)

    @extend_schema(request=None, responses=ShadowDeploymentSerializer)
    @action(detail=True, methods=["post"])
    def stop(self, request, pk=None):
        deployment = self.get_object()
        stop_shadow(deployment, request.user, request=request)
        deployment.refresh_from_db()
        return Response(ShadowDeploymentSerializer(deployment).data)


class ModelActivationViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Every activation: model, the one it replaced, who and why; rollback (admins only)."""

    permission_classes = [IsAdmin]
    serializer_class = ModelActivationSerializer
    queryset = ModelActivation.objects.all()
    error_responses = {
        "rollback": {409: "Nothing to roll back to, or the earlier model fails its checks."}
    }

    @extend_schema(request=RollbackSerializer, responses=ModelActivationSerializer)
    @action(detail=False, methods=["post"])
    def rollback(self, request):
        body = RollbackSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            record = rollback(
                body.validated_data["cohort"],
                request.user,
                body.validated_data["reason"],
                request=request,
            )
        except ActivationError as exc:
            raise Conflict(str(exc)) from exc
        return Response(ModelActivationSerializer(record).data)
