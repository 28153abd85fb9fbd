"""The pathologist's pages: login, worklist and case viewer, plus the small JSON and image
helpers the viewer needs (top-scoring regions of a prediction, a slide region as JPEG).

Every page needs a login; a case, slide or prediction outside the user's cohorts is a 404,
exactly as in the API. The viewer's JavaScript and CSS are built into ``frontend/dist`` and
served from the portal itself (``static_asset`` when no web server sits in front).
"""

from __future__ import annotations

import io
import mimetypes
from datetime import timedelta
from pathlib import Path

import numpy as np
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.staticfiles import finders
from django.db.models import Min, Q
from django.http import FileResponse, Http404, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.views.decorators.http import require_GET

from analysis.heatmap import CATEGORY_COLOURS, colormap_lut
from portal.analyses.calls import ai_call, ai_calls
from portal.analyses.models import AnalysisJob, Prediction
from portal.cases import worklist as worklists
from portal.cases.access import PATHOLOGIST, is_admin, role_in, visible
from portal.cases.models import Case, Cohort, Membership, Slide
from portal.reviews import audit
from portal.reviews.models import Diagnosis as SignedDiagnosis
from portal.reviews.models import SecondOpinionRequest

MAX_TOP_K = 100
REGION_MAX_PX = 512
# Hard caps on what one region request may read: the level-0 square asked for, and the square
# actually read at the chosen pyramid level (2048 px RGBA is 16 MB).
REGION_MAX_L0 = 8192
REGION_MAX_READ_PX = 2048

login_view = auth_views.LoginView.as_view(
    template_name="viewer/login.html", redirect_authenticated_user=True
)
logout_view = auth_views.LogoutView.as_view(next_page="/login/")


# ---------------------------------------------------------------- worklist

PRIORITY_ORDER = {"frozen": 0, "urgent": 1, "routine": 2}  # for sorting the page's column
WORKLIST_ROWS = 500
# (header, how the column sorts); the rows carry a data-sort value where the text would not do
WORKLIST_COLUMNS = [
    ("Priority", "number"),
    ("Accession", "text"),
    ("Patient", "text"),
    ("Cohort", "text"),
    ("Status", "text"),
    ("AI call", "text"),
    ("Confidence", "number"),
    ("Waiting", "number"),
]  # the page lists this many cases of the worklist, most urgent first


def _worklist_filters(params) -> dict:
    """The page's query parameters as ``worklist`` filters; values it cannot use are ignored."""
    filters: dict = {}
    if params.get("cohort", "").isdigit():
        filters["cohort"] = int(params["cohort"])
    if params.get("status") in Case.Status.values:
        filters["status"] = params["status"]
    if params.get("priority") in Case.Priority.values:
        filters["priority"] = params["priority"]
    if params.get("q"):
        filters["q"] = params["q"]
    return filters


def _filtered_cases(request):
    queue = request.GET.get("queue", worklists.DEFAULT_QUEUE)
    if queue not in worklists.QUEUES:
        queue = worklists.DEFAULT_QUEUE
    return worklists.worklist(request.user, queue, _worklist_filters(request.GET))[:WORKLIST_ROWS]


def _waiting(created_at, until=None) -> str:
    waited = (until or timezone.now()) - created_at
    if waited < timedelta(hours=1):
        return f"{max(1, int(waited.total_seconds() // 60))} min"
    if waited < timedelta(days=2):
        return f"{int(waited.total_seconds() // 3600)} h"
    return f"{waited.days} d"


def _failed_analyses(case_ids: list[int]) -> dict[int, str]:
    """Case id -> why the AI analysis failed, for cases whose slide's latest job failed."""
    latest: dict[int, AnalysisJob] = {}
    jobs = AnalysisJob.objects.filter(slide__case_id__in=case_ids).select_related("slide")
    for job in jobs.order_by("-created_at", "-id"):
        latest.setdefault(job.slide_id, job)
    failed: dict[int, str] = {}
    for job in latest.values():
        if job.state == "failed":
            failed.setdefault(job.slide.case_id, job.error or f"failed at the {job.stage} stage")
    failed_slides = Slide.objects.filter(case_id__in=case_ids, status="failed")
    for slide in failed_slides.only("case_id", "failure_reason"):
        failed.setdefault(slide.case_id, slide.failure_reason or "the slide could not be read")
    return failed


