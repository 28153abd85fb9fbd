"""Cohorts, who belongs to them, cases and their slide records."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import models


class Cohort(models.Model):
    name = models.CharField(max_length=200, unique=True)
    slug = models.SlugField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    # Slides of this cohort are analysed at this magnification (5x is the point of LowMag).
    required_magnification = models.FloatField(default=5.0)
    active_model = models.ForeignKey(
        "analyses.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="active_in_cohorts",
    )
    # A demo cohort may run demo models (labelled "not for diagnosis"); no other cohort may.
    is_demo = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    PATHOLOGIST = "pathologist"
    INTEGRATION = "integration"
    ROLES = [(PATHOLOGIST, "Pathologist"), (INTEGRATION, "Integration (LIS)")]

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    cohort = models.ForeignKey(Cohort, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=20, choices=ROLES)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "cohort"], name="unique_membership"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.cohort} as {self.role}"


class Case(models.Model):
    PRIORITIES = [("routine", "Routine"), ("urgent", "Urgent"), ("frozen", "Frozen section")]
    STATUSES = [
        ("new", "New"),
        ("analysing", "Analysing"),
        ("ready", "Ready for review"),
        ("in_review", "In review"),
        ("signed", "Signed"),
    ]

    cohort = models.ForeignKey(Cohort, on_delete=models.PROTECT, related_name="cases")
    patient_id = models.CharField(max_length=100)
    accession_number = models.CharField(max_length=100)
    clinical_question = models.TextField(blank=True)
    priority = models.CharField(max_length=10, choices=PRIORITIES, default="routine")
    status = models.CharField(max_length=10, choices=STATUSES, default="new")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="created_cases",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["cohort", "accession_number"], name="unique_accession_per_cohort"
            ),
        ]
        indexes = [models.Index(fields=["cohort", "status"])]

    def __str__(self) -> str:
        return f"{self.accession_number} ({self.cohort})"


class Slide(models.Model):
    STATUSES = [
        ("uploading", "Uploading"),
        ("ingesting", "Ingesting"),
        ("ready", "Ready"),
        ("failed", "Failed"),
    ]

    case = models.ForeignKey(Case, on_delete=models.CASCADE, related_name="slides")
    original_name = models.CharField(max_length=255)
    # Relative to settings.SLIDE_DIR; a directory for multi-file formats (DICOM, MRXS).
    file = models.CharField(max_length=500, blank=True)
    sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    size_bytes = models.BigIntegerField(default=0)
    vendor = models.CharField(max_length=50, blank=True)
    mpp = models.FloatField(null=True, blank=True)
    magnification = models.FloatField(null=True, blank=True)
    width = models.IntegerField(default=0)
    height = models.IntegerField(default=0)
    level_count = models.IntegerField(default=0)
    tissue_area_mm2 = models.FloatField(null=True, blank=True)
    has_label = models.BooleanField(default=False)
    has_macro = models.BooleanField(default=False)
    status = models.CharField(max_length=10, choices=STATUSES, default="uploading")
    failure_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["case_id", "id"]

    def __str__(self) -> str:
        return self.original_name

    @property
    def path(self) -> Path:
        """Absolute path of the slide file (or directory)."""
        return Path(settings.SLIDE_DIR) / self.file

    @property
    def asset_dir(self) -> Path:
        """Directory holding label.png, macro.png and thumbnail.png for this slide.

        It is the slide file's own directory (uploads store each slide in a directory of its own);
        for a multi-file slide stored as a directory it is that directory.
        """
        path = self.path
        return path if path.is_dir() else path.parent

    def asset_path(self, name: str) -> Path:
        """``asset_path("label")`` -> ``<asset_dir>/label.png``."""
        return self.asset_dir / f"{name}.png"
