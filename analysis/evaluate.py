"""Patient-level k-fold cross-validation, metrics with bootstrap CIs, paired model comparison.

Splitting: patients (never slides) are dealt into k folds, stratified by the patient's label
(the most frequent label among their slides). Fold i tests on fold i, validates on fold
(i + 1) % k and trains on the rest: 80/10/10 for k = 10.

Confidence intervals (percentile bootstrap, 95%, >= 1000 resamples):
- ``auc_mean_ci``: resampling the k per-fold test AUCs (the paper's "mean AUC").
- ``auc_pooled_ci``: cluster bootstrap of the pooled out-of-fold predictions, resampling
  patients with replacement (all slides of a drawn patient come along).
Paired comparison of two models: the same patient resamples applied to both models'
out-of-fold predictions; two-sided p-value from the bootstrap distribution of the AUC
difference. AUC is binary, or macro one-vs-rest over the classes present for multi-class.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from sklearn.metrics import roc_curve

from analysis.files import json_ready as _json_safe
from analysis.metrics import (
    CI_LEVEL,
    PairedComparison,
    auc_score,
    bootstrap_auc_ci,
    bootstrap_mean_ci,
    classification_metrics,
    paired_bootstrap_test,
)
from analysis.train import Bag, TrainConfig, predict_proba, train_config_to_dict, train_model

# --- splitting ------------------------------------------------------------------------------


class FoldSplit(NamedTuple):
    fold: int
    train: np.ndarray  # indices into the bag list
    val: np.ndarray
    test: np.ndarray


def patient_folds(
    patient_ids: Sequence[str], labels: Sequence[int], k: int = 10, seed: int = 0
) -> dict[str, int]:
    """Fold of each patient, stratified by patient label (the most frequent of its slides)."""
    by_patient: dict[str, Counter[int]] = {}
    for patient, label in zip(patient_ids, labels, strict=True):
        by_patient.setdefault(str(patient), Counter())[int(label)] += 1
    if k < 3:
        raise ValueError(f"k-fold with a test and a validation fold needs k >= 3, got {k}")
    if len(by_patient) < k:
        raise ValueError(f"{len(by_patient)} patients cannot fill {k} folds; use fewer folds")
    patient_label = {p: min(c, key=lambda lab: (-c[lab], lab)) for p, c in by_patient.items()}
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    position = 0
    for label in sorted(set(patient_label.values())):
        members = sorted(p for p, lab in patient_label.items() if lab == label)
        for patient in rng.permutation(members):
            folds[str(patient)] = position % k
            position += 1
    return folds


def make_folds(bags: Sequence[Bag], k: int = 10, seed: int = 0) -> list[FoldSplit]:
    """k patient-level splits: test fold i, validation fold (i + 1) % k, train the rest."""
    patient_ids = [str(bag.patient_id) for bag in bags]
    fold_of = patient_folds(patient_ids, [bag.label for bag in bags], k, seed)
    bag_fold = np.array([fold_of[p] for p in patient_ids])
    splits = []
    for fold in range(k):
        val_fold = (fold + 1) % k
        test = np.flatnonzero(bag_fold == fold)
        val = np.flatnonzero(bag_fold == val_fold)
        train = np.flatnonzero((bag_fold != fold) & (bag_fold != val_fold))
        splits.append(FoldSplit(fold, train, val, test))
    return splits


def fixed_test_splits(
    bags: Sequence[Bag],
    test: Sequence[int],
    repeats: int = 10,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> list[FoldSplit]:
    """``repeats`` patient-level train/validation splits of the bags outside a fixed test set.

    The CAMELYON16 protocol: the official test slides are never trained or validated on; each
    repeat draws its validation patients (stratified by label) from the rest with its own seed.
    """
    test_idx = np.array(sorted(set(int(i) for i in test)), dtype=int)
    rest = np.array([i for i in range(len(bags)) if i not in set(test_idx.tolist())], dtype=int)
    test_patients = {str(bags[i].patient_id) for i in test_idx}
    shared = sorted(test_patients & {str(bags[i].patient_id) for i in rest})
    if shared:
        raise ValueError(
            f"patient(s) {', '.join(shared[:3])} have slides both in the test list and outside it; "
            "a patient's slides must all be in one set"
        )
    if repeats < 1 or not 0.0 < val_fraction < 1.0:
        raise ValueError("repeats must be >= 1 and the validation fraction in (0, 1)")
    by_patient: dict[str, Counter[int]] = {}
    for i in rest:
        by_patient.setdefault(str(bags[i].patient_id), Counter())[int(bags[i].label)] += 1
    if len(by_patient) < 2:
        raise ValueError("the slides outside the test list need at least two patients")
    patient_label = {p: min(c, key=lambda lab: (-c[lab], lab)) for p, c in by_patient.items()}
    splits = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        val_patients: set[str] = set()
        for label in sorted(set(patient_label.values())):
            members = sorted(p for p, lab in patient_label.items() if lab == label)
            n_val = int(round(len(members) * val_fraction))
            val_patients.update(rng.permutation(members)[:n_val].tolist())
        if not val_patients:
            val_patients = {str(rng.choice(sorted(patient_label)))}
        val = np.array([i for i in rest if str(bags[i].patient_id) in val_patients], dtype=int)
        train = np.array([i for i in rest if str(bags[i].patient_id) not in val_patients], int)
        splits.append(FoldSplit(r, train, val, test_idx))
    return splits


# --- cross-validation -----------------------------------------------------------------------


@dataclass
class OutOfFoldPredictions:
    slide_ids: list[str]
    patient_ids: list[str]
    folds: np.ndarray  # (n,) test fold of each slide
    labels: np.ndarray  # (n,)
    probs: np.ndarray  # (n, C)


@dataclass
class CrossValResult:
    model_name: str
    mil_config: dict[str, Any]
    train_config: dict[str, Any]
    classes: list[str]
    fold_metrics: list[dict[str, float]]
    predictions: OutOfFoldPredictions
    summary: dict[str, Any]
    histories: list[list[dict[str, float]]] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)


def crossval(
    bags: Sequence[Bag],
    model_name: str,
    mil_config: dict[str, Any] | None = None,
    train_cfg: TrainConfig | None = None,
    folds: int = 10,
    out_dir: str | Path | None = None,
    classes: Sequence[str] | None = None,
    n_bootstrap: int = 2000,
    split_seed: int = 0,
    splits: Sequence[FoldSplit] | None = None,
) -> CrossValResult:
    """Patient-level k-fold cross-validation of one MIL model; writes a report to ``out_dir``.

    ``splits`` replaces the k folds (e.g. ``fixed_test_splits``): a slide tested in several
    splits gets the mean of its predicted probabilities in the pooled predictions.
    """
    train_cfg = train_cfg or TrainConfig()
    n_classes = max(len(classes or []), 1 + max(int(bag.label) for bag in bags), 2)
    classes = list(classes) if classes else [str(c) for c in range(n_classes)]
    config = {
        "in_dim": int(bags[0].features.shape[1]),
        "n_classes": n_classes,
        **(mil_config or {}),
    }
    probs = np.zeros((len(bags), n_classes))
    tested = np.zeros(len(bags), dtype=int)
    fold_of = np.zeros(len(bags), dtype=int)
    rows, histories = [], []
    for split in splits if splits is not None else make_folds(bags, folds, split_seed):
        trained = train_model(
            model_name,
            config,
            [bags[i] for i in split.train],
            [bags[i] for i in split.val],
            replace(train_cfg, seed=train_cfg.seed + split.fold),
        )
        config = trained.mil_config
        test_bags = [bags[i] for i in split.test]
        split_probs = predict_proba(trained.model, test_bags)
        probs[split.test] += split_probs
        tested[split.test] += 1
        fold_of[split.test] = split.fold
        labels = np.array([bag.label for bag in test_bags])
        rows.append(_fold_row(split, bags, labels, split_probs, trained.best_epoch))
        histories.append(trained.history)
    keep = [int(i) for i in np.flatnonzero(tested)]
    predictions = OutOfFoldPredictions(
        [str(bags[i].slide_id) for i in keep],
        [str(bags[i].patient_id) for i in keep],
        fold_of[keep],
        np.array([int(bags[i].label) for i in keep]),
        probs[keep] / tested[keep, None],
    )
    summary = summarise(rows, predictions, n_bootstrap, seed=split_seed)
    summary["protocol"] = (
        f"{len(rows)}-fold patient-level cross-validation"
        if splits is None
        else f"fixed test set ({len(keep)} slides), {len(rows)} train/validation splits"
    )
    result = CrossValResult(
        model_name,
        config,
        train_config_to_dict(train_cfg),
        classes,
        rows,
        predictions,
        summary,
        histories,
    )
    if out_dir is not None:
        result.paths = write_report(result, Path(out_dir))
    return result


def _fold_row(
    split: FoldSplit, bags: Sequence[Bag], labels: np.ndarray, probs: np.ndarray, best_epoch: int
) -> dict[str, Any]:
    return {
        "fold": split.fold,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "n_test_patients": len({bags[i].patient_id for i in split.test}),
        **classification_metrics(labels, probs),
        "best_epoch": best_epoch,
    }


def summarise(
    rows: list[dict[str, Any]],
    predictions: OutOfFoldPredictions,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean and sd of per-fold metrics, bootstrap CIs, and pooled out-of-fold metrics."""
    summary: dict[str, Any] = {}
    for key in ("auc", "accuracy", "macro_f1"):
        values = np.array([row[key] for row in rows], dtype=np.float64)
        summary[f"{key}_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else None
        summary[f"{key}_sd"] = (
            float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else None
        )
    mean_ci = bootstrap_mean_ci([row["auc"] for row in rows], n_bootstrap, seed=seed)
    pooled_ci = bootstrap_auc_ci(
        predictions.labels,
        predictions.probs,
        np.array(predictions.patient_ids),
        n_bootstrap,
        seed=seed,
    )
    pooled = classification_metrics(predictions.labels, predictions.probs)
    summary.update(
        auc_mean_ci=[mean_ci.low, mean_ci.high],
        auc_pooled=pooled["auc"],
        auc_pooled_ci=[pooled_ci.low, pooled_ci.high],
        accuracy_pooled=pooled["accuracy"],
        macro_f1_pooled=pooled["macro_f1"],
        ci_level=CI_LEVEL,
        n_bootstrap=n_bootstrap,
        ci_method=(
            "auc_mean_ci: percentile bootstrap over the per-fold test AUCs; auc_pooled_ci: "
            "percentile bootstrap of pooled out-of-fold predictions resampling patients"
        ),
        n_slides=len(predictions.slide_ids),
        n_patients=len(set(predictions.patient_ids)),
        n_folds=len(rows),
    )
    return summary


def compare_crossval(
    a: OutOfFoldPredictions, b: OutOfFoldPredictions, n_resamples: int = 2000, seed: int = 0
) -> PairedComparison:
    """Paired bootstrap of two runs' out-of-fold predictions, matched by slide id."""
    index_b = {slide: i for i, slide in enumerate(b.slide_ids)}
    missing = [s for s in a.slide_ids if s not in index_b]
    if missing:
        raise ValueError(
            f"{len(missing)} slides of run A are missing from run B, e.g. {missing[0]}"
        )
    order = np.array([index_b[s] for s in a.slide_ids])
    if not np.array_equal(a.labels, b.labels[order]):
        raise ValueError("the two runs disagree on slide labels; they are not the same cohort")
    return paired_bootstrap_test(
        a.labels, a.probs, b.probs[order], np.array(a.patient_ids), n_resamples, seed
    )


# --- report ---------------------------------------------------------------------------------


def write_report(result: CrossValResult, out_dir: Path) -> dict[str, Path]:
    """crossval.json, folds.csv, predictions.csv, summary.md and roc.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "crossval.json",
        "folds_csv": out_dir / "folds.csv",
        "predictions_csv": out_dir / "predictions.csv",
        "markdown": out_dir / "summary.md",
        "roc_png": out_dir / "roc.png",
    }
    paths["json"].write_text(json.dumps(_report_dict(result), indent=2, allow_nan=False) + "\n")
    _write_csv(paths["folds_csv"], result.fold_metrics)
    _write_csv(paths["predictions_csv"], _prediction_rows(result))
    paths["markdown"].write_text(markdown_table(result))
    plot_roc(result.predictions, result.classes, paths["roc_png"], result.model_name)
    return paths


def _report_dict(result: CrossValResult) -> dict[str, Any]:
    return _json_safe(
        {
            "model": result.model_name,
            "mil_config": result.mil_config,
            "train_config": result.train_config,
            "classes": result.classes,
            "summary": result.summary,
            "folds": result.fold_metrics,
            "histories": result.histories,
        }
    )


def _prediction_rows(result: CrossValResult) -> list[dict[str, Any]]:
    p = result.predictions
    rows = []
    for i, slide in enumerate(p.slide_ids):
        row = {
            "slide_id": slide,
            "patient_id": p.patient_ids[i],
            "fold": int(p.folds[i]),
            "label": result.classes[p.labels[i]],
            "predicted": result.classes[int(p.probs[i].argmax())],
        }
        row.update({f"prob_{c}": f"{p.probs[i, j]:.6f}" for j, c in enumerate(result.classes)})
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_predictions(path: str | Path) -> OutOfFoldPredictions:
    """Out-of-fold predictions back from a run's ``predictions.csv``."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    prob_keys = [key for key in rows[0] if key.startswith("prob_")]
    classes = [key.removeprefix("prob_") for key in prob_keys]
    return OutOfFoldPredictions(
        [row["slide_id"] for row in rows],
        [row["patient_id"] for row in rows],
        np.array([int(row["fold"]) for row in rows]),
        np.array([classes.index(row["label"]) for row in rows]),
        np.array([[float(row[key]) for key in prob_keys] for row in rows]),
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def markdown_table(result: CrossValResult) -> str:
    """A summary line and a per-fold table, ready to paste into a report."""
    s = result.summary
    low, high = s["auc_mean_ci"]
    pooled_low, pooled_high = s["auc_pooled_ci"]
    lines = [
        f"## {result.model_name}: "
        + s.get("protocol", f"{s['n_folds']}-fold patient-level cross-validation"),
        "",
        "| Model | AUC mean (95% CI) | AUC pooled (95% CI) | Accuracy | Macro-F1 |",
        "|---|---|---|---|---|",
        f"| {result.model_name} | {_fmt(s['auc_mean'])} ({_fmt(low)}-{_fmt(high)}) "
        f"| {_fmt(s['auc_pooled'])} ({_fmt(pooled_low)}-{_fmt(pooled_high)}) "
        f"| {_fmt(s['accuracy_mean'])} ± {_fmt(s['accuracy_sd'])} "
        f"| {_fmt(s['macro_f1_mean'])} ± {_fmt(s['macro_f1_sd'])} |",
        "",
        "| Fold | Test slides | Test patients | AUC | Accuracy | Macro-F1 | Best epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.fold_metrics:
        lines.append(
            f"| {row['fold']} | {row['n_test']} | {row['n_test_patients']} | {_fmt(row['auc'])} "
            f"| {_fmt(row['accuracy'])} | {_fmt(row['macro_f1'])} | {row['best_epoch']} |"
        )
    lines += ["", f"{s['n_slides']} slides, {s['n_patients']} patients. CIs: {s['ci_method']}.", ""]
    return "\n".join(lines)


def plot_roc(
    predictions: OutOfFoldPredictions, classes: Sequence[str], path: Path, title: str
) -> None:
    """ROC curves: per fold and pooled (binary), or pooled one-vs-rest per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    labels, probs = predictions.labels, predictions.probs
    if probs.shape[1] == 2:
        for fold in np.unique(predictions.folds):
            mask = predictions.folds == fold
            if len(np.unique(labels[mask])) == 2:
                fpr, tpr, _ = roc_curve(labels[mask], probs[mask, 1])
                ax.plot(fpr, tpr, color="tab:blue", alpha=0.25, linewidth=1)
        _plot_pooled(ax, labels == 1, probs[:, 1], f"pooled, {classes[1]} vs {classes[0]}")
    else:
        for c, name in enumerate(classes):
            _plot_pooled(ax, labels == c, probs[:, c], f"{name} vs rest")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_pooled(ax: Any, positive: np.ndarray, scores: np.ndarray, label: str) -> None:
    if positive.all() or not positive.any():
        return
    fpr, tpr, _ = roc_curve(positive, scores)
    auc = auc_score(positive.astype(int), np.stack([1 - scores, scores], axis=1))
    ax.plot(fpr, tpr, linewidth=2, label=f"{label} (AUC {auc:.3f})")
