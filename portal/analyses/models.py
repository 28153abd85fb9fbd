"""Registered model bundles, analysis jobs and their predictions."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from django.conf import settings
from django.db import connections, models, router, transaction
from django.db.models import F, Q, Subquery
from django.utils import timezone


class ModelVersion(models.Model):
    name = models.CharField(max_length=100)
    version = models.CharField(max_length=50)
    task = models.CharField(max_length=100)
    classes = models.JSONField(default=list)
    magnification = models.FloatField()
    bundle_path = models.CharField(max_length=500)
    manifest = models.JSONField(default=dict)
    # SHA-256 over the bundle's weight files (sorted by name): the provenance of every prediction.
    sha256 = models.CharField(max_length=64, db_index=True)
    is_demo = models.BooleanField(default=False)
    active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    # Model card: what the model is for and where it is known to fail (portal/analyses/lifecycle).
    intended_use = models.TextField(blank=True)
    known_limits = models.TextField(blank=True)
    # Validation report of a model trained in the portal (portal/analyses/training.py).
    report = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["name", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["name", "version"], name="unique_model_version"),
        ]

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    def weights_problem(self) -> str | None:
        """Why this version's weights cannot be trusted, or None when they verify."""
        from portal.analyses.weights import weights_problem

        return weights_problem(self)

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        if self.active and (problem := self.weights_problem()):
            raise ValidationError({"active": f"{self} cannot be active: {problem}"})

    def save(self, *args, **kwargs):
        if self.active and (problem := self.weights_problem()):
            from portal.analyses.weights import ActivationError

            raise ActivationError(f"{self} cannot be active: {problem}")
        super().save(*args, **kwargs)


