"""Model card and shadow comparison pages.

- ``/models/<id>/``: the model card (intended use, training data, validation report, known
  limits, demo label) for admins and for pathologists of a cohort the model belongs to
  (trained on, active in, or shadowing in); anyone else gets 404. Admins also find the
  activation form there.
- ``/cohorts/<id>/shadow/``: the shadow comparison, admins only (a pathologist of the cohort
  gets 403, anyone else 404), with one-click activation and rollback, both audited.
"""

from __future__ import annotations

from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from portal.analyses.lifecycle import ActivationError, activate, rollback, weights_problem
from portal.analyses.models import (
    ModelActivation,
    ModelVersion,
    ShadowDeployment,
    TrainingRun,
)
from portal.analyses.shadow import ShadowError, comparison, start_shadow
from portal.cases.access import PATHOLOGIST, is_admin
from portal.cases.models import Cohort, Membership
from portal.reviews import audit

REPORT_IMAGES = {"roc", "calibration"}


def model_cohort_ids(model: ModelVersion) -> set[int]:
    """Cohorts a model belongs to: trained on, active in, activated in, or shadowing in."""
    ids = set(TrainingRun.objects.filter(model_version=model).values_list("cohort_id", flat=True))
    ids |= set(Cohort.objects.filter(active_model=model).values_list("pk", flat=True))
    ids |= set(
        ModelActivation.objects.filter(model_version=model).values_list("cohort_id", flat=True)
    )
    ids |= set(
        ShadowDeployment.objects.filter(Q(candidate=model) | Q(baseline=model)).values_list(
            "cohort_id", flat=True
        )
    )
    return ids


def _visible_model(user, model_id: int) -> ModelVersion:
    model = get_object_or_404(ModelVersion, pk=model_id)
    if is_admin(user):
        return model
    mine = Membership.objects.filter(
        user=user, role=PATHOLOGIST, cohort_id__in=model_cohort_ids(model)
    )
    if not mine.exists():
        raise Http404("No such model.")
    return model


def _admin_cohort(user, cohort_id: int) -> Cohort:
    """The cohort for an admin; 403 for its pathologists, 404 for anyone else."""
    cohort = get_object_or_404(Cohort, pk=cohort_id)
    if is_admin(user):
        return cohort
    if Membership.objects.filter(user=user, cohort=cohort).exists():
        raise PermissionDenied("Only admins see shadow results.")
    raise Http404("No such cohort.")


@login_required
@require_GET
def model_card(request, model_id: int):
    model = _visible_model(request.user, model_id)
    report = model.report or {}
    training = model.training_runs.select_related("cohort").first()
    admin = is_admin(request.user)
    context = {
        "model": model,
        "report": report,
        "training": training,
        "limits": [line for line in model.known_limits.splitlines() if line.strip()],
        "matrix": _matrix_rows(report),
        "cohorts": Cohort.objects.filter(pk__in=model_cohort_ids(model)),
        "is_admin": admin,
    }
    if admin:
        context["weights_problem"] = weights_problem(model)
        context["all_cohorts"] = Cohort.objects.all()
        context["shadowing"] = ShadowDeployment.objects.filter(candidate=model, active=True)
    return render(request, "analyses/model_card.html", context)


def _matrix_rows(report: dict) -> list[dict]:
    classes, matrix = report.get("classes") or [], report.get("confusion_matrix") or []
    return [{"truth": classes[i], "counts": row} for i, row in enumerate(matrix)]


@login_required
@require_GET
def report_image(request, model_id: int, name: str):
    model = _visible_model(request.user, model_id)
    if name not in REPORT_IMAGES:
        raise Http404("No such image.")
    path = Path(model.bundle_path) / "report" / f"{name}.png"
    if not path.is_file():
        raise Http404("This model has no validation report.")
    return FileResponse(open(path, "rb"), content_type="image/png")  # noqa: SIM115


