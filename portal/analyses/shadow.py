"""Shadow mode: a candidate model analyses every new slide of a cohort beside the active one.

Shadow results are ``ShadowPrediction`` rows, a table apart from ``Prediction``: the API, the
pages, FHIR reports, webhooks and the AI suggestion sealed into a diagnosis read
``Prediction`` only, so a pathologist can never see (or be influenced by) a shadow result.
Only admins see the comparison: each model's agreement with the signed calls on the same
cases, with an exact McNemar test, once ``min_signed`` cases are signed.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.db import IntegrityError, transaction
from django.utils import timezone

from portal.analyses.models import ModelVersion, Prediction, ShadowDeployment, ShadowPrediction
from portal.cases.models import Cohort
from portal.core.dispatch import dispatch
from portal.reviews import audit
from portal.reviews.models import Diagnosis

log = logging.getLogger(__name__)


class ShadowError(Exception):
    """A shadow deployment cannot start; the message says why."""


def start_shadow(
    candidate: ModelVersion, cohort: Cohort, actor, min_signed: int = 10, request=None
) -> ShadowDeployment:
    from portal.analyses.lifecycle import weights_problem
    from portal.cases.access import is_admin

    if not is_admin(actor):
        raise PermissionError("Only admins can run models in shadow mode.")
    if problem := weights_problem(candidate):
        raise ShadowError(f"{candidate} cannot run in shadow mode: {problem}.")
    if cohort.active_model_id is None:
        raise ShadowError(
            f"cohort '{cohort.name}' has no active model to compare with; activate one first"
        )
    if cohort.active_model_id == candidate.pk:
        raise ShadowError(f"{candidate} is already the active model of cohort '{cohort.name}'")
    if min_signed < 1:
        raise ShadowError("the number of signed cases before comparing must be at least 1")
    with transaction.atomic():
        running = ShadowDeployment.objects.filter(cohort=cohort, active=True).first()
        if running is not None:
            raise ShadowError(
                f"{running.candidate} already runs in shadow mode in cohort '{cohort.name}'; "
                "stop it or activate it first"
            )
        deployment = ShadowDeployment.objects.create(
            cohort=cohort,
            candidate=candidate,
            baseline=cohort.active_model,
            min_signed=min_signed,
            started_by=actor,
        )
        audit.record(
            actor,
            "model.shadow.start",
            candidate,
            request=request,
            cohort=cohort.pk,
            deployment=deployment.pk,
            baseline=cohort.active_model_id,
            min_signed=min_signed,
        )
    return deployment


def stop_shadow(deployment: ShadowDeployment, actor, request=None) -> None:
    from portal.cases.access import is_admin

    if not is_admin(actor):
        raise PermissionError("Only admins can stop shadow mode.")
    updated = ShadowDeployment.objects.filter(pk=deployment.pk, active=True).update(
        active=False, ended_at=timezone.now()
    )
    if updated:
        audit.record(
            actor,
            "model.shadow.stop",
            deployment.candidate,
            request=request,
            cohort=deployment.cohort_id,
        )


def request_shadow(slide) -> ShadowPrediction | None:
    """Queue the cohort's shadow candidate on a ready slide (once per slide and model)."""
    if slide.status != "ready":
        return None
    deployment = (
        ShadowDeployment.objects.filter(cohort_id=slide.case.cohort_id, active=True)
        .select_related("candidate")
        .first()
    )
    if deployment is None:
        return None
    try:
        shadow, created = ShadowPrediction.objects.get_or_create(
            slide=slide, model_version=deployment.candidate, defaults={"deployment": deployment}
        )
    except IntegrityError:
        return ShadowPrediction.objects.get(slide=slide, model_version=deployment.candidate)
    if created or shadow.state == "failed":
        dispatch(run_shadow, shadow.pk)
    return shadow


