from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from portal.uploads.management.commands.purge_uploads import purge_abandoned
from portal.uploads.models import Upload

pytestmark = pytest.mark.django_db


def _upload(case, user, settings, tmp_path, *, completed: bool, age_hours: float) -> Upload:
    settings.UPLOAD_DIR = tmp_path
    upload = Upload.objects.create(
        user=user, case=case, filename="x.svs", length=100, offset=10, completed=completed
    )
    upload.data_path.parent.mkdir(parents=True, exist_ok=True)
    upload.data_path.write_bytes(b"0123456789")
    Upload.objects.filter(pk=upload.pk).update(
        updated_at=timezone.now() - timedelta(hours=age_hours)
    )
    return upload


def test_abandoned_partial_uploads_are_purged_and_recent_or_complete_ones_kept(
    case_a, integration_a, settings, tmp_path
):
    old = _upload(case_a, integration_a, settings, tmp_path, completed=False, age_hours=30)
    recent = _upload(case_a, integration_a, settings, tmp_path, completed=False, age_hours=1)
    done = _upload(case_a, integration_a, settings, tmp_path, completed=True, age_hours=30)
    count, freed = purge_abandoned(timedelta(hours=24))
    assert (count, freed) == (1, 10)
    assert not Upload.objects.filter(pk=old.pk).exists() and not old.data_path.exists()
    assert Upload.objects.filter(pk__in=[recent.pk, done.pk]).count() == 2


def test_purge_command_reports_what_it_freed(case_a, integration_a, settings, tmp_path, capsys):
    _upload(case_a, integration_a, settings, tmp_path, completed=False, age_hours=48)
    call_command("purge_uploads", "--hours", "24")
    assert "purged 1 abandoned upload(s)" in capsys.readouterr().out
