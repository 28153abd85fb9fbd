"""Celery tasks: thin wrappers that call ``analysis.pipeline`` and store what it returns.

Idempotency: a job is keyed by (slide SHA-256, model SHA-256) and a Prediction is unique per
(slide, model version), so a retried or re-delivered task finds the earlier result instead
of creating a second one. Tasks are ``acks_late``: a worker killed mid-analysis leaves the
message on the broker and another worker runs the job again from the start, once the claim
the dead worker held has run out (``AnalysisJob.claim``: a lease that progress renews).

An analysis task also takes the other slides waiting for its model (``LOWMAG_GPU_BATCH_SLIDES``):
it claims them, encodes them in shared batches and finishes each job on its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
from celery import shared_task
from django.db import IntegrityError, OperationalError, transaction
from django.utils import timezone

from analysis.errors import AnalysisError
from portal.analyses import progress as live
from portal.analyses.models import AnalysisJob, ModelVersion, Prediction
from portal.core.dispatch import dispatch
from portal.core.metrics import publish_worker_memory
from portal.core.middleware import is_database_busy

if TYPE_CHECKING:
    from analysis.pipeline import SlidePrediction

log = logging.getLogger(__name__)

_bundles: dict[str, object] = {}  # model sha256 -> LoadedBundle: workers keep models warm
_bundles_lock = threading.Lock()


class JobCancelled(Exception):
    pass


class TransientJobError(Exception):
    """A failure worth retrying (storage briefly unavailable, database restarting)."""


def _device() -> str:
    """The worker's torch device: ``LOWMAG_DEVICE``, else cuda when present (``analysis.devices``)."""
    from django.conf import settings

    from analysis.devices import resolve_device

    return resolve_device(getattr(settings, "LOWMAG_DEVICE", "") or None)


def loaded_bundle(model_version: ModelVersion):
    """The model, loaded once per worker process on its device and warmed up, then kept."""
    from analysis.bundle import load_bundle

    with _bundles_lock:
        bundle = _bundles.get(model_version.sha256)
        if bundle is None:
            _configure_torch_threads()
            bundle = load_bundle(model_version.bundle_path, device=_device())
            _warm_up(bundle)
            _bundles[model_version.sha256] = bundle
            log.info("model %s loaded on %s", bundle.manifest.label, bundle.encoder.device)
        return bundle


def preload_active_models() -> int:
    """Load every model active in some cohort into this process (a gpu worker child at start,
    with ``LOWMAG_PRELOAD_MODELS``), so the first slide does not wait for it. Returns how many
    loaded; a model that fails to load is logged and left to fail its jobs with the reason."""
    from django.db import close_old_connections

    loaded = 0
    try:
        versions = list(ModelVersion.objects.filter(active_in_cohorts__isnull=False).distinct())
    finally:
        close_old_connections()
    for version in versions:
        try:
            loaded_bundle(version)
            loaded += 1
        except Exception:  # noqa: BLE001 - its jobs report the reason
            log.exception("preloading model %s failed", version)
    publish_worker_memory()
    return loaded


def _warm_up(bundle) -> None:
    """One tiny batch through the encoder, so the first slide does not pay for kernel setup."""
    size = int(bundle.manifest.patch_size)
    bundle.encoder.embed(np.full((2, size, size, 3), 220, np.uint8))


