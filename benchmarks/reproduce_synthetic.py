"""The paper's Figure 2a / Figure 3 in miniature, on synthetic cohorts with known ground truth.

Stages (each cached under ``--out``, so a rerun resumes where the last one stopped):

1. cohort: ``write_cohort`` per cohort seed (patients x slides, one label per patient). The
   classes differ only in how fine chromatin cords line up with each nucleus (below 2 µm):
   resolvable at 20x, degraded at 10x, not separable by first-order statistics at 5x.
2. MAGA, on a *disjoint unlabeled cohort* (its own seed, never evaluated), so no test slide
   is seen: pair caches and students at 5x and at 10x. ``--teacher FILE`` takes ImageNet
   ResNet50 weights (torchvision layout); without it the teacher is the seeded ResNet50-trunc
   whose BatchNorm statistics are calibrated on that cohort's 20x patches, and every report
   says so in capitals (FALLBACK TEACHER).
3. features (CLAM-style HDF5 per slide): ``20x`` teacher on 256 px, ``5x`` teacher on native
   64 px (no MAGA), ``5x-maga`` student on 64 px, ``10x-maga`` student on 128 px, and
   ``5x-export`` student on the hospital's 5x export (``analysis.export``, JPEG quality 80):
   what the portal really receives.
4. patient-level k-fold cross-validation of GLTrans, ABMIL, CLAM-SB and TransMIL per condition;
   headline: pooled out-of-fold AUC with a patient-bootstrap CI, the fold mean beside it.
5. baselines on plain 5x pixels (same folds): colour/OD statistics + logistic regression, and
   the teacher's 5x features (mean over patches) + a linear probe. Both should sit near chance.
6. speed (``--timing-slides``; 0 skips it): seconds per slide on the 20x file for 20x and on
   the low-magnification export for 5x and 10x; bytes per slide of the files.

``--seeds 0,1,2`` repeats 1-6 per cohort seed (MAGA is shared) and writes ``summary.md`` with
the spread; ``--sweep 0.5,0.75,1`` adds 20x GLTrans runs per morphology strength.

Outputs in ``--out`` (default ``benchmarks/out/reproduce``): per seed ``seed<N>/results.*`` and
``roc_<model>.png``, cross-validation reports under ``seed<N>/cv/``; ``summary.json|md``.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/reproduce_synthetic.py
    .venv/bin/python benchmarks/reproduce_synthetic.py --patients 60 --folds 10 --size 6000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.files import json_ready as _jsonable  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out" / "reproduce"
MODELS = ("gltrans", "abmil", "clam_sb", "transmil")
CONDITIONS = ("20x", "5x", "5x-maga", "10x-maga", "5x-export")
CONDITION_MAG = {
    "20x": 20.0,
    "10x": 10.0,
    "5x": 5.0,
    "5x-maga": 5.0,
    "10x-maga": 10.0,
    "5x-export": 5.0,
}
SOURCE_QUALITY = 90  # JPEG quality of the synthetic 20x slides
EXPORT_QUALITY = 80  # the hospital's 5x export (analysis.export's default)
MAGA_COHORT_SEED = 1_000_003  # the unlabeled MAGA cohort: no evaluation seed uses it
FALLBACK_LABEL = (
    "FALLBACK TEACHER: a seeded ResNet50-trunc with BatchNorm calibrated on unlabeled 20x "
    "patches, NOT ImageNet weights; pass --teacher FILE for the paper's setting"
)


@dataclass
class ReproConfig:
    out: Path = OUT_DIR
    seed: int = 0  # cohort, MAGA sampling, fold split, MIL init
    patients: int = 48
    slides_per_patient: int = 1
    size: int = 2600  # slide side in level-0 pixels at 20x
    lesion_fraction: float = 0.6  # share of a lesion slide's tissue; 0.3 is too weak a bag
    # signal for 36 training slides with the fallback teacher (README)
    morphology_strength: float = 1.0
    teacher: Path | None = None  # ImageNet resnet50 weights; None: the calibrated seeded fallback
    maga_patients: int = 8  # slides of the disjoint unlabeled MAGA cohort
    maga_dir: Path | None = None  # where MAGA lives; default <out>/maga (shared across seeds)
    maga5_pairs: int = 64  # pairs per slide
    maga5_epochs: int = 12
    maga10_pairs: int = 32
    maga10_epochs: int = 12
    maga_lr: float = 1e-3  # the paper uses 1e-4 on far more pairs; see README
    folds: int = 4
    epochs: int = 50  # analysis.train's defaults: the paper's lr needs the epochs
    patience: int = 10
    mil_dim: int = 128  # token width of every MIL model (the paper's 512 is --mil-dim 512)
    models: tuple[str, ...] = MODELS
    conditions: tuple[str, ...] = CONDITIONS
    timing_slides: int = 3
    threads: int = 2
    jobs: int = 2  # cross-validation runs in parallel (1 torch thread each)
    bootstrap: int = 2000
    precision: str = "auto"  # feature extraction: bf16 where the CPU has a fast path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def maga_root(self) -> Path:
        return self.maga_dir or self.out / "maga"

    def data_key(self) -> dict[str, Any]:
        """Settings that define the cached cohort, encoders and features."""
        keys = (
            "seed",
            "patients",
            "slides_per_patient",
            "size",
            "lesion_fraction",
            "morphology_strength",
            "teacher",
            "maga_patients",
            "maga5_pairs",
            "maga5_epochs",
            "maga10_pairs",
            "maga10_epochs",
            "maga_lr",
            "precision",
        )
        return {
            k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items() if k in keys
        }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- stages ---------------------------------------------------------------------------------


def check_out_dir(cfg: ReproConfig) -> None:
    """Refuse to mix caches made with other data settings in one output folder."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    key_path = cfg.out / "data_key.json"
    key = cfg.data_key()
    if key_path.is_file():
        saved = json.loads(key_path.read_text())
        if saved != key:
            changed = sorted(k for k in key if saved.get(k) != key[k])
            raise SystemExit(
                f"{cfg.out} holds caches made with other settings ({', '.join(changed)}); "
                "pass another --out or delete the folder"
            )
    else:
        key_path.write_text(json.dumps(key, indent=2))


