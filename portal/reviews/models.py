"""What pathologists produce: annotations, diagnoses, second-opinion requests, and the audit trail.

Two rows are write-once: a signed ``Diagnosis`` and every ``AuditEvent``. Both refuse
``save()`` on a stored row, ``delete()``, and ``QuerySet.update()/delete()`` that would touch
them; their foreign keys protect them from cascades.
"""

from __future__ import annotations

import hashlib
import json

from django.conf import settings
from django.db import models
from django.utils import timezone


class ImmutableRowError(Exception):
    """Raised on any attempt to change or delete a write-once row."""


class Annotation(models.Model):
    slide = models.ForeignKey("cases.Slide", on_delete=models.CASCADE, related_name="annotations")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="annotations"
    )
    geometry = models.JSONField()  # GeoJSON geometry in level-0 pixel coordinates (QuPath's frame)
    name = models.CharField(max_length=200, blank=True)
    classification_name = models.CharField(max_length=100, blank=True)
    classification_color = models.JSONField(null=True, blank=True)  # [r, g, b] ints, as QuPath
    version = models.IntegerField(default=1)
    deleted = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slide_id", "id"]

    def __str__(self) -> str:
        return f"{self.geometry.get('type', '?')} on slide {self.slide_id} v{self.version}"

    def snapshot(self, edited_by) -> AnnotationVersion:
        """Store the current state as a history row."""
        return AnnotationVersion.objects.create(
            annotation=self,
            version=self.version,
            geometry=self.geometry,
            name=self.name,
            classification_name=self.classification_name,
            classification_color=self.classification_color,
            deleted=self.deleted,
            edited_by=edited_by,
        )


class AnnotationVersion(models.Model):
    annotation = models.ForeignKey(Annotation, on_delete=models.CASCADE, related_name="versions")
    version = models.IntegerField()
    geometry = models.JSONField()
    name = models.CharField(max_length=200, blank=True)
    classification_name = models.CharField(max_length=100, blank=True)
    classification_color = models.JSONField(null=True, blank=True)
    deleted = models.BooleanField(default=False)
    edited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["annotation_id", "version"]
        constraints = [
            models.UniqueConstraint(
                fields=["annotation", "version"], name="unique_annotation_version"
            ),
        ]


class DiagnosisQuerySet(models.QuerySet):
    def _refuse_if_signed(self, verb: str) -> None:
        if self.filter(status=Diagnosis.SIGNED).exists():
            raise ImmutableRowError(f"cannot {verb} a signed diagnosis; amend it instead")

    def update(self, **kwargs):
        self._refuse_if_signed("update")
        return super().update(**kwargs)

    def delete(self):
        self._refuse_if_signed("delete")
        return super().delete()

    def bulk_update(self, objs, fields, batch_size=None):
        self.filter(pk__in=[o.pk for o in objs])._refuse_if_signed("update")
        return super().bulk_update(objs, fields, batch_size=batch_size)


