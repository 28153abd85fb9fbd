"""Training and validating a model on a cohort's signed cases, as a job on the ``gpu`` queue.

``start_training`` (admins only) checks the training set at once (one class, too few patients,
conflicting calls, missing files: refused, nothing created), then queues ``run_training``,
which reports its stage and progress on the ``TrainingRun`` row and, live, to admins on the
websocket ``/ws/training/<run id>/``:

verify (every slide's SHA-256) -> features (the cohort's active encoder, or MAGA-aligned on the
cohort's own slides when asked) -> crossval (GLTrans, patient-level k-fold) -> bundle (trained on
all cases) -> report (pooled AUC + bootstrap CI, confusion matrix at the operating threshold,
ROC and calibration PNGs, case list, provenance) -> a new, inactive ``ModelVersion``.
A failure leaves the run ``failed`` with the reason, and no model version or files behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import date
from pathlib import Path
from typing import Any

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from portal.analyses import progress as live
from portal.analyses import trainingset
from portal.analyses.models import ModelVersion, TrainingRun
from portal.cases.models import Cohort
from portal.core.dispatch import dispatch
from portal.reviews import audit

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "folds": 5,
    "epochs": 20,
    "patience": 5,
    "lr": 1e-4,
    "seed": 0,
    "bootstrap": 1000,
    "threshold": 0.5,
    "mil_config": {"dim": 64, "n_heads": 4, "depth": 1},
    "maga": False,
    "maga_epochs": 2,
    "maga_pairs_per_slide": 64,
    "encoder": None,  # None: the encoder of the cohort's active model (else resnet50_trunc)
}
STAGES = ("verify", "features", "maga", "crossval", "bundle", "report")


def _options(options: dict | None) -> dict[str, Any]:
    unknown = set(options or {}) - set(DEFAULTS)
    if unknown:
        raise trainingset.TrainingSetError(
            f"unknown training options {sorted(unknown)}; known: {sorted(DEFAULTS)}"
        )
    merged = {**DEFAULTS, **(options or {})}
    for key in ("folds", "epochs", "patience", "bootstrap"):
        if not isinstance(merged[key], int) or merged[key] < 1:
            raise trainingset.TrainingSetError(f"option {key} must be a positive whole number")
    if merged["folds"] < 3:
        raise trainingset.TrainingSetError("option folds must be at least 3")
    if not 0.0 < float(merged["threshold"]) < 1.0:
        raise trainingset.TrainingSetError("option threshold must lie between 0 and 1")
    return merged


def start_training(
    cohort: Cohort,
    signed_from: date,
    signed_to: date,
    actor,
    options: dict | None = None,
    request=None,
) -> TrainingRun:
    """Validate the training set and queue the run; raises ``TrainingSetError`` on bad input."""
    from portal.cases.access import is_admin

    if not is_admin(actor):
        raise PermissionError("Only admins can train models.")
    merged = _options(options)
    training_set = trainingset.collect(cohort, signed_from, signed_to)
    if len(training_set.patients) < merged["folds"]:
        raise trainingset.TrainingSetError(
            f"{len(training_set.patients)} patients cannot fill {merged['folds']} folds; "
            "use fewer folds"
        )
    run = TrainingRun.objects.create(
        cohort=cohort,
        signed_from=signed_from,
        signed_to=signed_to,
        options=merged,
        created_by=actor,
        n_cases=len(training_set.cases),
        data_sha256=training_set.data_sha256(),
    )
    audit.record(
        actor,
        "model.train.start",
        run,
        request=request,
        cohort=cohort.pk,
        signed_from=signed_from.isoformat(),
        signed_to=signed_to.isoformat(),
        n_slides=len(training_set.cases),
        n_patients=len(training_set.patients),
        classes=training_set.class_counts(),
        excluded={k: len(v) for k, v in training_set.excluded.items()},
        data_sha256=run.data_sha256,
    )
    dispatch(run_training, run.pk)
    return run


class _Progress:
    """Stage and progress onto the run row (read live through the API); seconds per stage."""

    def __init__(self, run: TrainingRun):
        self.run = run
        self.timings: dict[str, float] = {}
        self._stage, self._since, self._pushed = "", time.perf_counter(), 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.perf_counter()
        if stage != self._stage:
            self._stage, self._since = stage, now
        self.timings[stage] = round(now - self._since, 3)
        TrainingRun.objects.filter(pk=self.run.pk).update(stage=stage, progress=float(fraction))
        if fraction in (0.0, 1.0) or now - self._pushed >= 0.5:  # throttled, like analyses
            self._pushed = now
            live.training_update(self.run.pk, {"stage": stage, "progress": float(fraction)})

    def within(self, stage: str):
        return lambda fraction: self(stage, fraction)


def _device() -> str:
    from portal.analyses.tasks import _device

    return _device()


def _encoder(cohort: Cohort, options: dict[str, Any]):
    """(encoder, weights path or None): the active model's encoder, unless the run names one."""
    from analysis.bundle import load_manifest
    from analysis.encoders import build_encoder

    name, weights = options.get("encoder"), None
    active = cohort.active_model
    if not name and active is not None:
        manifest = load_manifest(active.bundle_path)
        name = manifest.encoder["name"]
        if manifest.encoder.get("weights"):
            weights = Path(active.bundle_path) / manifest.encoder["weights"]
    name = name or "resnet50_trunc"
    return build_encoder(name, weights=weights, device=_device()), weights