@login_required
@require_POST
def activate_model(request, model_id: int):
    if not is_admin(request.user):
        raise PermissionDenied("Only admins can activate models.")
    model = get_object_or_404(ModelVersion, pk=model_id)
    cohort = get_object_or_404(Cohort, pk=request.POST.get("cohort") or 0)
    try:
        activate(model, cohort, request.user, request.POST.get("reason", ""), request=request)
    except ActivationError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{model} is now the active model of {cohort.name}.")
    if request.POST.get("back") == "shadow":
        return redirect("shadow-page", cohort_id=cohort.pk)
    return redirect("model-card", model_id=model.pk)


@login_required
@require_POST
def start_shadow_page(request, model_id: int):
    if not is_admin(request.user):
        raise PermissionDenied("Only admins can run models in shadow mode.")
    model = get_object_or_404(ModelVersion, pk=model_id)
    cohort = get_object_or_404(Cohort, pk=request.POST.get("cohort") or 0)
    try:
        min_signed = int(request.POST.get("min_signed") or 10)
        start_shadow(model, cohort, request.user, min_signed, request=request)
    except (ShadowError, ValueError) as exc:
        messages.error(request, str(exc))
        return redirect("model-card", model_id=model.pk)
    return redirect("shadow-page", cohort_id=cohort.pk)


@login_required
@require_GET
def shadow_page(request, cohort_id: int):
    cohort = _admin_cohort(request.user, cohort_id)
    deployment = (
        ShadowDeployment.objects.filter(cohort=cohort)
        .select_related("candidate", "baseline")
        .first()
    )
    result = comparison(deployment) if deployment is not None else None
    if deployment is not None and result is not None:
        audit.record(
            request.user,
            "model.shadow.compare",
            deployment.candidate,
            request=request,
            cohort=cohort.pk,
            n_signed=result["n_signed"],
        )
    last = ModelActivation.objects.filter(cohort=cohort, rolled_back_at__isnull=True).first()
    return render(
        request,
        "analyses/shadow.html",
        {
            "cohort": cohort,
            "deployment": deployment,
            "result": result,
            "can_roll_back": last is not None and last.model_version_id == cohort.active_model_id,
            "last_activation": last,
        },
    )


@login_required
@require_POST
def rollback_page(request, cohort_id: int):
    cohort = _admin_cohort(request.user, cohort_id)
    try:
        record = rollback(cohort, request.user, request.POST.get("reason", ""), request=request)
    except ActivationError as exc:
        messages.error(request, str(exc))
    else:
        restored = record.previous or "no model"
        messages.success(request, f"Rolled back: {restored} is active again in {cohort.name}.")
    return redirect("shadow-page", cohort_id=cohort.pk)


@login_required
def training_page(request, cohort_id: int):
    """Admins: train and validate a model on the cohort's signed cases; runs with progress."""
    from datetime import date

    from portal.analyses.training import start_training
    from portal.analyses.trainingset import TrainingSetError

    cohort = _admin_cohort(request.user, cohort_id)
    if request.method == "POST":
        try:
            signed_from = date.fromisoformat(request.POST.get("signed_from", ""))
            signed_to = date.fromisoformat(request.POST.get("signed_to", ""))
        except ValueError:
            messages.error(request, "Give both dates as YYYY-MM-DD.")
            return redirect("training-page", cohort_id=cohort.pk)
        options = {"maga": request.POST.get("maga") == "on"}
        for key in ("folds", "epochs"):
            if request.POST.get(key, "").strip().isdigit():
                options[key] = int(request.POST[key])
        try:
            run = start_training(
                cohort, signed_from, signed_to, request.user, options, request=request
            )
        except TrainingSetError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, f"Training run {run.pk} queued on {run.n_cases} slides.")
        return redirect("training-page", cohort_id=cohort.pk)
    runs = TrainingRun.objects.filter(cohort=cohort).select_related("model_version")[:20]
    return render(
        request,
        "analyses/training.html",
        {
            "cohort": cohort,
            "runs": runs,
            "busy": any(r.state in ("queued", "running") for r in runs),
        },
    )