def _worklist_rows(request) -> list[dict]:
    cases = list(_filtered_cases(request))
    calls = ai_calls([c.pk for c in cases])
    failed = _failed_analyses([c.pk for c in cases if c.pk not in calls])
    # A signed case stops waiting at its first signature.
    signed_at = dict(
        SignedDiagnosis.objects.filter(case_id__in=[c.pk for c in cases if c.status == "signed"])
        .values("case_id")
        .annotate(first=Min("signed_at"))
        .values_list("case_id", "first")
    )
    now = timezone.now()
    rows = []
    for case in cases:
        until = signed_at.get(case.pk) if case.status == "signed" else None
        rows.append(
            {
                "case": case,
                "ai": calls.get(case.pk),
                "ai_failed": failed.get(case.pk, ""),
                "waiting": _waiting(case.created_at, until),
                "waited_s": int(((until or now) - case.created_at).total_seconds()),
                "signed": until is not None,
                "priority_rank": PRIORITY_ORDER.get(case.priority, 9),
            }
        )
    return rows


@login_required
def worklist(request):
    context = {"rows": _worklist_rows(request)}
    if request.GET.get("partial") == "rows":
        return render(request, "viewer/_worklist_rows.html", context)
    context.update(
        page="worklist",
        queues=worklists.QUEUES,
        statuses=Case.STATUSES,
        priorities=Case.PRIORITIES,
        cohorts=visible(Cohort.objects.all(), request.user, "pk"),
        columns=WORKLIST_COLUMNS,
        current=request.GET,
    )
    return render(request, "viewer/worklist.html", context)


# ---------------------------------------------------------------- case page


def _visible_case(user, case_id: int) -> Case:
    cases = visible(Case.objects.select_related("cohort"), user, "cohort")
    return get_object_or_404(cases, pk=case_id)


def _cluster_legend(p: Prediction) -> list[dict]:
    """The k-means clusters of a prediction with their map colours and sizes (cells)."""
    ids, counts = np.unique(p.cluster_ids(), return_counts=True)
    return [
        {
            "id": int(i),
            "color": "rgb({},{},{})".format(*CATEGORY_COLOURS[int(i) % len(CATEGORY_COLOURS)]),
            "cells": int(n),
        }
        for i, n in zip(ids, counts, strict=True)
    ]


def _prediction_json(p: Prediction) -> dict:
    return {
        "id": p.pk,
        "predicted_class": p.predicted_class,
        "confidence": p.confidence,
        "probabilities": p.probabilities,
        "model": str(p.model_version),
        "classes": list(p.model_version.classes or p.probabilities.keys()),
        "heatmap_dzi": f"/slides/{p.slide_id}/heatmap/{p.pk}.dzi",
        "clusters": _cluster_legend(p),
        "evidence_class": p.evidence_class if len(bytes(p.evidence_scores)) else "",
        "created_at": p.created_at.isoformat(),
    }


def _job_json(job: AnalysisJob | None) -> dict | None:
    if job is None:
        return None
    return {
        "id": job.pk,
        "state": job.state,
        "stage": job.stage,
        "progress": job.progress,
        "error": job.error if job.state == "failed" else "",
    }


def _slide_json(slide: Slide) -> dict:
    prediction = (
        slide.predictions.select_related("model_version").order_by("-created_at", "-id").first()
    )
    job = slide.jobs.order_by("-created_at", "-id").first()
    return {
        "id": slide.pk,
        "name": slide.original_name,
        "status": slide.status,
        "failure_reason": slide.failure_reason,
        "mpp": slide.mpp,
        "magnification": slide.magnification,
        "width": slide.width,
        "height": slide.height,
        "dzi": f"/slides/{slide.pk}.dzi",
        "label": f"/slides/{slide.pk}/label.png" if slide.has_label else None,
        "macro": f"/slides/{slide.pk}/macro.png" if slide.has_macro else None,
        "thumbnail": f"/slides/{slide.pk}/thumbnail.png",
        "prediction": _prediction_json(prediction) if prediction else None,
        "job": _job_json(job),
    }


def _legend() -> list[str]:
    lut = colormap_lut(11)
    return [f"rgb({r},{g},{b})" for r, g, b in lut.tolist()]


