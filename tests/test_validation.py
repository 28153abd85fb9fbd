"""The validation report's numbers and the paired test, checked against hand counts."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.evaluate import OutOfFoldPredictions, auc_score
from analysis.validation import mcnemar, positive_index, validation_report


def test_mcnemar_exact_p_values():
    # 6 discordant cases all favouring A: p = 2 * 0.5**6
    result = mcnemar([True] * 6 + [True] * 4, [False] * 6 + [True] * 4)
    assert (result["only_a_correct"], result["only_b_correct"]) == (6, 0)
    assert result["p_value"] == pytest.approx(2 * 0.5**6)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0
    # 1 vs 4 discordant: 2 * P(X <= 1 | n=5) = 2 * 6/32
    a = [True, False, False, False, False, True]
    b = [False, True, True, True, True, True]
    assert mcnemar(a, b)["p_value"] == pytest.approx(12 / 32)


def test_the_report_counts_what_the_predictions_say(tmp_path):
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    lesion = np.array([0.9, 0.8, 0.2, 0.1, 0.3, 0.6, 0.4, 0.7])  # P(class 0 = "lesion")
    probs = np.stack([lesion, 1 - lesion], axis=1)
    oof = OutOfFoldPredictions(
        [f"s{i}" for i in range(8)], [f"p{i // 2}" for i in range(8)], np.zeros(8), labels, probs
    )
    report = validation_report(oof, ["lesion", "normal"], n_bootstrap=300, out_dir=tmp_path)
    assert positive_index(["lesion", "normal"]) == 0 and report["positive_class"] == "lesion"
    # lesion called when P(lesion) >= 0.5: cases 0, 1, 5, 7; lesion cases: 0, 1, 2, 7
    assert report["confusion_matrix"] == [[3, 1], [1, 3]]
    assert report["sensitivity"] == pytest.approx(3 / 4)
    assert report["specificity"] == pytest.approx(3 / 4)
    assert report["auc_pooled"] == pytest.approx(auc_score(labels, probs))
    low, high = report["auc_pooled_ci"]
    assert low <= report["auc_pooled"] <= high
    assert sum(b["n"] for b in report["calibration"]) == 8
    for name in ("roc.png", "calibration.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
