"""Celery tasks: thin wrappers that call ``analysis.pipeline`` and store what it returns.

Idempotency: a job is keyed by (slide SHA-256, model SHA-256) and a Prediction is unique per
(slide, model version), so a retried or re-delivered task finds the earlier result instead
of creating a second one. Tasks are ``acks_late``: a worker killed mid-analysis leaves the
message on the broker and another worker runs the job again from the start.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from celery import shared_task
from django.db import IntegrityError, transaction
from django.utils import timezone

from analysis.errors import AnalysisError
from portal.analyses import progress as live
from portal.analyses.models import AnalysisJob, ModelVersion, Prediction
from portal.core.dispatch import dispatch
from portal.core.metrics import publish_worker_memory

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
    """Writes stage/progress to the job row (throttled) and pushes it over Channels."""

    def __init__(self, job: AnalysisJob, min_interval_s: float = 0.5):
        self.job = job
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if fraction not in (0.0, 1.0) and now - self._last < self.min_interval_s:
            return
        self._last = now
        if self.job.is_cancelled():
            raise JobCancelled()
        AnalysisJob.objects.filter(pk=self.job.pk).update(stage=stage, progress=fraction)
        live.job_update(
            self.job.pk, {"state": AnalysisJob.State.RUNNING, "stage": stage, "progress": fraction}
        )


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
    from analysis.pipeline import predict_slide

    job = AnalysisJob.objects.select_related("slide__case__cohort", "model_version").get(pk=job_id)
    if job.state in AnalysisJob.FINAL:
        return job.state
    existing = Prediction.objects.filter(slide=job.slide, model_version=job.model_version).first()
    if existing is not None:
        _finish(job, state=AnalysisJob.State.SUCCEEDED, progress=1.0, stage="done")
        return AnalysisJob.State.SUCCEEDED
    AnalysisJob.objects.filter(pk=job.pk).update(
        state=AnalysisJob.State.RUNNING,
        started_at=timezone.now(),
        attempts=job.attempts + 1,
        error="",
    )
    try:
        bundle = loaded_bundle(job.model_version)
        result = predict_slide(
            bundle, job.slide.path, progress=_ProgressReporter(job), clusters=False
        )
    except JobCancelled:
        _finish(job, state=AnalysisJob.State.CANCELLED, stage="cancelled")
        return AnalysisJob.State.CANCELLED
    except AnalysisError as exc:
        _finish(job, state=AnalysisJob.State.FAILED, error=str(exc))
        _case_after_job(job)
        return AnalysisJob.State.FAILED
    except (OSError, ConnectionError) as exc:
        AnalysisJob.objects.filter(pk=job.pk).update(error=f"retrying: {exc}")
        raise TransientJobError(str(exc)) from exc
    prediction = _store_prediction(job, result)
    _finish(
        job, state=AnalysisJob.State.SUCCEEDED, progress=1.0, stage="done", timings=result.timings
    )
    _case_after_job(job)
    _announce_prediction(job, prediction)
    _store_clusters(job, prediction, result)  # a research layer: after the result is out
    publish_worker_memory()
    return AnalysisJob.State.SUCCEEDED


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