class AnalysisJob(models.Model):
    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    STATES = State.choices
    ACTIVE = (State.QUEUED, State.RUNNING)
    FINAL = (State.SUCCEEDED, State.CANCELLED)  # nothing left to do
    RETRYABLE = (State.FAILED, State.CANCELLED)  # a new request queues it again

    slide = models.ForeignKey("cases.Slide", on_delete=models.CASCADE, related_name="jobs")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="jobs")
    # slide record + slide sha256 + model sha256: a retried or re-delivered job finds its
    # earlier self instead of duplicating. The slide record is part of it: the same file
    # uploaded to two cases is two slides, each analysed (and each with its own prediction).
    idempotency_key = models.CharField(max_length=160, unique=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED)
    stage = models.CharField(max_length=50, blank=True)
    progress = models.FloatField(default=0.0)
    timings = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    attempts = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The worker run that took the job (host:pid:run) and until when no other run may take it
    # (``claim``): a worker that dies leaves its jobs to whoever comes after the lease.
    claimed_by = models.CharField(max_length=100, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.state})"

    def requeue(self) -> None:
        """A failed or cancelled job asked for again starts afresh."""
        self.state, self.error, self.progress, self.stage = self.State.QUEUED.value, "", 0.0, ""
        self.lease_expires_at = None
        self.save(update_fields=["state", "error", "progress", "stage", "lease_expires_at"])

    def claim(self, holder: str, lease_s: float) -> bool:
        """-> running, held by ``holder`` for ``lease_s``; False when the job has ended or
        another run holds it under a lease that has not run out."""
        now = timezone.now()
        takeable = ~Q(state=self.State.RUNNING) | Q(lease_expires_at__isnull=True)
        takeable |= Q(lease_expires_at__lte=now)
        rows = AnalysisJob.objects.filter(takeable, pk=self.pk).exclude(state__in=self.FINAL)
        return bool(rows.update(**self._claimed(holder, lease_s, now)))

    @classmethod
    def claim_waiting(
        cls, model_version: ModelVersion, holder: str, *, limit: int, lease_s: float
    ) -> list[AnalysisJob]:
        """Up to ``limit`` queued jobs of this model, oldest first -> running, held by
        ``holder``. Race-free: rows another run is claiming are skipped (row locks on
        PostgreSQL, one writer at a time on SQLite), and only rows still queued are taken."""
        if limit < 1:
            return []
        queued = cls.objects.filter(model_version=model_version, state=cls.State.QUEUED)
        oldest = queued.order_by("created_at", "id").select_for_update(skip_locked=True)
        claim = cls._claimed(holder, lease_s, timezone.now())
        # one UPDATE ... WHERE pk IN (SELECT ... LIMIT n [FOR UPDATE SKIP LOCKED]) AND queued:
        # no lock is held between a read and a write (SQLite's shared-cache test database
        # answers "table is locked" at once to any reader during a write transaction)
        using = router.db_for_write(cls)
        take = queued.filter(pk__in=Subquery(oldest.values("pk")[:limit]))
        if connections[using].features.has_select_for_update:  # FOR UPDATE needs a transaction
            with transaction.atomic(using=using):
                claimed = take.update(**claim)
        else:
            claimed = take.update(**claim)
        if not claimed:
            return []
        held = cls.objects.filter(
            model_version=model_version,
            claimed_by=holder,
            state=cls.State.RUNNING,
            lease_expires_at=claim["lease_expires_at"],
        )
        return list(held.select_related("slide__case__cohort", "model_version").order_by("id"))

    @classmethod
    def renew(cls, pks: list[int], holder: str, lease_s: float) -> None:
        """Extend the lease of the jobs ``holder`` still holds (it is alive and working)."""
        cls.objects.filter(pk__in=pks, claimed_by=holder, state=cls.State.RUNNING).update(
            lease_expires_at=timezone.now() + timedelta(seconds=lease_s)
        )

    @classmethod
    def release(cls, pks: list[int], holder: str) -> None:
        """Jobs ``holder`` still runs -> queued, free for any run (a run that stopped early)."""
        cls.objects.filter(pk__in=pks, claimed_by=holder, state=cls.State.RUNNING).update(
            state=cls.State.QUEUED, lease_expires_at=None
        )

    @classmethod
    def _claimed(cls, holder: str, lease_s: float, now) -> dict:
        return {
            "state": cls.State.RUNNING,
            "claimed_by": holder,
            "lease_expires_at": now + timedelta(seconds=lease_s),
            "started_at": now,
            "attempts": F("attempts") + 1,
            "error": "",
        }

    def cancel(self) -> bool:
        """queued/running -> cancelled; False when the job had already ended."""
        updated = AnalysisJob.objects.filter(pk=self.pk, state__in=self.ACTIVE).update(
            state=self.State.CANCELLED, stage="cancelled", finished_at=timezone.now()
        )
        if updated:
            self.state = self.State.CANCELLED.value
        return bool(updated)

    @staticmethod
    def key_for(slide_sha256: str, model_sha256: str, slide_id: int | None = None) -> str:
        return f"{slide_sha256}:{model_sha256}" + (f":{slide_id}" if slide_id else "")


