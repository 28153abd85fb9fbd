"""The validation report of a trained model, and the paired comparison of two models.

``validation_report`` turns out-of-fold predictions (``analysis.evaluate.crossval``) into what
a model card shows: pooled AUC with a patient-level bootstrap CI, a confusion matrix at the
operating threshold, calibration bins, and a ROC curve and a calibration plot as PNG.
``mcnemar`` is the exact paired test of two models' agreement with the same reference calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from pathlib import Path
from typing import Any

import numpy as np

from analysis.evaluate import OutOfFoldPredictions, auc_score, bootstrap_auc_ci, plot_roc


def predicted_labels(probs: np.ndarray, threshold: float = 0.5, positive: int = 1) -> np.ndarray:
    """Binary: ``positive`` when its probability reaches ``threshold``, else the other class;
    more classes: the argmax."""
    probs = np.asarray(probs)
    if probs.shape[1] == 2:
        return np.where(probs[:, positive] >= threshold, positive, 1 - positive)
    return probs.argmax(axis=1)


NEGATIVE_NAMES = {"normal", "benign", "negative", "no lesion", "non-tumour", "non-tumor"}


def positive_index(classes: Sequence[str]) -> int:
    """Which of two classes is the finding: the one not named like a negative (default 1)."""
    if len(classes) == 2 and str(classes[1]).strip().lower() in NEGATIVE_NAMES:
        return 0
    return 1


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> list[list[int]]:
    """``matrix[true][predicted]`` counts."""
    matrix = np.zeros((n_classes, n_classes), dtype=int)
    for truth, guess in zip(labels, predicted, strict=True):
        matrix[int(truth), int(guess)] += 1
    return matrix.tolist()


def calibration_bins(
    positive: np.ndarray, scores: np.ndarray, n_bins: int = 5
) -> list[dict[str, float]]:
    """Equal-width bins of the predicted probability: mean prediction vs observed frequency."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1]), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = index == b
        if mask.any():
            rows.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": int(mask.sum()),
                    "mean_predicted": float(scores[mask].mean()),
                    "observed": float(positive[mask].mean()),
                }
            )
    return rows


def _nan_to_none(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def validation_report(
    predictions: OutOfFoldPredictions,
    classes: Sequence[str],
    *,
    threshold: float = 0.5,
    n_bootstrap: int = 2000,
    seed: int = 0,
    out_dir: str | Path | None = None,
    title: str = "",
    positive: int | None = None,
) -> dict[str, Any]:
    """Metrics of pooled out-of-fold predictions; PNGs (roc.png, calibration.png) in ``out_dir``.

    Binary models: ``positive`` (default: ``positive_index(classes)``) is the class whose
    probability is compared with ``threshold``; sensitivity and calibration refer to it.
    """
    labels, probs = np.asarray(predictions.labels), np.asarray(predictions.probs)
    groups = np.asarray(predictions.patient_ids)
    ci = bootstrap_auc_ci(labels, probs, groups, n_bootstrap, seed=seed)
    positive_class = None
    if probs.shape[1] == 2:
        positive_class = positive_index(classes) if positive is None else positive
    predicted = predicted_labels(probs, threshold, 1 if positive_class is None else positive_class)
    report: dict[str, Any] = {
        "classes": list(classes),
        "n_slides": int(len(labels)),
        "n_patients": int(len(set(predictions.patient_ids))),
        "auc_pooled": _nan_to_none(auc_score(labels, probs)),
        "auc_pooled_ci": [_nan_to_none(ci.low), _nan_to_none(ci.high)],
        "ci_level": ci.level,
        "n_bootstrap": int(n_bootstrap),
        "ci_method": "percentile bootstrap of the pooled out-of-fold predictions, "
        "resampling patients",
        "threshold": float(threshold),
        "positive_class": classes[positive_class] if positive_class is not None else None,
        "confusion_matrix": confusion_matrix(labels, predicted, probs.shape[1]),
        "accuracy": float((predicted == labels).mean()),
    }
    if positive_class is not None:
        pos = positive_class
        report["calibration"] = calibration_bins(labels == pos, probs[:, pos])
        tp = int(((predicted == pos) & (labels == pos)).sum())
        fn = int(((predicted != pos) & (labels == pos)).sum())
        tn = int(((predicted != pos) & (labels != pos)).sum())
        fp = int(((predicted == pos) & (labels != pos)).sum())
        report["sensitivity"] = tp / (tp + fn) if tp + fn else None
        report["specificity"] = tn / (tn + fp) if tn + fp else None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_roc(predictions, list(classes), out / "roc.png", title or "ROC")
        plot_calibration(
            labels, probs, list(classes), out / "calibration.png", title, positive_class
        )
    return report


def plot_calibration(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    path: Path,
    title: str = "",
    positive: int | None = 1,
) -> None:
    """Reliability diagram: observed frequency against mean predicted probability per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    targets = [positive if positive is not None else 1] if probs.shape[1] == 2 else None
    targets = targets or list(range(probs.shape[1]))
    for c in targets:
        bins = calibration_bins(labels == c, probs[:, c])
        ax.plot(
            [b["mean_predicted"] for b in bins],
            [b["observed"] for b in bins],
            marker="o",
            label=f"{classes[c]} (n per bin: {', '.join(str(b['n']) for b in bins)})",
        )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
    ax.set(
        xlabel="Mean predicted probability",
        ylabel="Observed frequency",
        title=f"Calibration {title}".strip(),
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test of two models scored on the same cases.

    ``b``: cases only model A got right, ``c``: only model B; under H0 the discordant cases
    split as Binomial(b + c, 1/2).
    """
    a_right = np.asarray(correct_a, dtype=bool)
    b_right = np.asarray(correct_b, dtype=bool)
    if a_right.shape != b_right.shape:
        raise ValueError("both models must be scored on the same cases")
    only_a = int((a_right & ~b_right).sum())
    only_b = int((~a_right & b_right).sum())
    n = only_a + only_b
    if n == 0:
        p_value = 1.0
    else:
        k = min(only_a, only_b)
        tail = sum(comb(n, i) for i in range(k + 1)) / 2**n
        p_value = min(1.0, 2 * tail)
    return {
        "n": int(len(a_right)),
        "only_a_correct": only_a,
        "only_b_correct": only_b,
        "both_correct": int((a_right & b_right).sum()),
        "neither_correct": int((~a_right & ~b_right).sum()),
        "p_value": float(p_value),
        "test": "exact two-sided McNemar (binomial on discordant cases)",
    }