def make_cohort(cfg: ReproConfig) -> list[dict[str, Any]]:
    """Write the cohort once; returns rows of patient_id, slide_id, label, path."""
    from analysis.synth import write_cohort

    cohort = cfg.out / "cohort"
    labels_csv = cohort / "labels.csv"
    if not labels_csv.is_file():
        log(f"writing {cfg.patients} x {cfg.slides_per_patient} slides of {cfg.size} px")
        write_cohort(
            cohort,
            n_patients=cfg.patients,
            slides_per_patient=cfg.slides_per_patient,
            width=cfg.size,
            height=cfg.size,
            seed=cfg.seed,
            lesion_fraction=cfg.lesion_fraction,
            morphology_strength=cfg.morphology_strength,
            quality=SOURCE_QUALITY,
        )
    with labels_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["label"] = int(row["label"])
        row["path"] = cohort / f"{row['slide_id']}.svs"
    return rows


def slide_grids(cfg: ReproConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The 20x slide's patch grid per slide (identical at every magnification), cached."""
    from analysis.slides import open_slide
    from analysis.tissue import PatchGrid, patch_grid

    path = cfg.out / "grids.json"
    if path.is_file():
        return {k: PatchGrid.from_dict(v) for k, v in json.loads(path.read_text()).items()}
    grids = {}
    for row in rows:
        with open_slide(row["path"]) as slide:
            grids[row["slide_id"]] = patch_grid(slide)
    path.write_text(json.dumps({k: _jsonable(g.to_dict()) for k, g in grids.items()}))
    return grids


def maga_cohort(cfg: ReproConfig) -> list[Path]:
    """The unlabeled MAGA cohort: its own seed, never cross-validated (labels unused)."""
    from analysis.synth import write_cohort

    folder = cfg.maga_root / "cohort"
    if not (folder / "labels.csv").is_file():
        log(f"writing the disjoint MAGA cohort: {cfg.maga_patients} slides of {cfg.size} px")
        write_cohort(
            folder,
            n_patients=cfg.maga_patients,
            slides_per_patient=1,
            width=cfg.size,
            height=cfg.size,
            seed=MAGA_COHORT_SEED,
            lesion_fraction=cfg.lesion_fraction,
            morphology_strength=cfg.morphology_strength,
            quality=SOURCE_QUALITY,
        )
    return sorted(folder.glob("*.svs"))


def train_students(cfg: ReproConfig, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """MAGA at 5x and 10x on the disjoint cohort; returns the teacher and student weight files.

    ``rows`` (the evaluated cohort) is never read here: no test slide reaches MAGA or the
    fallback teacher's BatchNorm calibration.
    """
    from analysis.maga import MagaConfig, build_pair_cache, train_maga

    del rows
    paths = maga_cohort(cfg)
    weights: dict[str, Path] = {}
    teacher = cfg.teacher
    for mag, pairs, epochs in (
        (5, cfg.maga5_pairs, cfg.maga5_epochs),
        (10, cfg.maga10_pairs, cfg.maga10_epochs),
    ):
        wanted = {f"{mag}x-maga"} | ({"5x-export"} if mag == 5 else set())
        if not wanted & set(cfg.conditions) and not (mag == 5 and teacher is None):
            continue
        run_dir = cfg.maga_root / f"maga{mag}x"
        student = run_dir / "student.safetensors"
        if not (run_dir / "maga.json").is_file():
            started = time.perf_counter()
            cache = build_pair_cache(
                paths, run_dir / "pairs", low_mag=mag, max_patches_per_slide=pairs, seed=cfg.seed
            )
            log(f"MAGA {mag}x: {len(cache)} pairs, {epochs} epochs")
            config = MagaConfig(
                epochs=epochs,
                lr=cfg.maga_lr,
                seed=cfg.seed,
                precision="bf16",
                num_threads=cfg.threads,
            )
            result = train_maga(
                cache, run_dir, config, teacher_weights=teacher, resume=True, log=log
            )
            seconds = time.perf_counter() - started
            log(f"MAGA {mag}x done in {seconds:.0f}s; hold-out alignment {result.alignment}")
        weights[f"{mag}x-maga"] = student
        if teacher is None:
            teacher = run_dir / "teacher.safetensors"  # the 10x run reuses the same teacher
    weights["teacher"] = (
        Path(teacher) if teacher else cfg.maga_root / "maga5x" / "teacher.safetensors"
    )
    if cfg.teacher is None:
        log(FALLBACK_LABEL)
    return weights


def condition_encoder(condition: str, weights: dict[str, Path]) -> Path:
    if condition == "5x-export":
        return weights["5x-maga"]
    return weights[condition] if condition.endswith("-maga") else weights["teacher"]


def export_5x(cfg: ReproConfig, row: dict[str, Any]) -> Path:
    """The hospital's 5x export of a slide at JPEG quality 80 (cached)."""
    from analysis.export import export_lowmag

    folder = cfg.out / "exports"
    folder.mkdir(exist_ok=True)
    dst = folder / f"{row['slide_id']}-5x-q{EXPORT_QUALITY}.svs"
    if not dst.is_file():
        export_lowmag(row["path"], dst, magnification=5, quality=EXPORT_QUALITY)
    return dst


def extract_all(
    cfg: ReproConfig, rows: list[dict[str, Any]], grids: dict[str, Any], weights: dict[str, Path]
) -> None:
    """One HDF5 per slide and condition; existing files are kept."""
    import torch

    from analysis.encoders import build_encoder
    from analysis.features import extract_features, save_h5
    from analysis.slides import open_slide
    from analysis.tissue import patch_grid

    torch.set_num_threads(cfg.threads)
    for condition in cfg.conditions:
        folder = cfg.out / "features" / condition
        folder.mkdir(parents=True, exist_ok=True)
        todo = [r for r in rows if not (folder / f"{r['slide_id']}.h5").is_file()]
        if not todo:
            continue
        encoder = build_encoder(
            weights=condition_encoder(condition, weights), precision=cfg.precision
        )
        started, n = time.perf_counter(), 0
        for row in todo:
            path, grid = row["path"], grids[row["slide_id"]]
            if condition == "5x-export":  # the export file, on its own grid
                path = export_5x(cfg, row)
                with open_slide(path) as slide:
                    grid = patch_grid(slide)
            feats = extract_features(path, grid, encoder, CONDITION_MAG[condition])
            save_h5(folder / f"{row['slide_id']}.h5", feats)
            n += len(feats)
        rate = n / (time.perf_counter() - started)
        log(f"features {condition}: {n} patches from {len(todo)} slides, {rate:.1f} patches/s")


def load_condition_bags(cfg: ReproConfig, rows: list[dict[str, Any]], condition: str) -> list:
    from analysis.features import load_h5
    from analysis.train import Bag

    bags = []
    for row in rows:
        feats = load_h5(cfg.out / "features" / condition / f"{row['slide_id']}.h5")
        bags.append(
            Bag(feats.features, feats.grid_rc, row["label"], row["slide_id"], row["patient_id"])
        )
    return bags


def mil_config(cfg: ReproConfig, model: str) -> dict[str, Any]:
    """CPU-sized models; ``--mil-dim 512`` gives the published widths."""
    if model in ("gltrans", "transmil"):
        return {"dim": cfg.mil_dim, "n_heads": 8 if cfg.mil_dim >= 256 else 4}
    return {"dim": cfg.mil_dim, "attn_dim": max(64, cfg.mil_dim // 2)}


def _crossval_job(args: tuple) -> tuple[str, str, float]:
    """Worker: one (condition, model) cross-validation; writes its report, returns seconds."""
    import torch

    from analysis.evaluate import crossval
    from analysis.train import TrainConfig

    cfg, rows, condition, model = args
    torch.set_num_threads(1)
    started = time.perf_counter()
    train_cfg = TrainConfig(epochs=cfg.epochs, patience=cfg.patience, seed=cfg.seed, num_threads=1)
    crossval(
        load_condition_bags(cfg, rows, condition),
        model,
        mil_config(cfg, model),
        train_cfg,
        folds=cfg.folds,
        out_dir=cfg.out / "cv" / condition / model,
        classes=["benign", "lesion"],
        n_bootstrap=cfg.bootstrap,
        split_seed=cfg.seed,
    )
    return condition, model, time.perf_counter() - started


def run_crossval(cfg: ReproConfig, rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict]:
    """Every (condition, model) not yet done, ``cfg.jobs`` at a time; returns the reports."""
    todo = [
        (cfg, rows, c, m)
        for c in cfg.conditions
        for m in cfg.models
        if not (cfg.out / "cv" / c / m / "predictions.csv").is_file()
    ]
    if todo:
        log(f"cross-validation: {len(todo)} runs, {cfg.folds} folds each, {cfg.jobs} at a time")
        if cfg.jobs > 1:
            with ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn")) as pool:
                for condition, model, seconds in pool.map(_crossval_job, todo):
                    log(f"cv {condition} {model}: {seconds:.0f}s")
        else:
            for job in todo:
                condition, model, seconds = _crossval_job(job)
                log(f"cv {condition} {model}: {seconds:.0f}s")
    return {
        (c, m): json.loads((cfg.out / "cv" / c / m / "crossval.json").read_text())
        for c in cfg.conditions
        for m in cfg.models
    }


def comparisons(cfg: ReproConfig) -> list[dict[str, Any]]:
    """Paired patient-bootstrap p-values of out-of-fold AUCs (same slides, same folds)."""
    from analysis.evaluate import compare_crossval, read_predictions

    pairs = [
        ("5x-maga", "5x"),
        ("5x-maga", "20x"),
        ("10x-maga", "20x"),
        ("5x", "20x"),
        ("5x-export", "20x"),
        ("5x-export", "5x-maga"),
    ]
    out = []
    for model in cfg.models:
        for a, b in pairs:
            if a not in cfg.conditions or b not in cfg.conditions:
                continue
            pa = read_predictions(cfg.out / "cv" / a / model / "predictions.csv")
            pb = read_predictions(cfg.out / "cv" / b / model / "predictions.csv")
            test = compare_crossval(pa, pb, cfg.bootstrap, seed=cfg.seed)
            out.append({"model": model, "a": a, "b": b, **_jsonable(asdict(test))})
    return out


# --- baselines on plain 5x pixels -----------------------------------------------------------


def colour_statistics(cfg: ReproConfig, rows: list[dict[str, Any]], grids: dict) -> np.ndarray:
    """(slides, 20) colour/OD statistics of the 5x pixels, averaged over tissue patches."""
    from analysis.slides import open_slide
    from analysis.synthcheck import colour_od_stats

    path = cfg.out / "baselines" / "colour5x.npy"
    if path.is_file():
        return np.load(path)
    out = []
    for row in rows:
        grid = grids[row["slide_id"]]
        with open_slide(row["path"]) as slide:
            stats = [
                colour_od_stats(slide.read_patch((int(x), int(y)), 5.0, grid.patch_um))
                for x, y in grid.l0_xy
            ]
        out.append(np.mean(stats, axis=0))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.stack(out))
    return np.stack(out)


def probe_auc(cfg: ReproConfig, rows: list[dict[str, Any]], x: np.ndarray) -> dict[str, Any]:
    """Logistic regression on standardised slide vectors, the cross-validation's patient folds;
    pooled out-of-fold AUC with a patient-bootstrap CI and the fold mean."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from analysis.evaluate import auc_score, bootstrap_auc_ci, patient_folds

    patients = [str(r["patient_id"]) for r in rows]
    labels = np.array([r["label"] for r in rows])
    fold_of = patient_folds(patients, labels, cfg.folds, cfg.seed)
    folds = np.array([fold_of[p] for p in patients])
    probs = np.zeros((len(rows), 2))
    fold_aucs = []
    for fold in range(cfg.folds):
        test = folds == fold
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        model.fit(x[~test], labels[~test])
        probs[test] = model.predict_proba(x[test])
        fold_aucs.append(auc_score(labels[test], probs[test]))
    ci = bootstrap_auc_ci(labels, probs, np.array(patients), cfg.bootstrap, seed=cfg.seed)
    finite = [a for a in fold_aucs if np.isfinite(a)]
    return {
        "auc_pooled": ci.estimate,
        "auc_pooled_ci": [ci.low, ci.high],
        "auc_mean": float(np.mean(finite)) if finite else None,
    }


def baselines(cfg: ReproConfig, rows: list[dict[str, Any]], grids: dict) -> dict[str, Any]:
    """Plain 5x pixels: colour/OD statistics + LR; teacher 5x features (mean) + linear probe."""
    out = {"colour_od_5x_lr": probe_auc(cfg, rows, colour_statistics(cfg, rows, grids))}
    if "5x" in cfg.conditions:
        bags = load_condition_bags(cfg, rows, "5x")
        pooled = np.stack([np.asarray(b.features, dtype=np.float64).mean(axis=0) for b in bags])
        out["teacher_5x_linear_probe"] = probe_auc(cfg, rows, pooled)
    for name, b in out.items():
        log(f"baseline {name}: pooled AUC {_f(b['auc_pooled'])} {b['auc_pooled_ci']}")
    return out


# --- speed and size -------------------------------------------------------------------------


def exports(cfg: ReproConfig, rows: list[dict[str, Any]]) -> dict[str, dict[str, Path]]:
    """5x and 10x exports of the timing slides (source quality, for timing) and 5x at 80."""
    from analysis.export import export_lowmag

    folder = cfg.out / "exports"
    folder.mkdir(exist_ok=True)
    out: dict[str, dict[str, Path]] = {}
    for row in rows[: cfg.timing_slides]:
        paths = {}
        for mag, quality in ((5, SOURCE_QUALITY), (10, SOURCE_QUALITY), (5, 80)):
            dst = folder / f"{row['slide_id']}-{mag}x-q{quality}.svs"
            if not dst.is_file():
                export_lowmag(row["path"], dst, magnification=mag, quality=quality)
            paths[f"{mag}x-q{quality}"] = dst
        out[row["slide_id"]] = paths
    return out


def measure_speed(
    cfg: ReproConfig, rows: list[dict[str, Any]], weights: dict[str, Path]
) -> dict[str, Any]:
    """Seconds per slide per condition and model: open + grid + read/encode + MIL."""
    import torch

    from analysis.encoders import build_encoder
    from analysis.features import extract_features
    from analysis.mil import build_mil
    from analysis.slides import open_slide
    from analysis.tissue import patch_grid

    torch.set_num_threads(cfg.threads)
    if cfg.timing_slides < 1:
        return {"timing": {}, "sizes": {}}
    files = exports(cfg, rows)
    timing: dict[str, Any] = {}
    for condition in cfg.conditions:
        if condition == "5x-export":  # the same work as 5x-maga on a file of the same size
            continue
        mag = CONDITION_MAG[condition]
        encoder = build_encoder(
            weights=condition_encoder(condition, weights), precision=cfg.precision
        )
        mils = {
            m: build_mil(m, {"in_dim": encoder.dim, **mil_config(cfg, m)}).eval()
            for m in cfg.models
        }
        encoder.embed(np.zeros((2, 64, 64, 3), np.uint8))  # warm-up
        per_slide = []
        for row in rows[: cfg.timing_slides]:
            path = (
                row["path"]
                if mag == 20
                else files[row["slide_id"]][f"{int(mag)}x-q{SOURCE_QUALITY}"]
            )
            t0 = time.perf_counter()
            with open_slide(path) as slide:
                grid = patch_grid(slide)
            t1 = time.perf_counter()
            feats = extract_features(path, grid, encoder, mag)
            t2 = time.perf_counter()
            mil_s = {}
            for name, mil in mils.items():
                t = time.perf_counter()
                with torch.inference_mode():
                    mil(torch.from_numpy(feats.features), torch.from_numpy(feats.grid_rc))
                mil_s[name] = time.perf_counter() - t
            per_slide.append(
                {
                    "slide": row["slide_id"],
                    "patches": len(feats),
                    "grid_s": t1 - t0,
                    "features_s": t2 - t1,
                    "mil_s": mil_s,
                }
            )
        timing[condition] = _summarise_timing(per_slide, cfg.models)
        log(f"speed {condition}: {timing[condition]['seconds_per_slide']}")
    sizes = _sizes(rows, files)
    return {"timing": timing, "sizes": sizes}


def _summarise_timing(per_slide: list[dict], models: tuple[str, ...]) -> dict[str, Any]:
    grid_s = float(np.mean([s["grid_s"] for s in per_slide]))
    feat_s = float(np.mean([s["features_s"] for s in per_slide]))
    mil_s = {m: float(np.mean([s["mil_s"][m] for s in per_slide])) for m in models}
    return {
        "slides": per_slide,
        "patches_per_slide": float(np.mean([s["patches"] for s in per_slide])),
        "grid_s": grid_s,
        "features_s": feat_s,
        "mil_s": mil_s,
        "seconds_per_slide": {m: round(grid_s + feat_s + mil_s[m], 3) for m in models},
    }


def _sizes(rows: list[dict[str, Any]], files: dict[str, dict[str, Path]]) -> dict[str, Any]:
    from analysis.export import path_bytes

    out: dict[str, Any] = {
        "bytes_20x_all_slides_mean": float(np.mean([path_bytes(r["path"]) for r in rows]))
    }
    src = [path_bytes(r["path"]) for r in rows if r["slide_id"] in files]
    out["bytes_20x"] = float(np.mean(src))
    for key in next(iter(files.values())):
        sizes = [path_bytes(f[key]) for f in files.values()]
        out[f"bytes_{key}"] = float(np.mean(sizes))
        out[f"ratio_{key}"] = float(np.mean(src) / np.mean(sizes))
    return out


# --- report ---------------------------------------------------------------------------------


def build_results(
    cfg: ReproConfig,
    reports: dict,
    tests: list[dict],
    speed: dict,
    weights: dict,
    base: dict | None = None,
) -> dict:
    rows = []
    timing = speed["timing"]
    speed_of = {**{"5x-export": timing.get("5x-maga")}, **timing}
    for (condition, model), report in reports.items():
        s = report["summary"]
        seconds = speed_of.get(condition)
        rows.append(
            {
                "model": model,
                "condition": condition,
                "auc_pooled": s["auc_pooled"],
                "auc_pooled_ci_low": s["auc_pooled_ci"][0],
                "auc_pooled_ci_high": s["auc_pooled_ci"][1],
                "auc_mean": s["auc_mean"],
                "auc_ci_low": s["auc_mean_ci"][0],
                "auc_ci_high": s["auc_mean_ci"][1],
                "accuracy_mean": s["accuracy_mean"],
                "macro_f1_mean": s["macro_f1_mean"],
                "seconds_per_slide": seconds["seconds_per_slide"][model] if seconds else None,
            }
        )
    maga = {}
    for mag in (5, 10):
        path = cfg.maga_root / f"maga{mag}x" / "maga.json"
        if path.is_file():
            m = json.loads(path.read_text())
            maga[f"{mag}x"] = {
                "alignment": m["alignment"],
                "pairs": m["pairs"],
                "teacher": m["teacher"],
                "epochs": len(m["history"]),
                "train_seconds": sum(h["seconds"] for h in m["history"]),
            }
    return {
        "config": _jsonable({k: v for k, v in asdict(cfg).items() if k != "extra"}),
        "teacher": str(weights["teacher"]),
        "teacher_label": FALLBACK_LABEL if cfg.teacher is None else f"teacher: {cfg.teacher}",
        "rows": rows,
        "baselines": base or {},
        "comparisons": tests,
        "speed": speed,
        "maga": maga,
        "targets": _targets(rows, speed),
    }


def _auc(rows: list[dict], model: str, condition: str) -> float | None:
    """Pooled out-of-fold AUC (the headline measure)."""
    for r in rows:
        if r["model"] == model and r["condition"] == condition:
            return r["auc_pooled"]
    return None


def _targets(rows: list[dict], speed: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    a20, a5, am = (_auc(rows, "gltrans", c) for c in ("20x", "5x", "5x-maga"))
    if all(v is not None and np.isfinite(v) for v in (a20, a5, am)):
        out["maga5_gap_to_20x"] = a20 - am
        out["maga5_within_0.03_of_20x"] = bool(a20 - am <= 0.03)
        out["no_maga5_gap_to_20x"] = a20 - a5
        out["no_maga5_at_least_0.10_below_20x"] = bool(a20 - a5 >= 0.10)
    a_export = _auc(rows, "gltrans", "5x-export")
    if a20 is not None and a_export is not None and np.isfinite(a_export):
        out["export5x_gap_to_20x"] = a20 - a_export
    t = speed["timing"]
    if "20x" in t and "5x-maga" in t:
        ratio = (
            t["20x"]["seconds_per_slide"]["gltrans"] / t["5x-maga"]["seconds_per_slide"]["gltrans"]
        )
        out["speedup_5x_vs_20x_gltrans"] = ratio
        out["speedup_at_least_8x"] = bool(ratio >= 8)
    return out


def markdown(results: dict) -> str:
    rows, conditions = results["rows"], list(results["config"]["conditions"])
    models = list(results["config"]["models"])
    lines = [
        f"**{results['teacher_label']}**",
        "",
        "Pooled out-of-fold AUC (95% patient-bootstrap CI); fold-mean AUC beside it [in brackets].",
        "",
        "| Model | " + " | ".join(f"AUC {c}" for c in conditions) + " |",
        "|---|" + "---|" * len(conditions),
    ]
    for model in models:
        cells = []
        for c in conditions:
            r = next(r for r in rows if r["model"] == model and r["condition"] == c)
            cells.append(
                f"{_f(r['auc_pooled'])} ({_f(r['auc_pooled_ci_low'])}-"
                f"{_f(r['auc_pooled_ci_high'])}) [{_f(r['auc_mean'])}]"
            )
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    base = results.get("baselines") or {}
    if base:
        lines += ["", "| Baseline on plain 5x pixels | pooled AUC (95% CI) | fold mean |"]
        lines += ["|---|---|---|"]
        for name, b in base.items():
            low, high = b["auc_pooled_ci"]
            lines.append(
                f"| {name} | {_f(b['auc_pooled'])} ({_f(low)}-{_f(high)}) | {_f(b['auc_mean'])} |"
            )
    t = results["speed"]["timing"]
    timed = [c for c in conditions if c in t]
    if timed:
        lines += [
            "",
            "| Condition | Patches/slide | Grid s | Read+encode s | "
            + " | ".join(f"{m} s/slide" for m in models)
            + " |",
            "|---|---|---|---|" + "---|" * len(models),
        ]
    for c in timed:
        s = t[c]
        lines.append(
            f"| {c} | {s['patches_per_slide']:.0f} | {s['grid_s']:.2f} | {s['features_s']:.2f} | "
            + " | ".join(f"{s['seconds_per_slide'][m]:.2f}" for m in models)
            + " |"
        )
    lines += [
        "",
        "| Model | A | B | AUC A (pooled) | AUC B (pooled) | Δ (95% CI) | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in results["comparisons"]:
        lines.append(
            f"| {c['model']} | {c['a']} | {c['b']} | {c['auc_a']:.3f} | {c['auc_b']:.3f} | "
            f"{c['delta']:+.3f} ({c['delta_low']:+.3f} to {c['delta_high']:+.3f}) | {c['p_value']:.4f} |"
        )
    z = results["speed"]["sizes"]
    if z:
        lines += [
            "",
            f"Bytes per slide: 20x {z['bytes_20x'] / 1e6:.2f} MB; 5x export at the source's JPEG "
            f"quality {z['bytes_5x-q90'] / 1e6:.3f} MB ({z['ratio_5x-q90']:.1f}x smaller), at "
            f"quality 80 {z['bytes_5x-q80'] / 1e6:.3f} MB ({z['ratio_5x-q80']:.1f}x); 10x export "
            f"{z['bytes_10x-q90'] / 1e6:.3f} MB ({z['ratio_10x-q90']:.1f}x).",
        ]
    for mag, m in results["maga"].items():
        a = m["alignment"]
        if a:
            lines.append(
                f"MAGA {mag} (disjoint unlabeled cohort): {m['pairs']} pairs, {m['epochs']} epochs "
                f"({m['train_seconds']:.0f}s); hold-out distance to the 20x embedding "
                f"{a['unaligned']:.3f} (teacher on {mag}) -> {a['aligned']:.3f} (student)."
            )
    tg = results["targets"]
    if "maga5_gap_to_20x" in tg:
        lines.append(
            f"GLTrans, pooled: 20x - MAGA 5x = {tg['maga5_gap_to_20x']:+.3f} AUC (target <= 0.03); "
            f"20x - 5x without MAGA = {tg['no_maga5_gap_to_20x']:+.3f} (target >= 0.10)"
            + (
                f"; 20x - MAGA on the 5x export = {tg['export5x_gap_to_20x']:+.3f}"
                if "export5x_gap_to_20x" in tg
                else ""
            )
            + (
                f"; speed-up 5x MAGA vs 20x = {tg['speedup_5x_vs_20x_gltrans']:.1f}x (target >= 8x)"
                if "speedup_5x_vs_20x_gltrans" in tg
                else ""
            )
            + "."
        )
    return "\n".join(lines) + "\n"


def write_outputs(cfg: ReproConfig, results: dict) -> None:
    (cfg.out / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    with (cfg.out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(results["rows"][0]))
        writer.writeheader()
        writer.writerows(results["rows"])
    (cfg.out / "results.md").write_text(markdown(results))
    if cfg.teacher is None:
        log(FALLBACK_LABEL)
    plot_rocs(cfg)


def plot_rocs(cfg: ReproConfig) -> None:
    """One PNG per model: pooled out-of-fold ROC of every condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    from analysis.evaluate import read_predictions

    for model in cfg.models:
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        for condition in cfg.conditions:
            p = read_predictions(cfg.out / "cv" / condition / model / "predictions.csv")
            fpr, tpr, _ = roc_curve(p.labels, p.probs[:, 1])
            auc = roc_auc_score(p.labels, p.probs[:, 1])
            ax.plot(fpr, tpr, linewidth=2, label=f"{condition} (pooled AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        ax.set(
            xlabel="False positive rate", ylabel="True positive rate", title=f"{model}, out-of-fold"
        )
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(cfg.out / f"roc_{model}.png")
        plt.close(fig)


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


# --- entry point ----------------------------------------------------------------------------


def run(cfg: ReproConfig) -> dict:
    import torch

    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    check_out_dir(cfg)
    rows = make_cohort(cfg)
    grids = slide_grids(cfg, rows)
    log(
        f"cohort: {len(rows)} slides, {np.mean([len(g.l0_xy) for g in grids.values()]):.0f} tissue patches/slide"
    )
    weights = train_students(cfg, rows)
    extract_all(cfg, rows, grids, weights)
    reports = run_crossval(cfg, rows)
    tests = comparisons(cfg)
    base = baselines(cfg, rows, grids)
    speed = measure_speed(cfg, rows, weights)
    results = build_results(cfg, reports, tests, speed, weights, base)
    results["wall_seconds"] = time.perf_counter() - started
    write_outputs(cfg, results)
    return results


def run_seeds(cfg: ReproConfig, seeds: list[int], sweep: list[float]) -> dict:
    """One run per cohort seed (MAGA shared), a morphology-strength sweep, and the spread."""
    from dataclasses import replace

    root = cfg.out
    root.mkdir(parents=True, exist_ok=True)
    shared = replace(cfg, maga_dir=cfg.maga_dir or root / "maga")
    per_seed = {}
    for seed in seeds:
        log(f"=== cohort seed {seed}")
        per_seed[seed] = run(replace(shared, out=root / f"seed{seed}", seed=seed))
    sweep_rows = []
    for strength in sweep:
        log(f"=== sweep: morphology strength {strength}, 20x GLTrans, seed {seeds[0]}")
        swept = run(
            replace(
                shared,
                out=root / f"sweep-{strength:g}",
                seed=seeds[0],
                morphology_strength=strength,
                conditions=("20x", "5x"),
                models=("gltrans",),
                timing_slides=0,
            )
        )
        row = next(r for r in swept["rows"] if r["condition"] == "20x")
        sweep_rows.append(
            {
                "strength": strength,
                "auc_20x_pooled": row["auc_pooled"],
                "auc_20x_mean": row["auc_mean"],
                "colour_od_5x_lr": swept["baselines"]["colour_od_5x_lr"]["auc_pooled"],
            }
        )
    summary = summarise_seeds(per_seed, sweep_rows, cfg)
    (root / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    (root / "summary.md").write_text(summary_markdown(summary))
    return summary


def summarise_seeds(per_seed: dict[int, dict], sweep_rows: list[dict], cfg: ReproConfig) -> dict:
    cells: dict[str, dict[str, list[float]]] = {}
    for results in per_seed.values():
        for r in results["rows"]:
            cell = cells.setdefault(f"{r['model']}|{r['condition']}", {"pooled": [], "mean": []})
            cell["pooled"].append(r["auc_pooled"])
            cell["mean"].append(r["auc_mean"])
        for name, b in results["baselines"].items():
            cell = cells.setdefault(f"baseline|{name}", {"pooled": [], "mean": []})
            cell["pooled"].append(b["auc_pooled"])
            cell["mean"].append(b["auc_mean"])
    spread = {}
    for key, cell in cells.items():
        pooled = np.array([np.nan if v is None else v for v in cell["pooled"]], dtype=float)
        means = np.array([np.nan if v is None else v for v in cell["mean"]], dtype=float)
        spread[key] = {
            "pooled_by_seed": pooled.tolist(),
            "pooled_mean": float(np.nanmean(pooled)),
            "pooled_sd": float(np.nanstd(pooled, ddof=1)) if len(pooled) > 1 else None,
            "pooled_min": float(np.nanmin(pooled)),
            "pooled_max": float(np.nanmax(pooled)),
            "fold_mean_mean": float(np.nanmean(means)),
        }
    first = next(iter(per_seed.values()))
    return {
        "seeds": list(per_seed),
        "teacher_label": first["teacher_label"],
        "config": first["config"],
        "spread": spread,
        "sweep": sweep_rows,
        "wall_seconds": {str(k): v.get("wall_seconds") for k, v in per_seed.items()},
    }


def summary_markdown(summary: dict) -> str:
    lines = [
        f"**{summary['teacher_label']}**",
        "",
        f"Cohort seeds {', '.join(str(s) for s in summary['seeds'])}: pooled out-of-fold AUC, "
        "mean ± sd over seeds [min-max]; fold-mean AUC averaged over seeds beside it.",
        "",
        "| Model | Condition | pooled AUC mean ± sd [min-max] | per seed | fold mean |",
        "|---|---|---|---|---|",
    ]
    for key, c in summary["spread"].items():
        model, condition = key.split("|")
        sd = "n/a" if c["pooled_sd"] is None else f"{c['pooled_sd']:.3f}"
        lines.append(
            f"| {model} | {condition} | {c['pooled_mean']:.3f} ± {sd} "
            f"[{c['pooled_min']:.3f}-{c['pooled_max']:.3f}] | "
            + ", ".join(_f(v) for v in c["pooled_by_seed"])
            + f" | {c['fold_mean_mean']:.3f} |"
        )
    if summary["sweep"]:
        lines += [
            "",
            "| Morphology strength | GLTrans 20x pooled AUC | fold mean | colour/OD 5x + LR |",
            "|---|---|---|---|",
        ]
        for r in summary["sweep"]:
            lines.append(
                f"| {r['strength']:g} | {_f(r['auc_20x_pooled'])} | {_f(r['auc_20x_mean'])} | "
                f"{_f(r['colour_od_5x_lr'])} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> ReproConfig:
    d = ReproConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--patients", type=int, default=d.patients)
    p.add_argument("--slides-per-patient", type=int, default=d.slides_per_patient)
    p.add_argument("--size", type=int, default=d.size, help="slide side, level-0 px at 20x")
    p.add_argument("--lesion-fraction", type=float, default=d.lesion_fraction)
    p.add_argument("--morphology-strength", type=float, default=d.morphology_strength)
    p.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="ImageNet resnet50 weights (torchvision layout); without it a loudly labelled "
        "seeded fallback",
    )
    p.add_argument("--maga-patients", type=int, default=d.maga_patients)
    p.add_argument("--maga-dir", type=Path, default=None, help="MAGA folder (default <out>/maga)")
    p.add_argument("--maga5-pairs", type=int, default=d.maga5_pairs, help="pairs per slide")
    p.add_argument("--maga5-epochs", type=int, default=d.maga5_epochs)
    p.add_argument("--maga10-pairs", type=int, default=d.maga10_pairs)
    p.add_argument("--maga10-epochs", type=int, default=d.maga10_epochs)
    p.add_argument("--maga-lr", type=float, default=d.maga_lr)
    p.add_argument("--folds", type=int, default=d.folds, help="10 as the paper")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--mil-dim", type=int, default=d.mil_dim, help="512 as the paper")
    p.add_argument("--models", default=",".join(d.models))
    p.add_argument(
        "--conditions", default=",".join(d.conditions), help=f"of {', '.join(CONDITION_MAG)}"
    )
    p.add_argument("--timing-slides", type=int, default=d.timing_slides)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--jobs", type=int, default=d.jobs, help="parallel cross-validation runs")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap)
    p.add_argument("--seeds", default="", help="cohort seeds, e.g. 0,1,2 (a run per seed)")
    p.add_argument("--sweep", default="", help="morphology strengths for 20x runs, e.g. 0.5,1")
    a = p.parse_args(argv)
    if a.teacher is not None and not a.teacher.is_file():
        p.error(f"--teacher {a.teacher}: no such file")
    conditions = tuple(a.conditions.split(","))
    unknown = [c for c in conditions if c not in CONDITION_MAG]
    if unknown:
        p.error(f"unknown conditions {unknown}")
    return ReproConfig(
        out=a.out,
        seed=a.seed,
        patients=a.patients,
        slides_per_patient=a.slides_per_patient,
        size=a.size,
        lesion_fraction=a.lesion_fraction,
        morphology_strength=a.morphology_strength,
        teacher=a.teacher,
        maga_patients=a.maga_patients,
        maga_dir=a.maga_dir,
        maga5_pairs=a.maga5_pairs,
        maga5_epochs=a.maga5_epochs,
        maga10_pairs=a.maga10_pairs,
        maga10_epochs=a.maga10_epochs,
        maga_lr=a.maga_lr,
        folds=a.folds,
        epochs=a.epochs,
        patience=a.patience,
        mil_dim=a.mil_dim,
        models=tuple(a.models.split(",")),
        conditions=conditions,
        timing_slides=a.timing_slides,
        threads=a.threads,
        jobs=a.jobs,
        bootstrap=a.bootstrap,
        extra={
            "seeds": [int(v) for v in a.seeds.split(",") if v.strip()],
            "sweep": [float(v) for v in a.sweep.split(",") if v.strip()],
        },
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    seeds, sweep = cfg.extra.get("seeds") or [], cfg.extra.get("sweep") or []
    if seeds or sweep:
        summary = run_seeds(cfg, seeds or [cfg.seed], sweep)
        print(summary_markdown(summary))
        print(f"outputs in {cfg.out}")
        return 0
    results = run(cfg)
    print(markdown(results))
    print(f"wall time {results['wall_seconds']:.0f}s; outputs in {results['config']['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
