"""Remove uploads abandoned before completion (their partial files and records)."""

from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from portal.uploads.models import Upload


def purge_abandoned(older_than: timedelta, now=None) -> tuple[int, int]:
    """Delete incomplete uploads untouched for ``older_than``; returns (uploads, bytes freed)."""
    cutoff = (now or timezone.now()) - older_than
    stale = Upload.objects.filter(completed=False, updated_at__lt=cutoff)
    count = freed = 0
    for upload in stale.iterator():
        path = upload.data_path
        if path.exists():
            freed += path.stat().st_size
            path.unlink()
        upload.delete()
        count += 1
    return count, freed


class Command(BaseCommand):
    help = "Delete incomplete uploads untouched for longer than --hours (default 24)."

    def add_arguments(self, parser):
        parser.add_argument("--hours", type=float, default=24.0)

    def handle(self, *args, hours: float, **options):
        if hours <= 0:
            raise CommandError("--hours must be positive")
        count, freed = purge_abandoned(timedelta(hours=hours))
        self.stdout.write(f"purged {count} abandoned upload(s), {freed / 1e6:.1f} MB freed")
