"""A resumable (tus 1.0) upload of one slide file into a case."""

from __future__ import annotations

import uuid
from pathlib import Path

from django.conf import settings
from django.db import models


class Upload(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="uploads"
    )
    case = models.ForeignKey("cases.Case", on_delete=models.CASCADE, related_name="uploads")
    filename = models.CharField(max_length=255)  # as the client named it (Upload-Metadata)
    length = models.BigIntegerField()  # Upload-Length: the whole file, in bytes
    offset = models.BigIntegerField(default=0)  # bytes persisted so far
    metadata = models.JSONField(default=dict, blank=True)  # decoded Upload-Metadata
    # SHA-256 of the whole file, computed by re-reading it once complete (a running
    # hashlib state cannot be stored between requests).
    sha256 = models.CharField(max_length=64, blank=True)
    completed = models.BooleanField(default=False)
    # True when the file was already a ready slide of the cohort: ``slide`` is that slide.
    duplicate = models.BooleanField(default=False)
    slide = models.ForeignKey(
        "cases.Slide", null=True, blank=True, on_delete=models.SET_NULL, related_name="uploads"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.filename} ({self.offset}/{self.length} bytes)"

    @property
    def data_path(self) -> Path:
        """Where the bytes received so far are kept until the upload completes."""
        return Path(settings.UPLOAD_DIR) / f"{self.id}.part"
