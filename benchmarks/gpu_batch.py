"""Slides waiting for one model: one analysis task per slide vs one task claiming them all.

A throw-away portal (SQLite, data folder in a temp dir, tasks in the caller's thread), the
tiny test bundle (seeded ResNet50-trunc at 64 px, GLTrans) loaded and warmed once, N
synthetic 5x slides, each with a queued job. Each round requeues every job and times the
tasks that finish them: with ``LOWMAG_GPU_BATCH_SLIDES=1`` every job's own task runs it; with
``N`` the first task claims the others (shared encoder batches) and their tasks find them
done. Rounds alternate between the two; the best round of each is reported.

    python benchmarks/gpu_batch.py --slides 4 --side 1600 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_validate import _setup  # noqa: E402  (a throwaway SQLite portal)


def _queued_jobs(tmp: Path, n_slides: int, side: int) -> list:
    from django.conf import settings

    from analysis.bundle import load_bundle
    from analysis.synth import write_synthetic_slide
    from portal.analyses import tasks
    from portal.analyses.models import AnalysisJob, ModelVersion
    from portal.cases.models import Cohort
    from tests.bundles import make_tiny_bundle
    from tests.portal_fixtures import make_case

    settings.SLIDE_DIR = tmp / "slides"
    settings.SLIDE_DIR.mkdir(parents=True)
    model = ModelVersion.objects.create(
        name="tiny", version="1", classes=["normal", "lesion"], magnification=5.0, sha256="ab" * 32
    )
    bundle = load_bundle(make_tiny_bundle(tmp / "bundle"), device="cpu")
    tasks._warm_up(bundle)
    tasks._bundles[model.sha256] = bundle  # the worker's model, loaded once and kept
    cohort = Cohort.objects.create(name="Bench", slug="bench")
    jobs = []
    for k in range(n_slides):
        slide = make_case(cohort, f"B-{k}").slides.get()
        slide.file = f"s{k}.tiff"
        slide.save(update_fields=["file"])
        write_synthetic_slide(
            settings.SLIDE_DIR / slide.file, width=side, height=side, seed=k, mpp=2.0
        )
        key = AnalysisJob.key_for(slide.sha256, model.sha256, slide.pk)
        jobs.append(
            AnalysisJob.objects.create(slide=slide, model_version=model, idempotency_key=key)
        )
    return jobs


def _round(jobs: list, batch_slides: int) -> float:
    from django.conf import settings

    from portal.analyses.models import AnalysisJob, Prediction
    from portal.analyses.tasks import run_analysis

    Prediction.objects.all().delete()
    AnalysisJob.objects.update(state="queued", lease_expires_at=None)
    settings.LOWMAG_GPU_BATCH_SLIDES = batch_slides
    start = time.perf_counter()
    for job in jobs:  # every job's message, in queue order
        run_analysis.apply(args=(job.pk,), throw=True)
    elapsed = time.perf_counter() - start
    assert Prediction.objects.count() == len(jobs)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--side", type=int, default=1600, help="slide width = height (px, 5x)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _setup(Path(tmp))
        import torch

        from portal.analyses.models import Prediction

        torch.set_num_threads(args.threads)
        jobs = _queued_jobs(Path(tmp), args.slides, args.side)
        times: dict[str, list[float]] = {"one_per_task": [], "claimed": []}
        for _ in range(args.rounds):
            times["one_per_task"].append(_round(jobs, 1))
            times["claimed"].append(_round(jobs, args.slides))
        patches = sum(len(p.grid["grid_rc"]) for p in Prediction.objects.all())
    best = {mode: round(min(values), 3) for mode, values in times.items()}
    print(
        json.dumps(
            {
                "slides": args.slides,
                "side_px": args.side,
                "patches": patches,
                "threads": args.threads,
                "device": "cpu",
                "best_s": best,
                "rounds_s": {mode: [round(t, 3) for t in values] for mode, values in times.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