@login_required
def case_page(request, case_id: int):
    case = _visible_case(request.user, case_id)
    if case.is_signed:
        audit.record(request.user, "case.view", case, request=request)
    slides = [_slide_json(s) for s in case.slides.all()]
    role = role_in(request.user, case.cohort_id)
    call = ai_call(case.pk)
    viewer_config = {
        "case": {
            "id": case.pk,
            "accession_number": case.accession_number,
            "status": case.status,
            "priority": case.priority,
            "clinical_question": case.clinical_question,
        },
        "slides": slides,
        "ai_call": _prediction_json(call) if call else None,
        "legend": _legend(),
        "user": {
            "username": request.user.get_username(),
            "can_write": is_admin(request.user) or role == PATHOLOGIST,
            "is_admin": is_admin(request.user),
        },
    }
    colleagues = (
        Membership.objects.filter(cohort_id=case.cohort_id, role=PATHOLOGIST, user__is_active=True)
        .exclude(user=request.user)
        .select_related("user")
        .order_by("user__username")
    )
    viewer_config["colleagues"] = [
        {"id": m.user_id, "username": m.user.get_username()} for m in colleagues
    ]
    context = {
        "page": "case",
        "case": case,
        "slides": slides,
        "viewer_config": viewer_config,
        "next_case": _next_case(request.user, case),
    }
    return render(request, "viewer/case.html", context)


def _next_case(user, case: Case) -> Case | None:
    """The case after this one in the user's worklist of unsigned cases (the first one when
    this case is not on it, e.g. just signed)."""
    ids = list(
        worklists.worklist(user, worklists.DEFAULT_QUEUE).values_list("pk", flat=True)[:2000]
    )
    following = ids[ids.index(case.pk) + 1 :] if case.pk in ids else ids
    following = [pk for pk in following if pk != case.pk]
    return Case.objects.filter(pk=following[0]).first() if following else None


# ---------------------------------------------------------------- second opinions


@login_required
def second_opinions(request):
    """The colleague's inbox: open requests for me (or for anyone in my cohorts), and the
    answers to the requests I opened."""
    opinions = visible(
        SecondOpinionRequest.objects.select_related(
            "case", "case__cohort", "requested_by", "assigned_to", "answered_by", "diagnosis"
        ),
        request.user,
        "case__cohort",
    )
    pathologist_cohorts = Membership.objects.filter(user=request.user, role=PATHOLOGIST)
    cohorts = list(pathologist_cohorts.values_list("cohort_id", flat=True))
    open_ = opinions.filter(status=SecondOpinionRequest.OPEN)
    if not is_admin(request.user):
        open_ = open_.filter(case__cohort_id__in=cohorts)
    for_me = open_.filter(Q(assigned_to=request.user) | Q(assigned_to__isnull=True)).exclude(
        requested_by=request.user
    )
    answered = opinions.filter(
        Q(requested_by=request.user) | Q(diagnosis__signed_by=request.user),
        status=SecondOpinionRequest.CLOSED,
    ).exclude(answer="")
    mine_open = opinions.filter(
        Q(requested_by=request.user) | Q(diagnosis__signed_by=request.user),
        status=SecondOpinionRequest.OPEN,
    )
    context = {
        "page": "inbox",
        "for_me": list(for_me.order_by("-assigned_to_id", "created_at")[:200]),
        "answered": list(answered.order_by("-closed_at")[:50]),
        "waiting": list(mine_open.order_by("-created_at")[:50]),
    }
    return render(request, "viewer/second_opinions.html", context)


# ---------------------------------------------------------------- viewer JSON and images


MIN_REGION_SCORE = 0.05  # a cell scoring less is never shown as a high-score region
REGION_FILL_FRACTION = 0.5  # neighbours fill the gallery down to half the top score


def top_regions(scores: np.ndarray, grid_rc: np.ndarray, k: int, spacing: int = 2) -> list[int]:
    """Indices of up to ``k`` high-scoring cells, highest first.

    First one pick per hot spot (greedy non-maximum suppression: no two picks within
    ``spacing`` cells, Chebyshev), so that jumping from pick to pick visits different places.
    When fewer than ``k`` spots exist, the remaining places go to the next best cells, which
    may sit beside a pick, down to half the top score; cells scoring (almost) nothing are
    never shown, so a slide with one hot spot gives a short gallery, not one padded with 0.00.
    """
    order = np.argsort(-scores, kind="stable")
    if not len(order):
        return []
    floor = max(MIN_REGION_SCORE, REGION_FILL_FRACTION * float(scores[order[0]]))
    picked: list[int] = []
    picked_rc = np.empty((0, 2), dtype=np.int64)
    for index in order:
        if len(picked) >= k or scores[index] < MIN_REGION_SCORE:
            break
        rc = grid_rc[index]
        if len(picked_rc) and np.min(np.max(np.abs(picked_rc - rc), axis=1)) <= spacing:
            continue
        picked.append(int(index))
        picked_rc = np.vstack([picked_rc, rc[None, :]])
    chosen = set(picked)
    for index in order:
        if len(picked) >= k or scores[index] < floor:
            break
        if int(index) not in chosen:
            picked.append(int(index))
            chosen.add(int(index))
    return sorted(picked, key=lambda i: (-float(scores[i]), i))


