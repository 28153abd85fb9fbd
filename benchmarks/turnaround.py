"""Turnaround: upload complete -> prediction ready, for a 5x export and its 20x original.

Writes a synthetic 20x slide (12000x12000 px by default) and exports it at 5x
(``analysis.export``); builds two bundles that differ only in their input magnification
(same GLTrans, same seeded-fallback ResNet50-trunc encoder, untrained); registers them as
the active models of two cohorts (one requiring 5x, one 20x) of a throwaway portal (SQLite,
temporary ``LOWMAG_DATA_DIR``, ``LOWMAG_TASK_MODE=sync``). Then, for each file, it places
the bytes where the tus view keeps a received upload and calls the portal's real completion
path, ``portal.uploads.ingest.on_upload_complete`` (SHA-256, store, ingest, then
``request_analysis`` -> ``run_analysis`` -> ``analysis.pipeline.predict_slide`` -> Prediction),
timing the whole call and its parts. Models are loaded before timing (workers keep them warm);
the load time is reported apart. The tus transfer itself is ``benchmarks/transfer.py``'s.

Prints a markdown table, writes ``benchmarks/out/turnaround.json`` and the "Turnaround"
section of ``benchmarks/README.md``.

    python benchmarks/turnaround.py                    # a few minutes on 2 cores
    python benchmarks/turnaround.py --size 6000 --mil tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.files import write_markdown_section  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "out"
README = ROOT / "benchmarks" / "README.md"
SECTION = "## Turnaround"
TINY_GLTRANS = {"in_dim": 1024, "dim": 32, "n_heads": 4, "depth": 1, "n_classes": 2}
STAGES = ("open", "tissue", "features", "mil")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=12000, help="20x slide side in pixels")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--mil", choices=["default", "tiny"], default="default",
                        help="GLTrans size: the default config or a tiny one")  # fmt: skip
    parser.add_argument("--precision", default="auto", help="encoder precision: auto|fp32|bf16")
    parser.add_argument("--threads", type=int, default=2, help="LOWMAG_TORCH_THREADS")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep files here")
    parser.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    parser.add_argument("--in-portal", type=Path, help=argparse.SUPPRESS)  # internal
    return parser.parse_args()


# -- inputs ---------------------------------------------------------------------------------------


def make_slides(work: Path, size: int, seed: int) -> dict[str, Path]:
    from analysis.export import export_lowmag
    from analysis.synth import write_synthetic_slide

    src = work / "inputs"
    src.mkdir(parents=True, exist_ok=True)
    original = src / f"synthetic-{size}-20x.svs"
    lowmag = src / f"synthetic-{size}.5x.tiff"
    if not original.exists():
        write_synthetic_slide(original, width=size, height=size, seed=seed, mpp=0.5)
    if not lowmag.exists():
        export_lowmag(original, lowmag, magnification=5)
    return {"5x": lowmag, "20x": original}


def make_bundle(out_dir: Path, magnification: float, mil: str, precision: str) -> Path:
    """A GLTrans bundle over the seeded-fallback ResNet50-trunc (untrained: timing only)."""
    import torch

    from analysis.bundle import BundleManifest, write_bundle
    from analysis.mil import build_mil
    from analysis.mil.gltrans import GLTransConfig
    from analysis.mil.registry import mil_config_to_dict

    config = TINY_GLTRANS if mil == "tiny" else mil_config_to_dict(GLTransConfig())
    torch.manual_seed(0)  # the same MIL weights at both magnifications
    model = build_mil("gltrans", config)
    manifest = BundleManifest(
        name=f"turnaround-{mil}",
        version=f"{magnification:g}x",
        task="lesion-detection",
        classes=["normal", "lesion"],
        magnification=magnification,
        patch_size=int(round(128 / (10 / magnification))),
        encoder={"name": "resnet50_trunc", "params": {"precision": precision}},
        mil={"name": "gltrans", "config": config},
        is_demo=True,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    return write_bundle(out_dir, manifest, mil_state=model.state_dict())


# -- inside the portal (a subprocess with the portal's settings) ----------------------------------


class Timer:
    """Wraps a module function and records the seconds of each call."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name
        self.original = getattr(module, name)
        self.seconds: list[float] = []
        setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)

    def take(self) -> float:
        total = sum(self.seconds)
        self.seconds.clear()
        return round(total, 4)