class Prediction(models.Model):
    job = models.OneToOneField(AnalysisJob, on_delete=models.CASCADE, related_name="prediction")
    slide = models.ForeignKey("cases.Slide", on_delete=models.CASCADE, related_name="predictions")
    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="predictions"
    )
    probabilities = models.JSONField(default=dict)  # {class name: probability}
    predicted_class = models.CharField(max_length=100)
    confidence = models.FloatField()
    # float16 little-endian, one value per grid cell in grid order (see ``grid``).
    instance_scores = models.BinaryField(default=b"")
    grid = models.JSONField(default=dict)  # n_rows, n_cols, l0_patch_size, grid_rc
    # uint8 k-means cluster id per grid cell (a research layer); empty for older predictions
    clusters = models.BinaryField(default=b"", blank=True)
    # float16 signed class evidence per grid cell for ``evidence_class`` (analysis.mil.evidence),
    # in logit units; empty when the model gives none. ``instance_scores`` holds attention.
    evidence_scores = models.BinaryField(default=b"", blank=True)
    evidence_class = models.CharField(max_length=100, blank=True)
    code_version = models.CharField(max_length=100, blank=True)
    input_sha256 = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["slide", "model_version"], name="unique_prediction_per_slide_model"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.predicted_class} ({self.confidence:.2f}) for slide {self.slide_id}"

    def scores(self) -> np.ndarray:
        """Instance scores as float32, shape (N,) in grid order."""
        return np.frombuffer(bytes(self.instance_scores), dtype="<f2").astype(np.float32)

    def evidence(self) -> np.ndarray:
        """(N,) float32 signed class evidence in grid order, or an empty array."""
        return np.frombuffer(bytes(self.evidence_scores), dtype="<f2").astype(np.float32)

    def cluster_ids(self) -> np.ndarray:
        """(N,) uint8 cluster of each grid cell, or an empty array."""
        return np.frombuffer(bytes(self.clusters), dtype=np.uint8)

    @staticmethod
    def pack_scores(scores: np.ndarray) -> bytes:
        return np.asarray(scores, dtype="<f2").tobytes()


class ModelActivation(models.Model):
    """One change of a cohort's active model: who, why, and what it replaced (for rollback)."""

    cohort = models.ForeignKey("cases.Cohort", on_delete=models.CASCADE, related_name="activations")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    previous = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    activated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="+"
    )
    reason = models.TextField()
    rolled_back_at = models.DateTimeField(null=True, blank=True)
    rolled_back_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class TrainingRun(models.Model):
    """Training and validating a model on a cohort's signed cases (a job on the gpu queue)."""

    STATES = [
        ("queued", "Queued"),
        ("running", "Running"),
        ("succeeded", "Succeeded"),
        ("failed", "Failed"),
    ]
    cohort = models.ForeignKey("cases.Cohort", on_delete=models.PROTECT, related_name="+")
    signed_from = models.DateField()
    signed_to = models.DateField()
    options = models.JSONField(default=dict, blank=True)  # epochs, folds, maga, ...
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="+"
    )
    state = models.CharField(max_length=10, choices=STATES, default="queued")
    stage = models.CharField(max_length=50, blank=True)
    progress = models.FloatField(default=0.0)
    error = models.TextField(blank=True)
    data_sha256 = models.CharField(max_length=64, blank=True)
    n_cases = models.IntegerField(default=0)
    work_dir = models.CharField(max_length=500, blank=True)
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="training_runs"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class ShadowDeployment(models.Model):
    """A candidate version analysing every new slide of a cohort beside the active one.

    Its results (``ShadowPrediction``) live apart from ``Prediction`` so that nothing a
    pathologist sees (API, pages, FHIR, webhooks, the AI suggestion) can include them.
    """

    cohort = models.ForeignKey("cases.Cohort", on_delete=models.CASCADE, related_name="+")
    candidate = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    baseline = models.ForeignKey(
        ModelVersion, null=True, on_delete=models.PROTECT, related_name="+"
    )
    min_signed = models.PositiveIntegerField(default=10)  # signed cases before comparing
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="+"
    )
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class ShadowPrediction(models.Model):
    deployment = models.ForeignKey(
        ShadowDeployment, on_delete=models.CASCADE, related_name="predictions"
    )
    slide = models.ForeignKey("cases.Slide", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    state = models.CharField(max_length=10, default="queued")  # queued|succeeded|failed
    error = models.TextField(blank=True)
    probabilities = models.JSONField(default=dict)
    predicted_class = models.CharField(max_length=100, blank=True)
    confidence = models.FloatField(default=0.0)
    code_version = models.CharField(max_length=100, blank=True)
    input_sha256 = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slide_id", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["slide", "model_version"], name="unique_shadow_prediction"
            ),
        ]