def _configure_torch_threads() -> None:
    from django.conf import settings

    threads = int(getattr(settings, "LOWMAG_TORCH_THREADS", 0) or 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def request_analysis(slide, model_version: ModelVersion | None = None) -> AnalysisJob | None:
    """Create (or find) the job for this slide and model, and queue it when it needs running."""
    if model_version is None:  # read afresh: the cohort object in hand may predate activation
        model_version = ModelVersion.objects.filter(
            active_in_cohorts__pk=slide.case.cohort_id
        ).first()
    if model_version is None or not slide.is_ready:
        return None
    key = AnalysisJob.key_for(slide.sha256, model_version.sha256, slide.pk)
    try:
        job, created = AnalysisJob.objects.get_or_create(
            slide=slide, model_version=model_version, defaults={"idempotency_key": key}
        )
    except IntegrityError:  # a concurrent request created it first
        job, created = AnalysisJob.objects.get(idempotency_key=key), False
    if not created and job.state in AnalysisJob.RETRYABLE:
        job.requeue()
    elif not created:
        return job
    slide.case.start_analysis()
    dispatch(run_analysis, job.pk)
    return job


class _ProgressReporter:
    """Writes stage/progress to the jobs' rows (throttled) and pushes it over Channels.

    A job cancelled meanwhile drops out (its id joins ``cancelled``) and the others go on;
    when none is left, ``JobCancelled`` stops the analysis. Each report renews the lease of
    the jobs ``holder`` claimed: a lease runs out only when its worker has gone quiet.
    """

    def __init__(
        self,
        *jobs: AnalysisJob,
        holder: str = "",
        lease_s: float = 0.0,
        min_interval_s: float = 0.5,
    ):
        self.live = [job.pk for job in jobs]
        self.cancelled: set[int] = set()
        self.holder, self.lease_s = holder, lease_s
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if fraction not in (0.0, 1.0) and now - self._last < self.min_interval_s:
            return
        self._last = now
        try:
            self._record(stage, fraction)
        except OperationalError as exc:
            if not is_database_busy(exc):
                raise
            # a report is worth less than the analysis: the next one (or the result) follows
            log.warning(
                "jobs %s: progress %s %.2f not recorded: %s", self.live, stage, fraction, exc
            )
            return
        for pk in self.live:
            live.job_update(
                pk, {"state": AnalysisJob.State.RUNNING, "stage": stage, "progress": fraction}
            )

    def _record(self, stage: str, fraction: float) -> None:
        cancelled = AnalysisJob.objects.filter(pk__in=self.live, state=AnalysisJob.State.CANCELLED)
        self.cancelled.update(cancelled.values_list("pk", flat=True))
        self.live = [pk for pk in self.live if pk not in self.cancelled]
        if not self.live:
            raise JobCancelled()
        AnalysisJob.objects.filter(pk__in=self.live).update(stage=stage, progress=fraction)
        if self.holder:
            AnalysisJob.renew(self.live, self.holder, self.lease_s)


def _store_prediction(job: AnalysisJob, result) -> Prediction:
    import analysis

    grid = result.grid
    try:
        with transaction.atomic():
            prediction, _ = Prediction.objects.get_or_create(
                slide=job.slide,
                model_version=job.model_version,
                defaults={
                    "job": job,
                    "probabilities": result.probabilities,
                    "predicted_class": result.predicted_class,
                    "confidence": result.confidence,
                    "instance_scores": Prediction.pack_scores(result.instance_scores),
                    "clusters": np.asarray(result.clusters, dtype=np.uint8).tobytes(),
                    "evidence_scores": Prediction.pack_scores(result.evidence_scores),
                    "evidence_class": result.evidence_class,
                    "grid": {
                        "n_rows": int(grid.n_rows),
                        "n_cols": int(grid.n_cols),
                        "l0_patch_size": float(grid.l0_patch_size),
                        "grid_rc": grid.grid_rc.tolist(),
                        "magnification": result.magnification,
                    },
                    "code_version": analysis.__version__,
                    "input_sha256": job.slide.sha256,
                },
            )
    except IntegrityError:
        prediction = Prediction.objects.get(slide=job.slide, model_version=job.model_version)
    return prediction


def _finish(job: AnalysisJob, **fields) -> None:
    fields["finished_at"] = timezone.now()
    AnalysisJob.objects.filter(pk=job.pk).update(**fields)
    live.job_update(job.pk, {k: v for k, v in fields.items() if k != "finished_at"})


@shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(TransientJobError,),
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=4,
)
def run_analysis(self, job_id: int) -> str:
    """Analyse the job's slide, together with up to ``LOWMAG_GPU_BATCH_SLIDES - 1`` other
    slides queued for the same model, claimed under a lease (their own messages then find
    them done, or run them when the lease ran out)."""
    job = AnalysisJob.objects.select_related("slide__case__cohort", "model_version").get(pk=job_id)
    if job.state in AnalysisJob.FINAL:
        return job.state
    if Prediction.objects.filter(slide=job.slide, model_version=job.model_version).exists():
        _finish(job, state=AnalysisJob.State.SUCCEEDED, progress=1.0, stage="done")
        return AnalysisJob.State.SUCCEEDED
    holder, lease_s = _holder(), _setting("LOWMAG_CLAIM_LEASE_S")
    if not job.claim(holder, lease_s):
        return _left_to_its_holder(job)
    jobs = [job] + AnalysisJob.claim_waiting(
        job.model_version, holder, limit=_setting("LOWMAG_GPU_BATCH_SLIDES") - 1, lease_s=lease_s
    )
    try:
        outcomes = _analyse(jobs, holder, lease_s)
    except BaseException as exc:
        AnalysisJob.release([claimed.pk for claimed in jobs], holder)
        # storage or a database busy with other writes: the same slides, again, a bit later
        if isinstance(exc, (OSError, ConnectionError)) or is_database_busy(exc):
            AnalysisJob.objects.filter(pk=job.pk).update(error=f"retrying: {exc}")
            raise TransientJobError(str(exc)) from exc
        raise
    predictions = [
        _conclude(claimed, outcome) for claimed, outcome in zip(jobs, outcomes, strict=True)
    ]
    for claimed, outcome, prediction in zip(jobs, outcomes, predictions, strict=True):
        if prediction is not None:  # a research layer: after every result is out
            _store_clusters(claimed, prediction, outcome)
    publish_worker_memory()
    return AnalysisJob.objects.values_list("state", flat=True).get(pk=job.pk)