def _maga(training_set, work: Path, encoder_name: str, teacher, options: dict, progress):
    from analysis.maga import MagaConfig, build_pair_cache, train_maga

    progress(0.0)
    cache = build_pair_cache(
        [c.slide_path for c in training_set.cases],
        work / "maga-pairs",
        low_mag=5.0,
        max_patches_per_slide=int(options["maga_pairs_per_slide"]),
        seed=int(options["seed"]),
        workers=1,
    )
    progress(0.3)
    result = train_maga(
        cache,
        work / "maga",
        MagaConfig(
            encoder=encoder_name,
            epochs=int(options["maga_epochs"]),
            lr=1e-3,
            seed=int(options["seed"]),
            device=_device(),
        ),
        teacher_weights=teacher,
    )
    progress(1.0)
    return result


@shared_task(acks_late=True, reject_on_worker_lost=True)
def run_training(run_id: int) -> str:
    run = TrainingRun.objects.select_related("cohort__active_model").get(pk=run_id)
    if run.state in ("succeeded", "failed"):
        return run.state
    TrainingRun.objects.filter(pk=run.pk).update(
        state="running", started_at=timezone.now(), error=""
    )
    work = Path(settings.DATA_DIR) / "training" / f"run-{run.pk}"
    try:
        model = _train(run, work)
    except (trainingset.TrainingSetError, ValueError, OSError) as exc:
        return _fail(run, work, str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure ends the run with its reason
        from analysis.errors import AnalysisError

        if not isinstance(exc, AnalysisError):
            log.exception("training run %s failed", run.pk)
        return _fail(run, work, str(exc) or type(exc).__name__)
    TrainingRun.objects.filter(pk=run.pk).update(
        state="succeeded",
        stage="done",
        progress=1.0,
        model_version=model,
        work_dir=str(work),
        finished_at=timezone.now(),
    )
    live.training_update(run.pk, {"state": "succeeded", "model_version": model.pk})
    report = model.report
    audit.record(
        None,
        "model.train.finish",
        model,
        run=run.pk,
        cohort=run.cohort_id,
        auc_pooled=report.get("auc_pooled"),
        auc_pooled_ci=report.get("auc_pooled_ci"),
        data_sha256=run.data_sha256,
    )
    return "succeeded"


def _fail(run: TrainingRun, work: Path, reason: str) -> str:
    shutil.rmtree(work, ignore_errors=True)
    TrainingRun.objects.filter(pk=run.pk).update(
        state="failed", error=reason[:2000], finished_at=timezone.now()
    )
    live.training_update(run.pk, {"state": "failed", "error": reason[:500]})
    audit.record(None, "model.train.fail", run, cohort=run.cohort_id, reason=reason[:500])
    return "failed"


def _train(run: TrainingRun, work: Path) -> ModelVersion:
    import analysis
    from analysis.bundle import build_bundle_from_features
    from analysis.commands.crossval import load_bags
    from analysis.encoders import build_encoder
    from analysis.evaluate import _json_safe, crossval
    from analysis.train import TrainConfig
    from analysis.validation import validation_report

    options = run.options
    cohort = run.cohort
    progress = _Progress(run)
    training_set = trainingset.collect(cohort, run.signed_from, run.signed_to)
    if training_set.data_sha256() != run.data_sha256:
        raise trainingset.TrainingSetError(
            "the signed cases changed since the run was requested (a diagnosis was amended); "
            "start a new run"
        )
    progress("verify", 0.0)
    trainingset.verify_files(training_set, progress.within("verify"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    encoder, encoder_weights = _encoder(cohort, options)
    maga_info = None
    if options.get("maga"):
        maga = _maga(
            training_set, work, encoder.name, encoder_weights, options, progress.within("maga")
        )
        encoder_weights = maga.student_path
        encoder = build_encoder(encoder.name, weights=encoder_weights, device=_device())
        maga_info = {"epochs": options["maga_epochs"], **maga.alignment}
    magnification = 5.0
    set_dir = trainingset.write(
        training_set, work / "set", encoder, magnification, progress.within("features")
    )
    progress("crossval", 0.0)
    bags, classes = load_bags(set_dir / "features", set_dir / "labels.csv")
    train_cfg = TrainConfig(
        lr=float(options["lr"]),
        epochs=int(options["epochs"]),
        patience=int(options["patience"]),
        seed=int(options["seed"]),
        device=_device(),
    )
    result = crossval(
        bags,
        "gltrans",
        dict(options["mil_config"]),
        train_cfg,
        folds=int(options["folds"]),
        out_dir=None,  # the validation report below draws its own ROC
        classes=classes,
        n_bootstrap=int(options["bootstrap"]),
        split_seed=int(options["seed"]),
    )
    progress("crossval", 1.0)
    progress("bundle", 0.0)
    name = f"{cohort.slug}-gltrans"
    version = f"r{run.pk}-{run.data_sha256[:8]}"
    bundle_dir = Path(settings.BUNDLE_DIR) / f"{name}-{version}"
    shutil.rmtree(bundle_dir, ignore_errors=True)
    task = f"{' vs '.join(classes)} ({cohort.name})"
    build_bundle_from_features(
        set_dir / "features",
        set_dir / "labels.csv",
        bundle_dir,
        name=name,
        version=version,
        task=task,
        magnification=magnification,
        encoder_name=encoder.name,
        encoder_weights=encoder_weights,
        mil_name="gltrans",
        mil_config=result.mil_config,
        epochs=int(options["epochs"]),
        seed=int(options["seed"]),
        maga=maga_info,
        metrics=result.summary,
        is_demo=cohort.is_demo,
    )
    progress("bundle", 1.0)
    progress("report", 0.0)
    report = validation_report(
        result.predictions,
        classes,
        threshold=float(options["threshold"]),
        n_bootstrap=int(options["bootstrap"]),
        seed=int(options["seed"]),
        out_dir=bundle_dir / "report",
        title=f"{name} {version}",
    )
    report["cases"] = _case_list(training_set, result)
    report["crossval"] = {
        k: result.summary.get(k) for k in ("auc_mean", "auc_sd", "auc_mean_ci", "n_folds")
    }
    report["folds"] = result.fold_metrics
    report["provenance"] = {
        "code_version": analysis.__version__,
        "code_commit": os.environ.get("LOWMAG_GIT_SHA", ""),
        "data_sha256": run.data_sha256,
        "cohort": cohort.name,
        "signed_from": run.signed_from.isoformat(),
        "signed_to": run.signed_to.isoformat(),
        "excluded": training_set.excluded,
        "encoder": encoder.name,
        "encoder_weights": Path(str(encoder.weights_source)).name,
        "maga": maga_info,
        "mil": "gltrans",
        "mil_config": result.mil_config,
        "train_config": result.train_config,
        "options": options,
        "training_run": run.pk,
    }
    progress("report", 1.0)
    report["timings"] = dict(progress.timings)
    report = _json_safe(report)
    (bundle_dir / "report" / "report.json").write_text(
        json.dumps(report, indent=2, default=str, allow_nan=False)
    )
    return _register(bundle_dir, report, training_set, cohort)


def _case_list(training_set, result) -> list[dict[str, Any]]:
    by_slide = {c.slide_id: c for c in training_set.cases}
    p = result.predictions
    rows = []
    for i, slide_id in enumerate(p.slide_ids):
        case = by_slide[slide_id]
        probs = [round(float(v), 6) for v in p.probs[i]]
        rows.append(
            {
                "case": case.case_id,
                "accession_number": case.accession_number,
                "patient_id": case.patient_id,
                "slide": case.slide_pk,
                "slide_sha256": case.slide_sha256,
                "diagnosis": case.diagnosis_id,
                "diagnosis_version": case.diagnosis_version,
                "label": case.label,
                "fold": int(p.folds[i]),
                "probabilities": dict(zip(result.classes, probs, strict=True)),
            }
        )
    return rows


def _register(bundle_dir: Path, report: dict, training_set, cohort: Cohort) -> ModelVersion:
    from analysis.bundle import load_manifest, weights_sha256

    manifest = load_manifest(bundle_dir)
    n_patients, n_slides = len(training_set.patients), len(training_set.cases)
    limits = [
        f"Trained and validated on {n_slides} slides of {n_patients} patients of one cohort "
        f"('{cohort.name}'), signed {training_set.signed_from} to {training_set.signed_to}.",
        "Performance on other scanners, stains, sites or case mixes is unknown.",
        "Validated by patient-level cross-validation only, not on an independent test set.",
    ]
    low, high = report.get("auc_pooled_ci") or [None, None]
    if low is not None and high is not None and high - low > 0.2:
        limits.append(f"The AUC's 95% CI ({low:.2f}-{high:.2f}) is wide: few cases.")
    if manifest.is_demo:
        limits.insert(0, "Demo model trained on synthetic data: not for diagnosis.")
    from dataclasses import asdict

    return ModelVersion.objects.create(
        name=manifest.name,
        version=manifest.version,
        task=manifest.task,
        classes=list(manifest.classes),
        magnification=float(manifest.magnification),
        bundle_path=str(bundle_dir),
        manifest=json.loads(json.dumps(asdict(manifest), default=str)),
        sha256=weights_sha256(bundle_dir),
        is_demo=manifest.is_demo,
        intended_use=(
            f"Assist the pathologists of cohort '{cohort.name}' with {manifest.task} on 5x "
            "whole-slide images; every call is reviewed and signed by a pathologist."
        ),
        known_limits="\n".join(limits),
        report=report,
    )
