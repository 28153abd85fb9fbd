"""Class evidence per patch: signed, per class, and cold on a benign slide where attention is hot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.heatmap import evidence_display, normalise_scores
from analysis.mil import bag, build_mil
from analysis.mil.evidence import evidence_target
from analysis.pipeline import run_mil_evidence
from tests.fake_accelerator import limit_memory

DIM = 16
SIDE = 8  # bags are SIDE x SIDE grids
TISSUE = np.random.default_rng(0).standard_normal(DIM)


def _bag(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D) features, (N, 2) grid cells, (N,) lesion mask: lesion patches carry a signature."""
    n = SIDE * SIDE
    # one kind of tissue: patches resemble each other, slides differ a little
    tissue = TISSUE + 0.3 * rng.standard_normal(DIM)
    features = (tissue + 0.3 * rng.standard_normal((n, DIM))).astype(np.float32)
    # every slide has a few conspicuous but class-neutral patches (folds, pen marks, ...)
    features[rng.choice(n, 4, replace=False), 1] += 4.0
    lesion = np.zeros(n, dtype=bool)
    if label:
        lesion[rng.choice(n, 12, replace=False)] = True
        features[lesion, 0] += 3.0
    rows, cols = np.divmod(np.arange(n), SIDE)
    return features, np.stack([rows, cols], axis=1), lesion


@pytest.fixture(scope="module", params=["gltrans", "abmil", "clam_sb"])
def trained(request):
    torch.manual_seed(0)
    config = {"in_dim": DIM, "dim": 32, "n_classes": 2}
    if request.param == "gltrans":
        config.update(n_heads=2, depth=1)
    model = build_mil(request.param, config)
    rng = np.random.default_rng(1)
    bags = [(*_bag(rng, label), label) for label in [0, 1] * 24]
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        for features, grid_rc, _, label in bags:
            logits, _ = model(torch.from_numpy(features), torch.from_numpy(grid_rc))
            loss = F.cross_entropy(logits[None], torch.tensor([label]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


CLASSES = ["normal", "lesion"]


def test_normal_slide_evidence_is_not_hot_where_attention_is(trained):
    rng = np.random.default_rng(99)
    for _ in range(3):
        features, grid_rc, _ = _bag(rng, 0)
        probabilities, attention, evidence, target = run_mil_evidence(
            trained, features, grid_rc, CLASSES
        )
        assert CLASSES[int(np.argmax(probabilities))] == "normal"
        assert CLASSES[target] == "lesion"  # a benign call shows evidence for the lesion class
        heat = normalise_scores(attention)  # what the attention layer paints
        hottest = heat >= 0.5  # where the attention layer is hot on this benign slide
        shown = np.nan_to_num(evidence_display(evidence), nan=0.0)
        assert shown[hottest].max() < 0.3
        assert shown.mean() < 0.1


def test_lesion_slide_evidence_marks_the_lesion_patches(trained):
    rng = np.random.default_rng(7)
    features, grid_rc, lesion = _bag(rng, 1)
    probabilities, _, evidence, target = run_mil_evidence(trained, features, grid_rc, CLASSES)
    assert CLASSES[target] == "lesion" == CLASSES[int(np.argmax(probabilities))]
    shown = np.nan_to_num(evidence_display(evidence), nan=0.0)
    assert shown[lesion].mean() > 0.5
    assert shown[lesion].mean() > 3 * shown[~lesion].mean()


def test_evidence_is_antisymmetric_between_two_classes_and_averages_to_the_margin(trained):
    features, grid_rc, _ = _bag(np.random.default_rng(5), 1)
    feats, coords = torch.from_numpy(features), torch.from_numpy(grid_rc)
    with torch.no_grad():
        logits, attention, for_1 = trained.instance_evidence(feats, coords, 1)
        _, _, for_0 = trained.instance_evidence(feats, coords, 0)
    assert torch.allclose(for_0, -for_1, atol=1e-5)
    # attention pooling: the mean is exactly the bag's margin; GLTrans reads instances alone
    if hasattr(trained, "attention"):
        margin = float(logits[1] - logits[0])
        assert float(for_1.mean()) == pytest.approx(margin, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    ("classes", "probabilities", "expected"),
    [
        (["normal", "lesion"], [0.9, 0.1], 1),
        (["normal", "lesion"], [0.2, 0.8], 1),
        (["lesion", "Benign"], [0.3, 0.7], 0),
        (["a", "b", "c"], [0.2, 0.5, 0.3], 1),
        (["normal", "adenoma", "carcinoma"], [0.6, 0.1, 0.3], 2),
        (["0", "1"], [0.7, 0.3], 1),
    ],
)
def test_evidence_target_is_the_call_or_the_likeliest_abnormal_class(
    classes, probabilities, expected
):
    assert evidence_target(classes, probabilities) == expected


def test_evidence_display_uses_a_fixed_scale_and_hides_counter_evidence():
    shown = evidence_display(np.array([-3.0, 0.0, 2.0, 20.0]))
    assert np.isnan(shown[:2]).all()
    assert shown[2] == pytest.approx(np.tanh(1.0))
    assert 0.99 < shown[3] <= 1.0


def test_evidence_under_the_out_of_memory_fallback_equals_the_normal_path(trained, monkeypatch):
    """A device too small for the bag: the chunked retry gives the same call, attention and
    evidence (``tests.fake_accelerator.limit_memory`` refuses any op above 512 values)."""
    features, grid_rc, _ = _bag(np.random.default_rng(7), 1)
    expected = run_mil_evidence(trained, features, grid_rc, CLASSES)

    limit = limit_memory(monkeypatch, 512)
    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", 512)
    probabilities, attention, evidence, target = run_mil_evidence(
        trained, features, grid_rc, CLASSES
    )
    assert limit.refused == 1 and max(limit.ran) <= 512
    assert target == expected[3]
    np.testing.assert_allclose(probabilities, expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(attention, expected[1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(evidence, expected[2], rtol=1e-4, atol=1e-5)
