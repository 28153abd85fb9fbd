"""Cancelling and retrying analyses through the API."""

from __future__ import annotations

import pytest

from portal.analyses.models import AnalysisJob
from tests.portal_fixtures import make_prediction

pytestmark = pytest.mark.django_db


@pytest.fixture
def queued_job(slide_a, model_version):
    job = make_prediction(slide_a, model_version).job
    job.prediction.delete()
    AnalysisJob.objects.filter(pk=job.pk).update(state="queued")
    job.refresh_from_db()
    return job


def test_a_pathologist_cancels_a_queued_job_and_it_is_audited(api_client_for, path_a, queued_job):
    from portal.reviews.models import AuditEvent

    response = api_client_for(path_a).post(f"/api/v1/jobs/{queued_job.pk}/cancel/")
    assert response.status_code == 200, response.content
    assert response.json()["state"] == "cancelled"
    assert AuditEvent.objects.filter(action="job.cancel", object_id=str(queued_job.pk)).exists()


def test_a_cancelled_job_cannot_be_cancelled_twice(api_client_for, path_a, queued_job):
    client = api_client_for(path_a)
    client.post(f"/api/v1/jobs/{queued_job.pk}/cancel/")
    again = client.post(f"/api/v1/jobs/{queued_job.pk}/cancel/")
    assert again.status_code == 409
    assert "cancelled" in again.json()["detail"]


def test_a_cancelled_job_is_queued_again_by_retry(api_client_for, path_a, queued_job):
    client = api_client_for(path_a)
    client.post(f"/api/v1/jobs/{queued_job.pk}/cancel/")
    response = client.post(f"/api/v1/jobs/{queued_job.pk}/retry/")
    assert response.status_code == 202
    assert response.json()["state"] == "queued"


def test_another_cohorts_pathologist_cannot_see_or_cancel_the_job(
    api_client_for, path_b, queued_job
):
    response = api_client_for(path_b).post(f"/api/v1/jobs/{queued_job.pk}/cancel/")
    assert response.status_code == 404
    queued_job.refresh_from_db()
    assert queued_job.state == "queued"


def test_a_running_job_stops_at_its_next_progress_report(queued_job):
    from portal.analyses.tasks import JobCancelled, _ProgressReporter, cancel_job

    AnalysisJob.objects.filter(pk=queued_job.pk).update(state="running")
    reporter = _ProgressReporter(queued_job)
    reporter("features", 0.0)
    assert cancel_job(queued_job)
    with pytest.raises(JobCancelled):
        reporter("features", 1.0)


def test_the_same_file_in_two_cases_is_analysed_for_each(slide_a, model_version, cohort_a):
    from portal.analyses.tasks import request_analysis
    from tests.portal_fixtures import make_case

    twin = make_case(cohort_a, "TWIN-1").slides.get()
    twin.sha256 = slide_a.sha256
    twin.save()
    first = request_analysis(slide_a, model_version)
    second = request_analysis(twin, model_version)
    assert first.pk != second.pk
    assert second.slide_id == twin.pk
    assert request_analysis(twin, model_version).pk == second.pk  # idempotent per slide


def test_a_slide_is_analysed_with_the_model_activated_after_its_cohort_was_loaded(
    slide_a, model_version
):
    from portal.analyses.tasks import request_analysis
    from portal.cases.models import Cohort

    cohort = slide_a.case.cohort  # loaded before the model is activated
    Cohort.objects.filter(pk=cohort.pk).update(active_model=model_version)
    job = request_analysis(slide_a)
    assert job is not None and job.model_version == model_version


def test_a_progress_report_the_busy_database_refuses_does_not_stop_the_analysis(
    queued_job, monkeypatch, caplog
):
    """SQLite answers "database table is locked" to a write racing a reader (the shared-cache
    test database at once, the embedded default after its busy timeout): the report is skipped,
    the analysis goes on, and the next report is written."""
    from django.db import OperationalError

    from portal.analyses.tasks import _ProgressReporter

    AnalysisJob.objects.filter(pk=queued_job.pk).update(state="running")
    reporter = _ProgressReporter(queued_job, min_interval_s=0.0)
    record = reporter._record
    answers = iter([OperationalError("database table is locked: analyses_analysisjob")])

    def busy_once(stage, fraction):
        for exc in answers:
            raise exc
        record(stage, fraction)

    monkeypatch.setattr(reporter, "_record", busy_once)
    reporter("features", 0.0)  # refused: no exception
    assert "not recorded" in caplog.text
    reporter("features", 1.0)
    queued_job.refresh_from_db()
    assert (queued_job.stage, queued_job.progress) == ("features", 1.0)


def test_a_progress_report_fails_on_a_database_error_that_is_not_a_lock(queued_job, monkeypatch):
    from django.db import OperationalError

    from portal.analyses.tasks import _ProgressReporter

    reporter = _ProgressReporter(queued_job)

    def broken(stage, fraction):
        raise OperationalError("no such table: analyses_analysisjob")

    monkeypatch.setattr(reporter, "_record", broken)
    with pytest.raises(OperationalError):
        reporter("features", 0.0)
