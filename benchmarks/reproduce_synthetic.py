"""The paper's Figure 2a / Figure 3 in miniature, on a synthetic cohort with known ground truth.

Stages (each cached under ``--out``, so a rerun resumes where the last one stopped):

1. cohort: ``write_cohort`` (patients x slides, one label per patient; the classes differ only
   in fine chromatin speckle, plain at 20x, weak at 5x).
2. MAGA: pair caches and students at 5x and at 10x (self-supervised, no labels). Without
   ``--teacher FILE`` the teacher is the seeded ResNet50-trunc whose BatchNorm statistics are
   calibrated on unlabeled 20x patches (saved by the 5x run and reused by the 10x run).
3. features (CLAM-style HDF5 per slide): ``20x`` teacher on 256 px, ``5x`` teacher on native
   64 px (no MAGA), ``5x-maga`` student on 64 px, ``10x-maga`` student on 128 px.
4. patient-level k-fold cross-validation of GLTrans, ABMIL, CLAM-SB and TransMIL per condition.
5. speed: seconds per slide (open + tissue grid + read + encode + MIL) on the 20x file for 20x and
   on the hospital's low-magnification export (``analysis.export``) for 5x and 10x; bytes per
   slide of the 20x file and of its exports at the source's JPEG quality and at 80.

Outputs in ``--out`` (default ``benchmarks/out/reproduce``): ``results.json``, ``results.csv``,
``results.md``, ``roc_<model>.png`` and the per-run cross-validation reports under ``cv/``.

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
CONDITIONS = ("20x", "5x", "5x-maga", "10x-maga")
CONDITION_MAG = {"20x": 20.0, "10x": 10.0, "5x": 5.0, "5x-maga": 5.0, "10x-maga": 10.0}
SOURCE_QUALITY = 90  # JPEG quality of the synthetic 20x slides


@dataclass
class ReproConfig:
    out: Path = OUT_DIR
    seed: int = 0  # cohort, MAGA sampling, fold split, MIL init
    patients: int = 24
    slides_per_patient: int = 2
    size: int = 3000  # slide side in level-0 pixels at 20x
    lesion_fraction: float = 0.3
    morphology_strength: float = 1.0
    teacher: Path | None = None  # ImageNet resnet50 weights; None: the calibrated seeded fallback
    maga5_pairs: int = 16  # pairs per slide
    maga5_epochs: int = 6
    maga10_pairs: int = 8
    maga10_epochs: int = 10
    maga_lr: float = 1e-3  # the paper uses 1e-4 on far more pairs; see README
    folds: int = 5
    epochs: int = 20
    patience: int = 6
    mil_dim: int = 128  # token width of every MIL model (the paper's 512 is --mil-dim 512)
    models: tuple[str, ...] = MODELS
    conditions: tuple[str, ...] = CONDITIONS
    timing_slides: int = 3
    threads: int = 2
    jobs: int = 2  # cross-validation runs in parallel (1 torch thread each)
    bootstrap: int = 2000
    precision: str = "auto"  # feature extraction: bf16 where the CPU has a fast path
    extra: dict[str, Any] = field(default_factory=dict)

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


def train_students(cfg: ReproConfig, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """MAGA at 5x and 10x; returns the teacher and student weight files."""
    from analysis.maga import MagaConfig, build_pair_cache, train_maga

    paths = [r["path"] for r in rows]
    weights: dict[str, Path] = {}
    teacher = cfg.teacher
    for mag, pairs, epochs in (
        (5, cfg.maga5_pairs, cfg.maga5_epochs),
        (10, cfg.maga10_pairs, cfg.maga10_epochs),
    ):
        if f"{mag}x-maga" not in cfg.conditions and not (mag == 5 and teacher is None):
            continue
        run_dir = cfg.out / f"maga{mag}x"
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
    weights["teacher"] = Path(teacher) if teacher else cfg.out / "maga5x" / "teacher.safetensors"
    return weights


def condition_encoder(condition: str, weights: dict[str, Path]) -> Path:
    return weights[condition] if condition.endswith("-maga") else weights["teacher"]


def extract_all(
    cfg: ReproConfig, rows: list[dict[str, Any]], grids: dict[str, Any], weights: dict[str, Path]
) -> None:
    """One HDF5 per slide and condition; existing files are kept."""
    import torch

    from analysis.encoders import build_encoder
    from analysis.features import extract_features, save_h5

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
            grid = grids[row["slide_id"]]
            feats = extract_features(row["path"], grid, encoder, CONDITION_MAG[condition])
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

    pairs = [("5x-maga", "5x"), ("5x-maga", "20x"), ("10x-maga", "20x"), ("5x", "20x")]
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
    files = exports(cfg, rows)
    timing: dict[str, Any] = {}
    for condition in cfg.conditions:
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
    cfg: ReproConfig, reports: dict, tests: list[dict], speed: dict, weights: dict
) -> dict:
    rows = []
    for (condition, model), report in reports.items():
        s = report["summary"]
        rows.append(
            {
                "model": model,
                "condition": condition,
                "auc_mean": s["auc_mean"],
                "auc_ci_low": s["auc_mean_ci"][0],
                "auc_ci_high": s["auc_mean_ci"][1],
                "auc_pooled": s["auc_pooled"],
                "accuracy_mean": s["accuracy_mean"],
                "macro_f1_mean": s["macro_f1_mean"],
                "seconds_per_slide": speed["timing"][condition]["seconds_per_slide"][model],
            }
        )
    maga = {}
    for mag in (5, 10):
        path = cfg.out / f"maga{mag}x" / "maga.json"
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
        "rows": rows,
        "comparisons": tests,
        "speed": speed,
        "maga": maga,
        "targets": _targets(rows, speed),
    }


def _auc(rows: list[dict], model: str, condition: str) -> float | None:
    for r in rows:
        if r["model"] == model and r["condition"] == condition:
            return r["auc_mean"]
    return None


def _targets(rows: list[dict], speed: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    a20, a5, am = (_auc(rows, "gltrans", c) for c in ("20x", "5x", "5x-maga"))
    if all(v is not None and np.isfinite(v) for v in (a20, a5, am)):
        out["maga5_gap_to_20x"] = a20 - am
        out["maga5_within_0.03_of_20x"] = bool(a20 - am <= 0.03)
        out["no_maga5_gap_to_20x"] = a20 - a5
        out["no_maga5_at_least_0.10_below_20x"] = bool(a20 - a5 >= 0.10)
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
        "| Model | " + " | ".join(f"AUC {c}" for c in conditions) + " |",
        "|---|" + "---|" * len(conditions),
    ]
    for model in models:
        cells = []
        for c in conditions:
            r = next(r for r in rows if r["model"] == model and r["condition"] == c)
            cells.append(f"{_f(r['auc_mean'])} ({_f(r['auc_ci_low'])}-{_f(r['auc_ci_high'])})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    t = results["speed"]["timing"]
    lines += [
        "",
        "| Condition | Patches/slide | Grid s | Read+encode s | "
        + " | ".join(f"{m} s/slide" for m in models)
        + " |",
        "|---|---|---|---|" + "---|" * len(models),
    ]
    for c in conditions:
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
    lines += [
        "",
        f"Bytes per slide: 20x {z['bytes_20x'] / 1e6:.2f} MB; 5x export at the source's JPEG quality "
        f"{z['bytes_5x-q90'] / 1e6:.3f} MB ({z['ratio_5x-q90']:.1f}x smaller), at quality 80 "
        f"{z['bytes_5x-q80'] / 1e6:.3f} MB ({z['ratio_5x-q80']:.1f}x); 10x export "
        f"{z['bytes_10x-q90'] / 1e6:.3f} MB ({z['ratio_10x-q90']:.1f}x).",
    ]
    for mag, m in results["maga"].items():
        a = m["alignment"]
        if a:
            lines.append(
                f"MAGA {mag}: {m['pairs']} pairs, {m['epochs']} epochs ({m['train_seconds']:.0f}s); hold-out distance "
                f"to the 20x embedding {a['unaligned']:.3f} (teacher on {mag}) -> {a['aligned']:.3f} (student)."
            )
    tg = results["targets"]
    if "maga5_gap_to_20x" in tg:
        lines.append(
            f"GLTrans: 20x - MAGA 5x = {tg['maga5_gap_to_20x']:+.3f} AUC (target <= 0.03); "
            f"20x - 5x without MAGA = {tg['no_maga5_gap_to_20x']:+.3f} (target >= 0.10); "
            f"speed-up 5x MAGA vs 20x = {tg.get('speedup_5x_vs_20x_gltrans', float('nan')):.1f}x (target >= 8x)."
        )
    return "\n".join(lines) + "\n"


def write_outputs(cfg: ReproConfig, results: dict) -> None:
    (cfg.out / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    with (cfg.out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(results["rows"][0]))
        writer.writeheader()
        writer.writerows(results["rows"])
    (cfg.out / "results.md").write_text(markdown(results))
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
    speed = measure_speed(cfg, rows, weights)
    results = build_results(cfg, reports, tests, speed, weights)
    results["wall_seconds"] = time.perf_counter() - started
    write_outputs(cfg, results)
    return results


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
    p.add_argument("--teacher", type=Path, default=None, help="ImageNet resnet50 weights file")
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
    a = p.parse_args(argv)
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
    )


def main(argv: list[str] | None = None) -> int:
    results = run(parse_args(argv))
    print(markdown(results))
    print(f"wall time {results['wall_seconds']:.0f}s; outputs in {results['config']['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
