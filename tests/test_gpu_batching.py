"""A gpu worker analyses the slides waiting for its model together: it claims them (race-free,
under a lease), encodes their patches in shared batches and finishes each job as the one-slide
path would. The claimed jobs' own messages then find them done, or run them when the lease ran
out (the worker that claimed them died)."""

from __future__ import annotations

import threading
from datetime import timedelta

import numpy as np
import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from analysis.bundle import load_bundle
from portal.analyses.models import AnalysisJob, Prediction
from tests.bundles import make_tiny_bundle
from tests.conftest import shared_slide
from tests.portal_fixtures import make_case

pytestmark = pytest.mark.django_db

GOOD = "cmu-1-small-region.svs"
NO_TISSUE = "small.svs"  # opens, but holds no tissue patch


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny"), device="cpu")


@pytest.fixture
def warm_bundle(tiny_bundle, model_version, monkeypatch, settings):
    """The worker's model, already loaded in this process (as a gpu worker keeps it)."""
    from portal.analyses import tasks

    settings.SLIDE_DIR = str(shared_slide(GOOD).parent)
    monkeypatch.setattr(tasks, "_bundles", {model_version.sha256: tiny_bundle})
    return tiny_bundle


@pytest.fixture
def calls(monkeypatch):
    """How many times the worker ran the one-slide and the several-slide pipeline."""
    from analysis import pipeline

    counted = {"predict_slide": 0, "predict_slides": 0}
    for name in counted:
        real = getattr(pipeline, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            counted[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(pipeline, name, counting)
    return counted


def queued_jobs(cohort, model_version, files: list[str]) -> list[AnalysisJob]:
    """One case per file, its slide's analysis queued (no task sent: the test runs them)."""
    jobs = []
    for k, name in enumerate(files):
        slide = make_case(cohort, f"A-BATCH-{k}").slides.get()
        slide.file = name
        slide.save(update_fields=["file"])
        slide.case.start_analysis()
        jobs.append(
            AnalysisJob.objects.create(
                slide=slide,
                model_version=model_version,
                idempotency_key=AnalysisJob.key_for(slide.sha256, model_version.sha256, slide.pk),
            )
        )
    return jobs


def run(job: AnalysisJob) -> str:
    from portal.analyses.tasks import run_analysis

    return run_analysis.apply(args=(job.pk,), throw=True).get()


def states(jobs: list[AnalysisJob]) -> list[str]:
    return [AnalysisJob.objects.get(pk=job.pk).state for job in jobs]


def test_one_task_analyses_every_waiting_slide_of_its_model_as_one_slide_alone_would(
    warm_bundle, calls, cohort_a, model_version, settings
):
    from analysis.pipeline import predict_slide

    settings.LOWMAG_GPU_BATCH_SLIDES = 4
    jobs = queued_jobs(cohort_a, model_version, [GOOD, GOOD, GOOD])
    assert run(jobs[0]) == "succeeded"
    assert states(jobs) == ["succeeded"] * 3
    assert calls == {"predict_slide": 0, "predict_slides": 1}  # one pass, shared batches
    alone = predict_slide(warm_bundle, shared_slide(GOOD), clusters=False)
    for job in jobs:
        prediction = Prediction.objects.get(job=job)
        assert prediction.predicted_class == alone.predicted_class
        np.testing.assert_allclose(
            [prediction.probabilities[c] for c in alone.classes],
            [alone.probabilities[c] for c in alone.classes],
            atol=1e-5,
        )
        np.testing.assert_allclose(prediction.scores(), alone.instance_scores, atol=2e-3)
        assert prediction.grid["grid_rc"] == alone.grid.grid_rc.tolist()
        assert len(prediction.cluster_ids()) == alone.n_patches  # the cluster map came after
        job.refresh_from_db()
        assert job.stage == "done" and job.progress == 1.0 and job.attempts == 1
        assert {"open", "tissue", "features", "mil"} <= set(job.timings)
        assert job.slide.case.status == "ready"


def test_the_claimed_jobs_own_messages_find_them_done(
    warm_bundle, calls, cohort_a, model_version, settings
):
    settings.LOWMAG_GPU_BATCH_SLIDES = 3
    jobs = queued_jobs(cohort_a, model_version, [GOOD, GOOD, GOOD])
    run(jobs[0])
    assert [run(job) for job in jobs[1:]] == ["succeeded", "succeeded"]
    assert calls == {"predict_slide": 0, "predict_slides": 1}
    assert Prediction.objects.count() == 3
    assert [AnalysisJob.objects.get(pk=job.pk).attempts for job in jobs] == [1, 1, 1]


def test_a_worker_claims_no_more_slides_than_its_setting_and_only_for_its_model(
    warm_bundle, calls, cohort_a, model_version, settings
):
    from portal.analyses.models import ModelVersion

    settings.LOWMAG_GPU_BATCH_SLIDES = 2
    jobs = queued_jobs(cohort_a, model_version, [GOOD, GOOD, GOOD])
    other_model = ModelVersion.objects.create(
        name="other", version="1", classes=["a", "b"], magnification=5.0, sha256="cd" * 32
    )
    AnalysisJob.objects.filter(pk=jobs[1].pk).update(model_version=other_model)
    run(jobs[0])
    assert states(jobs) == ["succeeded", "queued", "succeeded"]


def test_a_bad_slide_in_the_batch_fails_alone_with_its_reason(
    warm_bundle, cohort_a, model_version, settings
):
    settings.LOWMAG_GPU_BATCH_SLIDES = 4
    jobs = queued_jobs(cohort_a, model_version, [GOOD, NO_TISSUE, GOOD])
    assert run(jobs[0]) == "succeeded"
    assert states(jobs) == ["succeeded", "failed", "succeeded"]
    failed = AnalysisJob.objects.get(pk=jobs[1].pk)
    assert NO_TISSUE in failed.error and "tissue" in failed.error
    assert not Prediction.objects.filter(job=failed).exists()
    assert failed.slide.case.status == "ready"  # the case does not wait for it forever


def test_cancelling_one_claimed_job_leaves_the_others_to_finish(
    warm_bundle, cohort_a, model_version, settings, monkeypatch
):
    from portal.analyses.tasks import cancel_job

    settings.LOWMAG_GPU_BATCH_SLIDES = 4
    jobs = queued_jobs(cohort_a, model_version, [GOOD, GOOD, GOOD])
    embed = warm_bundle.encoder.embed

    def cancel_the_first_while_encoding(patches):
        cancel_job(AnalysisJob.objects.get(pk=jobs[0].pk))
        return embed(patches)

    monkeypatch.setattr(warm_bundle.encoder, "embed", cancel_the_first_while_encoding)
    assert run(jobs[0]) == "cancelled"
    assert states(jobs) == ["cancelled", "succeeded", "succeeded"]
    assert not Prediction.objects.filter(job=jobs[0]).exists()
    assert Prediction.objects.count() == 2


def test_a_job_whose_claim_lease_ran_out_is_run_by_its_own_message(
    warm_bundle, calls, cohort_a, model_version, settings
):
    settings.LOWMAG_GPU_BATCH_SLIDES = 4
    (job,) = queued_jobs(cohort_a, model_version, [GOOD])
    AnalysisJob.objects.filter(pk=job.pk).update(
        state="running",
        attempts=1,
        claimed_by="gpu-1:4242:dead",
        lease_expires_at=timezone.now() - timedelta(seconds=1),
    )
    assert run(job) == "succeeded"
    job.refresh_from_db()
    assert job.attempts == 2 and job.claimed_by != "gpu-1:4242:dead"
    assert Prediction.objects.filter(job=job).exists()


def test_a_job_another_worker_holds_is_left_to_it_and_checked_again_when_the_lease_ends(
    warm_bundle, calls, cohort_a, model_version, settings, monkeypatch
):
    from portal.analyses.tasks import run_analysis

    settings.LOWMAG_TASK_MODE = "celery"
    sent = []
    monkeypatch.setattr(run_analysis, "apply_async", lambda *a, **kw: sent.append((a, kw)))
    (job,) = queued_jobs(cohort_a, model_version, [GOOD])
    AnalysisJob.objects.filter(pk=job.pk).update(
        state="running",
        claimed_by="gpu-2:77:alive",
        lease_expires_at=timezone.now() + timedelta(minutes=10),
    )
    assert run(job) == "running"
    assert calls == {"predict_slide": 0, "predict_slides": 0}
    assert AnalysisJob.objects.get(pk=job.pk).claimed_by == "gpu-2:77:alive"
    ((args, options),) = sent
    assert args == ((job.pk,),) and 590 <= options["countdown"] <= 602


def test_a_worker_that_reports_progress_keeps_its_claim(cohort_a, model_version):
    from portal.analyses.tasks import _ProgressReporter

    jobs = queued_jobs(cohort_a, model_version, [GOOD, GOOD])
    assert jobs[0].claim("gpu-1:1:run", lease_s=5)
    taken = AnalysisJob.claim_waiting(model_version, "gpu-1:1:run", limit=3, lease_s=5)
    assert [job.pk for job in taken] == [jobs[1].pk]
    soon = timezone.now() + timedelta(seconds=5)
    _ProgressReporter(*jobs, holder="gpu-1:1:run", lease_s=300)("features", 0.0)
    for job in jobs:
        job.refresh_from_db()
        assert job.lease_expires_at > soon + timedelta(seconds=200)
        assert (job.state, job.stage) == ("running", "features")


@pytest.mark.parametrize(
    "error",
    [
        OSError("slide storage unavailable"),
        OperationalError("database table is locked: analyses_analysisjob"),
    ],
    ids=["storage", "busy-database"],
)
def test_a_batch_a_transient_error_interrupts_hands_its_claims_back_and_is_retried(
    warm_bundle, cohort_a, model_version, settings, monkeypatch, error
):
    from analysis import pipeline
    from portal.analyses.tasks import TransientJobError, run_analysis

    def interrupted(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "predict_slides", interrupted)
    monkeypatch.setattr(run_analysis, "max_retries", 0)
    settings.LOWMAG_GPU_BATCH_SLIDES = 4
    jobs = queued_jobs(cohort_a, model_version, [GOOD, GOOD])
    with pytest.raises(TransientJobError):  # Celery retries it with backoff
        run(jobs[0])
    for job in jobs:
        job.refresh_from_db()
        assert job.state == "queued" and job.lease_expires_at is None  # anyone may run it
    assert f"retrying: {error}" in jobs[0].error


def test_batch_size_one_keeps_one_slide_per_task(
    warm_bundle, calls, cohort_a, model_version, settings
):
    settings.LOWMAG_GPU_BATCH_SLIDES = 1
    jobs = queued_jobs(cohort_a, model_version, [GOOD, GOOD])
    assert run(jobs[0]) == "succeeded"
    assert states(jobs) == ["succeeded", "queued"]
    assert calls == {"predict_slide": 1, "predict_slides": 0}
    assert AnalysisJob.objects.get(pk=jobs[0].pk).claimed_by  # who ran it stays recorded


@pytest.mark.django_db(transaction=True)
def test_two_workers_claiming_at_once_never_take_the_same_job(cohort_a, model_version):
    if connection.vendor == "sqlite":
        pytest.skip("the in-memory test database is shared by threads; PostgreSQL runs this")
    jobs = queued_jobs(cohort_a, model_version, ["x.svs"] * 8)
    start = threading.Barrier(2)
    claimed: dict[str, list[int]] = {}

    def claim(holder: str) -> None:
        try:
            start.wait()
            taken = AnalysisJob.claim_waiting(model_version, holder, limit=8, lease_s=60)
            claimed[holder] = [job.pk for job in taken]
        finally:
            connection.close()

    workers = [threading.Thread(target=claim, args=(f"w{k}",)) for k in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    first, second = claimed["w0"], claimed["w1"]
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(job.pk for job in jobs)
    for holder, pks in claimed.items():
        assert set(AnalysisJob.objects.filter(pk__in=pks).values_list("claimed_by", flat=True)) <= {
            holder
        }


def test_a_batch_setting_below_one_is_refused_with_the_setting_named(monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    from portal.env import env_int

    monkeypatch.setenv("LOWMAG_GPU_BATCH_SLIDES", "0")
    with pytest.raises(ImproperlyConfigured, match="LOWMAG_GPU_BATCH_SLIDES='0' is too small"):
        env_int("LOWMAG_GPU_BATCH_SLIDES", 4, minimum=1)
