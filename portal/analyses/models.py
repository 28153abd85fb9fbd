"""Registered model bundles, analysis jobs and their predictions."""

from __future__ import annotations

import numpy as np
from django.db import models


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

    class Meta:
        ordering = ["name", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["name", "version"], name="unique_model_version"),
        ]

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


class AnalysisJob(models.Model):
    STATES = [
        ("queued", "Queued"),
        ("running", "Running"),
        ("succeeded", "Succeeded"),
        ("failed", "Failed"),
        ("cancelled", "Cancelled"),
    ]

    slide = models.ForeignKey("cases.Slide", on_delete=models.CASCADE, related_name="jobs")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="jobs")
    # slide record + slide sha256 + model sha256: a retried or re-delivered job finds its
    # earlier self instead of duplicating. The slide record is part of it: the same file
    # uploaded to two cases is two slides, each analysed (and each with its own prediction).
    idempotency_key = models.CharField(max_length=160, unique=True)
    state = models.CharField(max_length=10, choices=STATES, default="queued")
    stage = models.CharField(max_length=50, blank=True)
    progress = models.FloatField(default=0.0)
    timings = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    attempts = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.state})"

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
