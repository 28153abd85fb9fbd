"""Cohorts, who belongs to them, cases and their slide records."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import models
from django.utils import timezone


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
    class Priority(models.TextChoices):
        ROUTINE = "routine", "Routine"
        URGENT = "urgent", "Urgent"
        FROZEN = "frozen", "Frozen section"

    class Status(models.TextChoices):
        NEW = "new", "New"
        ANALYSING = "analysing", "Analysing"
        READY = "ready", "Ready for review"
        IN_REVIEW = "in_review", "In review"
        SIGNED = "signed", "Signed"

    PRIORITIES = Priority.choices
    STATUSES = Status.choices

    cohort = models.ForeignKey(Cohort, on_delete=models.PROTECT, related_name="cases")
    patient_id = models.CharField(max_length=100)
    accession_number = models.CharField(max_length=100)
    clinical_question = models.TextField(blank=True)
    priority = models.CharField(max_length=10, choices=Priority.choices, default=Priority.ROUTINE)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.NEW)
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

    # -- transitions (each a single conditional UPDATE, so concurrent workers cannot undo one
    # another; the instance in hand follows the row) --------------------------------------------

    @property
    def is_signed(self) -> bool:
        return self.status == self.Status.SIGNED

    def _move(self, to: str, only_from: tuple[str, ...] | None = None, exclude=()) -> bool:
        rows = Case.objects.filter(pk=self.pk)
        if only_from is not None:
            rows = rows.filter(status__in=only_from)
        if exclude:
            rows = rows.exclude(status__in=exclude)
        moved = bool(rows.update(status=to, updated_at=timezone.now()))
        if moved:
            self.status = str(to)
        return moved

    def start_analysis(self) -> bool:
        """new/ready -> analysing (a slide's analysis was queued)."""
        return self._move(self.Status.ANALYSING, only_from=(self.Status.NEW, self.Status.READY))

    def analysis_finished(self) -> bool:
        """analysing -> ready for review."""
        return self._move(self.Status.READY, only_from=(self.Status.ANALYSING,))

    def start_review(self) -> bool:
        """Any state but signed -> in review (a pathologist wrote a draft)."""
        return self._move(self.Status.IN_REVIEW, exclude=(self.Status.SIGNED,))

    def mark_signed(self) -> bool:
        """-> signed (a diagnosis of the case was signed)."""
        return self._move(self.Status.SIGNED)


class Slide(models.Model):
    class Status(models.TextChoices):
        UPLOADING = "uploading", "Uploading"
        INGESTING = "ingesting", "Ingesting"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"

    STATUSES = Status.choices

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
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.UPLOADING)
    failure_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["case_id", "id"]

    def __str__(self) -> str:
        return self.original_name

    @property
    def is_ready(self) -> bool:
        return self.status == self.Status.READY

    def mark_ready(self) -> None:
        """Ingest read the slide: it can be viewed and analysed. Saves the whole row."""
        self.status = self.Status.READY.value
        self.failure_reason = ""
        self.save()

    def mark_failed(self, reason: str, save: bool = True) -> None:
        """The slide cannot be used; ``reason`` tells the uploader why and what to do."""
        self.status = self.Status.FAILED.value
        self.failure_reason = reason
        if save:
            self.save()

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
