"""The AI's call on a case, derived in one place.

A case's slides each have their latest prediction; the case's call is the most confident of
those (ties go to the lowest slide id). Signing snapshots it, the worklist shows it, and the
case page hands it to the viewer's JavaScript as ``ai_call``.
"""

from __future__ import annotations

from collections.abc import Iterable

from portal.analyses.models import Prediction


def latest_predictions(case_ids: Iterable[int]) -> dict[int, list[Prediction]]:
    """case id -> the latest prediction of each of its slides, in slide-id order."""
    latest: dict[int, Prediction] = {}
    predictions = Prediction.objects.filter(slide__case_id__in=list(case_ids)).select_related(
        "slide", "model_version"
    )
    for p in predictions.order_by("-created_at", "-id"):
        latest.setdefault(p.slide_id, p)
    by_case: dict[int, list[Prediction]] = {}
    for p in sorted(latest.values(), key=lambda p: p.slide_id):
        by_case.setdefault(p.slide.case_id, []).append(p)
    return by_case


def call_of(predictions: list[Prediction]) -> Prediction | None:
    """The most confident prediction (the first of equals), or None."""
    best: Prediction | None = None
    for p in predictions:
        if best is None or p.confidence > best.confidence:
            best = p
    return best


def ai_calls(case_ids: Iterable[int]) -> dict[int, Prediction]:
    """case id -> the case's AI call, for the cases that have one."""
    calls = {}
    for case_id, predictions in latest_predictions(case_ids).items():
        call = call_of(predictions)
        if call is not None:
            calls[case_id] = call
    return calls


def ai_call(case_id: int) -> Prediction | None:
    return ai_calls([case_id]).get(case_id)