@login_required
@require_GET
def prediction_top_k(request, prediction_id: int):
    predictions = visible(Prediction.objects.all(), request.user, "slide__case__cohort")
    prediction = get_object_or_404(predictions, pk=prediction_id)
    try:
        k = min(MAX_TOP_K, max(1, int(request.GET.get("k", "12"))))
    except ValueError as exc:
        raise Http404("k must be an integer") from exc
    scores = prediction.scores()  # (N,)
    grid_rc = np.asarray(prediction.grid.get("grid_rc", []), dtype=np.int64).reshape(-1, 2)
    if len(grid_rc) != len(scores):
        return JsonResponse({"detail": "this prediction's grid and scores disagree"}, status=409)
    size = float(prediction.grid["l0_patch_size"])
    regions = [
        {
            "rank": rank + 1,
            "score": round(float(scores[i]), 4),
            "grid_rc": grid_rc[i].tolist(),
            "l0_xy": [round(grid_rc[i, 1] * size), round(grid_rc[i, 0] * size)],
            "l0_size": size,
        }
        for rank, i in enumerate(top_regions(scores, grid_rc, k))
    ]
    return JsonResponse(
        {"prediction": prediction.pk, "slide": prediction.slide_id, "regions": regions}
    )


def _region_jpeg(slide: Slide, l0_xy: tuple[int, int], l0_size: int, out_px: int) -> bytes | None:
    """The region as JPEG, or None when reading it would exceed ``REGION_MAX_READ_PX``."""
    from PIL import Image

    from portal.viewer import tileservice

    access = tileservice.SlideAccess(slide.pk, slide.path, slide.sha256, slide.width, slide.height)
    rgb, _side = tileservice.region_rgb(access, l0_xy, l0_size, out_px, REGION_MAX_READ_PX)
    if rgb is None:
        return None
    image = Image.fromarray(rgb).resize((out_px, out_px))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _bad_region(message: str) -> JsonResponse:
    return JsonResponse({"detail": message}, status=400)


@login_required
@require_GET
def slide_region(request, slide_id: int):
    """``?x=&y=&size=`` (level-0 px) -> a square JPEG of ``px`` pixels (default 128)."""
    slides = visible(Slide.objects.filter(status=Slide.Status.READY), request.user, "case__cohort")
    slide = get_object_or_404(slides, pk=slide_id)
    try:
        x, y, size = (int(float(request.GET[p])) for p in ("x", "y", "size"))
        out_px = min(REGION_MAX_PX, max(16, int(request.GET.get("px", "128"))))
    except (KeyError, ValueError, OverflowError):
        return _bad_region("give x, y and size as level-0 pixel numbers, e.g. ?x=0&y=0&size=512")
    if not 0 < size <= REGION_MAX_L0:
        return _bad_region(f"size must be between 1 and {REGION_MAX_L0} level-0 pixels")
    if not (0 <= x < slide.width and 0 <= y < slide.height):
        raise Http404("the region lies outside the slide")
    body = _region_jpeg(slide, (x, y), size, out_px)
    if body is None:
        return _bad_region(
            f"this slide has no pyramid level coarse enough to read {size} level-0 pixels "
            f"at {out_px} px; ask for a smaller size"
        )
    response = HttpResponse(body, content_type="image/jpeg")
    response["Cache-Control"] = "private, max-age=86400"
    return response


# ---------------------------------------------------------------- static files


@require_GET
def static_asset(request, path: str):
    """The built viewer (and other static files) when no web server serves ``/static/``."""
    found = finders.find(path)
    if not found:
        raise Http404(f"no static file {path}")
    file_path = Path(found)
    content_type, _ = mimetypes.guess_type(file_path.name)
    response = FileResponse(file_path.open("rb"), content_type=content_type)
    response["Cache-Control"] = "public, max-age=3600"
    return response