def _setting(name: str) -> int:
    from django.conf import settings

    return int(getattr(settings, name))


def _holder() -> str:
    """This run of the task, as a job's ``claimed_by`` records it: host:pid:run."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _left_to_its_holder(job: AnalysisJob) -> str:
    """Another run holds the job: it finishes it. Under Celery this message comes back when the
    lease ends, in case that run died; in-process runners have one worker thread, so the
    holder finishes (or releases) the job before this message runs."""
    from portal.core.dispatch import task_mode

    job.refresh_from_db(fields=["state", "lease_expires_at"])
    if job.state not in AnalysisJob.FINAL and task_mode() == "celery":
        lease_end = job.lease_expires_at or timezone.now()  # none: released a moment ago
        wait_s = (lease_end - timezone.now()).total_seconds()
        run_analysis.apply_async((job.pk,), countdown=max(1, int(wait_s) + 1))
    return job.state


Outcome: TypeAlias = "SlidePrediction | AnalysisError | JobCancelled"


def _analyse(jobs: list[AnalysisJob], holder: str, lease_s: float) -> list[Outcome]:
    """Each claimed job's prediction, refusal or cancellation. Several slides share one pass
    (``predict_slides``); when one of them is refused, they run one by one, so that only
    that slide's job fails."""
    from analysis import pipeline

    try:
        bundle = loaded_bundle(jobs[0].model_version)
    except AnalysisError as exc:
        return [exc for _ in jobs]
    if len(jobs) == 1:
        return [_analyse_one(bundle, jobs[0], holder, lease_s)]
    reporter = _ProgressReporter(*jobs, holder=holder, lease_s=lease_s)
    paths = [job.slide.path for job in jobs]
    try:
        results = pipeline.predict_slides(bundle, paths, progress=reporter, clusters=False)
    except JobCancelled as exc:
        return [exc for _ in jobs]
    except AnalysisError as exc:
        log.info("a slide of a batch was refused (%s); analysing them one by one", exc)
        return [_analyse_one(bundle, job, holder, lease_s) for job in jobs]
    return [
        JobCancelled() if job.pk in reporter.cancelled else result
        for job, result in zip(jobs, results, strict=True)
    ]


def _analyse_one(bundle, job: AnalysisJob, holder: str, lease_s: float) -> Outcome:
    from analysis import pipeline

    reporter = _ProgressReporter(job, holder=holder, lease_s=lease_s)
    try:
        return pipeline.predict_slide(bundle, job.slide.path, progress=reporter, clusters=False)
    except (AnalysisError, JobCancelled) as exc:
        return exc


def _conclude(job: AnalysisJob, outcome: Outcome) -> Prediction | None:
    """Finish one job from what its analysis gave; the stored prediction when there is one."""
    if isinstance(outcome, JobCancelled):
        _finish(job, state=AnalysisJob.State.CANCELLED, stage="cancelled")
        return None
    if isinstance(outcome, AnalysisError):
        _finish(job, state=AnalysisJob.State.FAILED, error=str(outcome))
        _case_after_job(job)
        return None
    prediction = _store_prediction(job, outcome)
    _finish(
        job, state=AnalysisJob.State.SUCCEEDED, progress=1.0, stage="done", timings=outcome.timings
    )
    _case_after_job(job)
    _announce_prediction(job, prediction)
    return prediction


def _store_clusters(job: AnalysisJob, prediction: Prediction, result) -> None:
    try:
        clusters = result.compute_clusters()
    except Exception:  # noqa: BLE001 - the prediction stands without its cluster map
        log.exception("cluster map of job %s failed; the prediction stands without it", job.pk)
        return
    Prediction.objects.filter(pk=prediction.pk).update(
        clusters=np.asarray(clusters, dtype=np.uint8).tobytes()
    )
    AnalysisJob.objects.filter(pk=job.pk).update(timings=result.timings)


def _case_after_job(job: AnalysisJob) -> None:
    case = job.slide.case
    case.analysis_finished()
    live.worklist_update(case)


def _announce_prediction(job: AnalysisJob, prediction: Prediction) -> None:
    from portal.integrations.webhooks import emit

    case = job.slide.case
    emit(
        "prediction.ready",
        case.cohort,
        {
            "case": {"id": case.pk, "accession_number": case.accession_number},
            "slide": {"id": job.slide.pk, "sha256": job.slide.sha256},
            "prediction": {
                "id": prediction.pk,
                "predicted_class": prediction.predicted_class,
                "confidence": prediction.confidence,
                "probabilities": prediction.probabilities,
                "model": str(job.model_version),
            },
        },
    )


def cancel_job(job: AnalysisJob) -> bool:
    """Ask a queued or running job to stop; a running one stops at its next progress report."""
    if not job.cancel():
        return False
    live.job_update(job.pk, {"state": AnalysisJob.State.CANCELLED})
    return True