def run_in_portal(spec_path: Path) -> None:
    import django

    django.setup()
    from django.contrib.auth.models import User

    from analysis.bundle import bundle_sha256, load_manifest
    from portal.analyses import tasks
    from portal.analyses.models import AnalysisJob, ModelVersion, Prediction
    from portal.cases.models import Case, Cohort, Membership
    from portal.uploads import ingest
    from portal.uploads.models import Upload

    spec = json.loads(spec_path.read_text())
    user = User.objects.create_user("lis", "lis@example.org", "x")
    timers = {
        "sha256": Timer(ingest, "sha256_file"),
        "ingest": Timer(ingest, "ingest_slide"),
        "analysis_task": Timer(tasks.run_analysis, "run"),
    }
    rows = {}
    for key, item in spec["files"].items():
        manifest = load_manifest(item["bundle"])
        model = ModelVersion.objects.create(
            name=manifest.name, version=manifest.version, task=manifest.task,
            classes=manifest.classes, magnification=manifest.magnification,
            bundle_path=item["bundle"], sha256=bundle_sha256(item["bundle"]), active=True,
        )  # fmt: skip
        cohort = Cohort.objects.create(
            name=f"Turnaround {key}", slug=f"turnaround-{key}",
            required_magnification=manifest.magnification, active_model=model,
        )  # fmt: skip
        Membership.objects.create(user=user, cohort=cohort, role="integration")
        case = Case.objects.create(cohort=cohort, patient_id=key, accession_number=f"T-{key}")
        start = time.perf_counter()
        tasks.loaded_bundle(model)  # a worker keeps its models warm: not part of a turnaround
        load_s = time.perf_counter() - start
        source = Path(item["path"])
        upload = Upload.objects.create(
            user=user, case=case, filename=source.name, length=source.stat().st_size
        )
        upload.data_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, upload.data_path)  # as the tus view leaves the last byte
        upload.offset = upload.length
        upload.save()
        start = time.perf_counter()
        slide = ingest.on_upload_complete(upload)  # sync mode: the analysis runs inside
        wall_s = time.perf_counter() - start
        job = AnalysisJob.objects.get(slide=slide)
        prediction = Prediction.objects.get(slide=slide)
        rows[key] = {
            "file": source.name,
            "bytes": upload.length,
            "slide_status": slide.status,
            "slide_size": [slide.width, slide.height],
            "slide_mpp": slide.mpp,
            "model_magnification": manifest.magnification,
            "patches": len(prediction.scores()),
            "job_state": job.state,
            "turnaround_s": round(wall_s, 4),
            "sha256_s": timers["sha256"].take(),
            "ingest_s": timers["ingest"].take(),
            "analysis_task_s": timers["analysis_task"].take(),
            "queue_s": round((job.started_at - job.created_at).total_seconds(), 4),
            "timings": job.timings,
            "model_load_s": round(load_s, 3),
        }
        print(f"  {key}: {rows[key]['turnaround_s']:.2f} s {job.timings}", flush=True)
    print(json.dumps(rows))


def portal_env(work: Path, threads: int) -> dict:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "LOWMAG_DATA_DIR": str(work / "data"),
        "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
        "LOWMAG_TASK_MODE": "sync",
        "LOWMAG_TORCH_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("REDIS_URL", None)
    return env


