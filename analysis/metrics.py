"""Classification metrics with patient-level bootstrap confidence intervals.

AUC is rank based (ties count 1/2), binary or macro one-vs-rest over the classes present, and
takes per-sample weights so a bootstrap resample is a weight vector, not a copy of the data.
Patients (``groups``) are resampled with replacement: all slides of a drawn patient come along.
Used by cross-validation (``analysis.evaluate``) and by validation during training
(``analysis.train``); imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import f1_score

CI_LEVEL = 0.95


# --- AUC (rank based, with weights so bootstrap resamples are cheap) ------------------------


def _weighted_binary_auc(
    positive: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """AUC of ``scores`` for ``positive`` under per-sample weights (B, n); ties count 1/2."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_pos = scores[order], positive[order]
    w = weights[:, order]  # (B, n)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w_pos = np.add.reduceat(w * sorted_pos, starts, axis=1)  # (B, G) per tie group
    w_neg = np.add.reduceat(w * ~sorted_pos, starts, axis=1)  # (B, G)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg  # (B, G) negatives strictly below the group
    pairs = (w_pos * (neg_below + 0.5 * w_neg)).sum(axis=1)  # (B,)
    total = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, pairs / total, np.nan)


def _weighted_auc(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) AUC per weight row: binary, or macro one-vs-rest over the classes present."""
    if probs.shape[1] == 2:
        return _weighted_binary_auc(labels == 1, probs[:, 1], weights)
    per_class = np.stack(
        [_weighted_binary_auc(labels == c, probs[:, c], weights) for c in range(probs.shape[1])]
    )  # (C, B)
    valid = ~np.isnan(per_class)
    with np.errstate(invalid="ignore"):
        macro = np.nansum(per_class, axis=0) / valid.sum(axis=0)
    return np.where(valid.sum(axis=0) >= 2, macro, np.nan)


def auc_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """AUC (binary, or macro one-vs-rest); NaN when only one class is present."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(_weighted_auc(labels, np.asarray(probs), np.ones((1, len(labels))))[0])


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, accuracy and macro-F1 of one prediction set."""
    predicted = probs.argmax(axis=1)
    classes = list(range(probs.shape[1]))
    return {
        "auc": auc_score(labels, probs),
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(
            f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)
        ),
    }


# --- bootstrap ------------------------------------------------------------------------------


@dataclass
class ConfidenceInterval:
    estimate: float
    low: float
    high: float
    level: float
    n_resamples: int  # resamples where the statistic was defined


def _percentiles(values: np.ndarray, estimate: float, level: float) -> ConfidenceInterval:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return ConfidenceInterval(estimate, float("nan"), float("nan"), level, 0)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return ConfidenceInterval(estimate, float(low), float(high), level, len(values))


def _patient_weights(groups: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(B, n) sample weights: how often each sample's patient was drawn in each resample."""
    patients, patient_of = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    counts = rng.multinomial(len(patients), np.full(len(patients), 1 / len(patients)), n_resamples)
    return counts[:, patient_of].astype(np.float64)


def bootstrap_auc_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray | None = None,
    n_resamples: int = 2000,
    level: float = CI_LEVEL,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile CI of the AUC, resampling groups (patients; default: each sample alone)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    weights = _patient_weights(groups, n_resamples, np.random.default_rng(seed))
    return _percentiles(_weighted_auc(labels, probs, weights), auc_score(labels, probs), level)


def bootstrap_mean_ci(
    values: Sequence[float], n_resamples: int = 2000, level: float = CI_LEVEL, seed: int = 0
) -> ConfidenceInterval:
    """Percentile CI of the mean of ``values`` (e.g. the per-fold AUCs); NaNs are dropped."""
    finite = np.asarray([v for v in values if not np.isnan(v)], dtype=np.float64)
    if len(finite) == 0:
        return ConfidenceInterval(float("nan"), float("nan"), float("nan"), level, 0)
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, len(finite), (n_resamples, len(finite)))].mean(axis=1)
    return _percentiles(means, float(finite.mean()), level)


@dataclass
class PairedComparison:
    auc_a: float
    auc_b: float
    delta: float  # auc_a - auc_b
    delta_low: float
    delta_high: float
    p_value: float  # two-sided, H0: equal AUC
    n_resamples: int


def paired_bootstrap_test(
    labels: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    groups: np.ndarray | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> PairedComparison:
    """Paired patient-level bootstrap of the AUC difference of two models on the same samples."""
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    weights = _patient_weights(groups, n_resamples, np.random.default_rng(seed))
    deltas = _weighted_auc(labels, np.asarray(probs_a), weights) - _weighted_auc(
        labels, np.asarray(probs_b), weights
    )
    deltas = deltas[~np.isnan(deltas)]
    auc_a, auc_b = auc_score(labels, probs_a), auc_score(labels, probs_b)
    ci = _percentiles(deltas, auc_a - auc_b, CI_LEVEL)
    n = len(deltas)
    tail = min(np.sum(deltas <= 0), np.sum(deltas >= 0))
    p_value = min(1.0, 2 * (1 + tail) / (n + 1)) if n else float("nan")
    return PairedComparison(auc_a, auc_b, auc_a - auc_b, ci.low, ci.high, float(p_value), n)