class Diagnosis(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        SIGNED = "signed", "Signed"

    DRAFT = Status.DRAFT.value
    SIGNED = Status.SIGNED.value
    STATUSES = Status.choices
    # Fields whose values the content hash covers (plus ids of case, previous and signer).
    CONTENT_FIELDS = ("version", "call", "diagnosis_text", "free_text", "amendment_reason")

    case = models.ForeignKey("cases.Case", on_delete=models.PROTECT, related_name="diagnoses")
    version = models.IntegerField(default=1)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DRAFT)
    ai_suggestion = models.JSONField(null=True, blank=True)  # the prediction as it was when signed
    call = models.CharField(max_length=100, blank=True)  # the class called, comparable to the AI's
    diagnosis_text = models.TextField(blank=True)
    free_text = models.TextField(blank=True)
    amendment_reason = models.TextField(blank=True)
    previous = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="amendments"
    )
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="authored_diagnoses"
    )
    signed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="signed_diagnoses",
    )
    signed_at = models.DateTimeField(null=True, blank=True)
    content_hash = models.CharField(max_length=64, blank=True)
    row_version = models.IntegerField(default=1)  # optimistic locking of drafts (If-Match)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = DiagnosisQuerySet.as_manager()

    class Meta:
        ordering = ["case_id", "version"]
        verbose_name_plural = "diagnoses"
        constraints = [
            models.UniqueConstraint(fields=["case", "version"], name="unique_diagnosis_version"),
        ]

    def __str__(self) -> str:
        return f"diagnosis v{self.version} of case {self.case_id} ({self.status})"

    @property
    def is_signed(self) -> bool:
        return self.status == self.SIGNED

    def save(self, *args, **kwargs):
        if self.pk and Diagnosis.objects.filter(pk=self.pk, status=self.SIGNED).exists():
            raise ImmutableRowError(f"diagnosis {self.pk} is signed and cannot be changed")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        if self.pk and Diagnosis.objects.filter(pk=self.pk, status=self.SIGNED).exists():
            raise ImmutableRowError(f"diagnosis {self.pk} is signed and cannot be deleted")
        return super().delete(*args, **kwargs)

    def canonical_content(self) -> dict:
        content = {f: getattr(self, f) for f in self.CONTENT_FIELDS}
        content.update(
            case=self.case_id,
            previous=self.previous.content_hash if self.previous_id else None,
            ai_suggestion=self.ai_suggestion,
            signed_by=self.signed_by_id,
            signed_at=self.signed_at.isoformat() if self.signed_at else None,
        )
        return content

    def compute_content_hash(self) -> str:
        canonical = json.dumps(
            self.canonical_content(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class SecondOpinionRequest(models.Model):
    class Status(models.TextChoices):
        OPEN = "open", "Open"
        CLOSED = "closed", "Closed"

    OPEN = Status.OPEN.value
    CLOSED = Status.CLOSED.value
    STATUSES = Status.choices

    case = models.ForeignKey("cases.Case", on_delete=models.CASCADE, related_name="second_opinions")
    diagnosis = models.ForeignKey(
        Diagnosis, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.TextField()
    # Null when opened automatically (AI call disagreed with the signed call).
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    assigned_to = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="assigned_second_opinions",
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OPEN)
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    # The colleague's opinion; giving it closes the request.
    answer = models.TextField(blank=True)
    answered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"second opinion on case {self.case_id} ({self.status})"

    def close(self) -> None:
        self.status = self.Status.CLOSED.value
        self.closed_at = timezone.now()
        self.save(update_fields=["status", "closed_at"])

    def give_answer(self, user, text: str) -> None:
        """Record the colleague's opinion; giving it closes the request."""
        self.answer = text
        self.answered_by = user
        self.status = self.Status.CLOSED.value
        self.closed_at = timezone.now()
        self.save(update_fields=["answer", "answered_by", "status", "closed_at"])


class AuditEventQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise ImmutableRowError("audit events cannot be updated")

    def delete(self):
        raise ImmutableRowError("audit events cannot be deleted")

    def bulk_update(self, objs, fields, batch_size=None):
        raise ImmutableRowError("audit events cannot be updated")


class AuditEvent(models.Model):
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="audit_events",
    )
    actor_name = models.CharField(max_length=150, blank=True)  # kept readable on its own
    action = models.CharField(max_length=50, db_index=True)  # "diagnosis.sign", "case.view", ...
    object_type = models.CharField(max_length=50, blank=True)
    object_id = models.CharField(max_length=50, blank=True)
    case = models.ForeignKey(
        "cases.Case", null=True, blank=True, on_delete=models.PROTECT, related_name="audit_events"
    )
    details = models.JSONField(default=dict, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_name or '-'} {self.action}"

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding:
            raise ImmutableRowError(f"audit event {self.pk} cannot be changed")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ImmutableRowError(f"audit event {self.pk} cannot be deleted")