def measure(work: Path, files: dict[str, Path], bundles: dict[str, Path], threads: int) -> dict:
    env = portal_env(work, threads)
    (work / "db.sqlite3").unlink(missing_ok=True)
    shutil.rmtree(work / "data", ignore_errors=True)
    python = sys.executable
    subprocess.run(
        [python, "manage.py", "migrate", "--noinput", "-v", "0"], env=env, cwd=ROOT, check=True
    )
    spec = work / "spec.json"
    spec.write_text(
        json.dumps(
            {"files": {k: {"path": str(files[k]), "bundle": str(bundles[k])} for k in files}}
        )
    )
    done = subprocess.run(
        [python, __file__, "--in-portal", str(spec)],
        env=env,
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    rows = result["rows"]
    header = (
        "| input | file MB | patches | turnaround s | sha256 s | ingest s | queue s | "
        + " | ".join(f"{s} s" for s in STAGES)
        + " | analysis total s | store + rest s |"
    )
    lines = [header, "|" + "---|" * (9 + len(STAGES))]
    for key in ("5x", "20x"):
        row = rows[key]
        t = row["timings"]
        rest = row["turnaround_s"] - row["sha256_s"] - row["ingest_s"] - t.get("total", 0)
        lines.append(
            f"| {key} ({row['slide_size'][0]}x{row['slide_size'][1]}, mpp {row['slide_mpp']:g}) "
            f"| {row['bytes'] / 1e6:.1f} | {row['patches']} | {row['turnaround_s']:.2f} | "
            f"{row['sha256_s']:.2f} | {row['ingest_s']:.2f} | {row['queue_s']:.3f} | "
            + " | ".join(f"{t.get(s, 0):.2f}" for s in STAGES)
            + f" | {t.get('total', 0):.2f} | {rest:.2f} |"
        )
    ratio = result["ratio"]
    lines += [
        "",
        f"20x / 5x: turnaround {ratio['turnaround']:.1f}x, analysis {ratio['analysis']:.1f}x,"
        f" features {ratio['features']:.1f}x (SPEC target >= 10.7x, physical limit ~16x)."
        f" Model load (once per worker, not counted): 5x {rows['5x']['model_load_s']:.1f} s,"
        f" 20x {rows['20x']['model_load_s']:.1f} s.",
    ]
    return "\n".join(lines)


def update_readme(table: str, command: str, result: dict) -> None:
    load = result["load"]
    body = (
        f"{SECTION}\n\n`{command}` (`benchmarks/turnaround.py`; JSON in"
        " `benchmarks/out/turnaround.json`). Upload complete -> prediction stored, through"
        " `portal.uploads.ingest.on_upload_complete` with `LOWMAG_TASK_MODE=sync` (hash, store,"
        " ingest, `request_analysis`, `run_analysis`), SQLite. One synthetic 20x slide and its"
        f" 5x export; GLTrans ({result['mil']}) and the seeded ResNet50-trunc encoder (precision"
        f" {result['precision']}), {result['threads']} torch threads, models warm."
        " Queue = job created -> started (0 here: no broker; Celery adds a round trip)."
        f" Load average: {load['before']} before, {load['after']} after"
        f" ({result['machine']['cpus']} cores).\n\n" + table + "\n"
    )
    write_markdown_section(README, SECTION, body)


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.in_portal:
        run_in_portal(args.in_portal)
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lowmag-turnaround-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print("writing the 20x slide and its 5x export ...", flush=True)
        files = make_slides(work, args.size, args.seed)
        bundles = {
            key: make_bundle(work / f"bundle-{key}", mag, args.mil, args.precision)
            for key, mag in (("5x", 5.0), ("20x", 20.0))
        }
        print("upload complete -> prediction, 5x then 20x ...", flush=True)
        rows = measure(work, files, bundles, args.threads)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    def ratio(get) -> float:
        return round(get(rows["20x"]) / max(get(rows["5x"]), 1e-9), 2)

    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "load": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "size": args.size,
        "mil": args.mil,
        "precision": args.precision,
        "threads": args.threads,
        "rows": rows,
        "ratio": {
            "turnaround": ratio(lambda r: r["turnaround_s"]),
            "analysis": ratio(lambda r: r["timings"]["total"]),
            "features": ratio(lambda r: r["timings"]["features"]),
        },
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "turnaround.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if not args.no_readme:
        command = "python benchmarks/turnaround.py " + " ".join(sys.argv[1:])
        update_readme(table, command.strip(), result)


if __name__ == "__main__":
    main()