@shared_task(acks_late=True, reject_on_worker_lost=True)
def run_shadow(shadow_id: int) -> str:
    import analysis
    from analysis.errors import AnalysisError
    from analysis.pipeline import predict_slide
    from portal.analyses.tasks import loaded_bundle

    shadow = ShadowPrediction.objects.select_related("slide", "model_version").get(pk=shadow_id)
    if shadow.state == "succeeded":
        return "succeeded"
    try:
        result = predict_slide(loaded_bundle(shadow.model_version), shadow.slide.path)
    except AnalysisError as exc:
        ShadowPrediction.objects.filter(pk=shadow.pk).update(state="failed", error=str(exc))
        return "failed"
    ShadowPrediction.objects.filter(pk=shadow.pk).update(
        state="succeeded",
        error="",
        probabilities=result.probabilities,
        predicted_class=result.predicted_class,
        confidence=result.confidence,
        code_version=analysis.__version__,
        input_sha256=shadow.slide.sha256,
    )
    audit.record(  # no result in the trail: shadow calls stay with the comparison
        None,
        "model.shadow.analyse",
        shadow.model_version,
        case=shadow.slide.case,
        slide=shadow.slide_id,
        deployment=shadow.deployment_id,
    )
    return "succeeded"


def _case_call(rows) -> str | None:
    """The case-level AI call: the most confident of the case's slide predictions."""
    best = max(rows, key=lambda r: r[1], default=None)
    return None if best is None else best[0]


def _same(a: str | None, b: str) -> bool:
    return a is not None and a.strip().lower() == b.strip().lower()


def comparison(deployment: ShadowDeployment) -> dict:
    """Both models against the signed calls on the cases both analysed (admins only)."""
    from analysis.validation import mcnemar

    shadows = ShadowPrediction.objects.filter(deployment=deployment, state="succeeded")
    candidate_rows: dict[int, list[tuple[str, float]]] = {}
    for s in shadows.select_related("slide"):
        candidate_rows.setdefault(s.slide.case_id, []).append((s.predicted_class, s.confidence))
    baseline_rows: dict[int, list[tuple[str, float]]] = {}
    for p in Prediction.objects.filter(
        model_version=deployment.baseline, slide__case_id__in=candidate_rows
    ).select_related("slide"):
        baseline_rows.setdefault(p.slide.case_id, []).append((p.predicted_class, p.confidence))
    current: dict[int, Diagnosis] = {}
    for d in Diagnosis.objects.filter(
        case_id__in=candidate_rows, status=Diagnosis.SIGNED
    ).select_related("case"):
        if d.case_id not in current or d.version > current[d.case_id].version:
            current[d.case_id] = d
    cases: list[dict[str, Any]] = []
    for case_id, diagnosis in sorted(current.items()):
        if not diagnosis.call.strip() or case_id not in baseline_rows:
            continue
        baseline_call = _case_call(baseline_rows[case_id])
        candidate_call = _case_call(candidate_rows[case_id])
        cases.append(
            {
                "case": case_id,
                "accession_number": diagnosis.case.accession_number,
                "signed_call": diagnosis.call,
                "baseline_call": baseline_call,
                "candidate_call": candidate_call,
                "baseline_agrees": _same(baseline_call, diagnosis.call),
                "candidate_agrees": _same(candidate_call, diagnosis.call),
            }
        )
    n = len(cases)
    result: dict = {
        "deployment": deployment.pk,
        "cohort": deployment.cohort_id,
        "baseline": {"id": deployment.baseline_id, "name": str(deployment.baseline)},
        "candidate": {"id": deployment.candidate_id, "name": str(deployment.candidate)},
        "active": deployment.active,
        "min_signed": deployment.min_signed,
        "n_signed": n,
        "n_shadow_predictions": shadows.count(),
        "ready": n >= deployment.min_signed,
        "cases": cases,
    }
    if n:
        result["baseline"]["agreement"] = sum(c["baseline_agrees"] for c in cases) / n
        result["candidate"]["agreement"] = sum(c["candidate_agrees"] for c in cases) / n
        result["paired_test"] = mcnemar(
            [c["candidate_agrees"] for c in cases], [c["baseline_agrees"] for c in cases]
        )
    return result
