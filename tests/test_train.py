"""MIL training: Lookahead, augmentation, model selection, determinism, learning an easy task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.train import (
    Bag,
    Lookahead,
    TrainConfig,
    _augment,
    _to_tensors,
    predict_logits,
    train_model,
    validation_metrics,
)
from tests.fake_accelerator import limit_memory


def easy_bags(n: int, seed: int, dim: int = 16) -> list[Bag]:
    """Positive bags hide 4 instances carrying a +3 shift on the first 4 features."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        label = i % 2
        size = int(rng.integers(20, 40))
        features = rng.normal(size=(size, dim)).astype(np.float32)
        if label:
            features[rng.choice(size, 4, replace=False), :4] += 3.0
        cells = rng.choice(64, size, replace=False)
        grid_rc = np.stack(np.unravel_index(cells, (8, 8)), axis=1)
        bags.append(Bag(features, grid_rc, label, f"s{seed}-{i}", f"p{seed}-{i}"))
    return bags


def test_lookahead_updates_slow_weights_every_k_steps():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = Lookahead(torch.optim.SGD([weight], lr=1.0), k=3, alpha=0.5)
    seen = []
    for _ in range(6):
        optimizer.zero_grad()
        (-weight).sum().backward()  # gradient -1: each SGD step adds 1
        optimizer.step()
        seen.append((float(weight.detach()), float(optimizer.slow_weights[0][0])))
    # fast 1, 2, 3 -> slow 0 + 0.5 * 3 = 1.5, fast restarts there; then 2.5, 3.5, 4.5 -> 3.0
    assert seen == [(1, 0), (2, 0), (1.5, 1.5), (2.5, 1.5), (3.5, 1.5), (3.0, 3.0)]


def test_lookahead_state_dict_restores_slow_weights_and_step_count():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = Lookahead(torch.optim.Adam([weight], lr=0.1), k=6)
    weight.grad = torch.ones(2)
    optimizer.step()
    state = optimizer.state_dict()
    other = Lookahead(torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.1), k=6)
    other.load_state_dict(state)
    assert other.step_count == 1
    assert torch.equal(other.slow_weights[0][0], torch.ones(2))


def test_augmentation_subsamples_and_shuffles_but_keeps_positions_with_features():
    bag = _to_tensors(easy_bags(1, seed=0))[0]
    cfg = TrainConfig(instance_subsample=0.5, shuffle_instances=True)
    augmented = _augment(bag, cfg, np.random.default_rng(0))
    n = bag.features.shape[0]
    assert augmented.features.shape[0] == int(np.ceil(n * 0.5))
    original = {tuple(rc.tolist()): f for rc, f in zip(bag.grid_rc, bag.features, strict=True)}
    for rc, features in zip(augmented.grid_rc, augmented.features, strict=True):
        assert torch.equal(original[tuple(rc.tolist())], features)
    kept_rows = [int(np.flatnonzero((bag.grid_rc == rc).all(1))[0]) for rc in augmented.grid_rc]
    assert kept_rows != sorted(kept_rows)  # the order is shuffled


def test_training_on_an_easy_bag_set_reaches_perfect_validation():
    result = train_model(
        "gltrans",
        {"dim": 32, "n_heads": 4},
        easy_bags(40, seed=0),
        easy_bags(16, seed=1),
        TrainConfig(lr=1e-3, epochs=8, patience=8, seed=0),
    )
    assert result.best_val["macro_f1"] == 1.0
    assert result.best_val["auc"] > 0.9
    assert result.mil_config["in_dim"] == 16 and result.mil_config["n_classes"] == 2


def test_returned_model_is_the_best_validation_epoch():
    val = easy_bags(12, seed=1)
    result = train_model(
        "abmil",
        {"dim": 16, "attn_dim": 8},
        easy_bags(16, seed=0),
        val,
        TrainConfig(lr=3e-3, epochs=6, patience=6),
    )
    best_f1 = max(row["val_macro_f1"] for row in result.history)
    best_row = result.history[result.best_epoch - 1]
    assert best_row["val_macro_f1"] == best_f1
    again = validation_metrics(predict_logits(result.model, val), np.array([b.label for b in val]))
    assert again["macro_f1"] == best_row["val_macro_f1"]
    assert again["loss"] == pytest.approx(best_row["val_loss"], rel=1e-5)


def test_training_is_deterministic_for_a_seed():
    def run(seed: int) -> dict:
        return train_model(
            "gltrans",
            {"dim": 16, "n_heads": 2, "depth": 1},
            easy_bags(6, seed=0),
            easy_bags(4, seed=1),
            TrainConfig(lr=1e-3, epochs=2, patience=2, seed=seed, instance_subsample=0.7),
        ).model.state_dict()

    first, second, other = run(3), run(3), run(4)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_clam_trains_with_its_instance_loss():
    result = train_model(
        "clam_sb",
        {"dim": 16, "attn_dim": 8, "k_sample": 4},
        easy_bags(8, seed=0),
        easy_bags(4, seed=1),
        TrainConfig(lr=1e-3, epochs=2, patience=2),
    )
    assert all(np.isfinite(row["train_loss"]) for row in result.history)


def test_training_refuses_a_config_that_contradicts_the_features():
    with pytest.raises(ValueError, match="in_dim=32 but features are 16-d"):
        train_model("abmil", {"in_dim": 32}, easy_bags(2, 0), easy_bags(2, 1), TrainConfig())


def offset_bags(n: int, seed: int, dim: int = 64) -> list[Bag]:
    """Embeddings as a seeded encoder gives them: a large shared per-dimension offset and a
    small spread; positive bags hide instances shifted by one spread on 8 dimensions."""
    rng = np.random.default_rng(seed)
    offset = np.random.default_rng(99).uniform(1.0, 3.0, dim)
    bags = []
    for i in range(n):
        label = i % 2
        size = int(rng.integers(20, 40))
        features = offset + 0.05 * rng.normal(size=(size, dim))
        if label:
            features[rng.choice(size, size // 2, replace=False), :8] += 0.05
        cells = rng.choice(64, size, replace=False)
        grid_rc = np.stack(np.unravel_index(cells, (8, 8)), axis=1)
        bags.append(
            Bag(features.astype(np.float32), grid_rc, label, f"o{seed}-{i}", f"q{seed}-{i}")
        )
    return bags


@pytest.mark.parametrize("model", ["abmil", "gltrans"])
def test_training_learns_a_small_signal_on_a_large_shared_offset(model):
    config = {"dim": 32, "attn_dim": 16} if model == "abmil" else {"dim": 32, "n_heads": 4}
    val = offset_bags(24, seed=1)
    result = train_model(
        model, config, offset_bags(40, seed=0), val, TrainConfig(epochs=10, patience=10, seed=0)
    )
    probs = torch.softmax(torch.from_numpy(predict_logits(result.model, val)), dim=1).numpy()
    labels = np.array([b.label for b in val])
    from analysis.metrics import auc_score

    assert auc_score(labels, probs) > 0.9  # the returned model takes the raw features


def test_standardising_is_folded_into_the_first_layer_exactly():
    from analysis.train import _standardized, feature_scale, fold_input_scale

    bags = offset_bags(6, seed=2)
    scale = feature_scale(bags)
    model = train_model(
        "abmil",
        {"dim": 16, "attn_dim": 8},
        bags,
        bags,
        TrainConfig(epochs=1, patience=1, standardize=False),
    ).model
    on_standardised = predict_logits(model, _standardized(bags, scale))
    fold_input_scale(model, *scale)
    assert np.allclose(predict_logits(model, bags), on_standardised, atol=1e-4)
    mean, spread = scale
    assert spread.min() >= 1e-6 and np.allclose(
        mean, np.concatenate([b.features for b in bags]).mean(0), atol=1e-5
    )


# --- bags too big for the device (``tests.fake_accelerator.limit_memory`` plays the device) ---

HUGE = 500  # instances per bag: a 20 x 25 grid
BUDGET = 8192  # values per op: a whole bag's embedding (500 x 32) does not fit
SMALL_ABMIL = {"dim": 32, "attn_dim": 16}


def huge_bags(n: int, seed: int) -> list[Bag]:
    rng = np.random.default_rng(seed)
    grid_rc = np.stack(np.divmod(np.arange(HUGE), 25), axis=1)
    return [
        Bag(rng.normal(size=(HUGE, 16)).astype(np.float32), grid_rc, i % 2, f"h{seed}-{i}", f"q{i}")
        for i in range(n)
    ]


@pytest.mark.parametrize("name", ["abmil", "gltrans"])
def test_predictions_of_bags_too_big_for_the_device_run_in_chunks_with_the_same_logits(
    name, monkeypatch
):
    from analysis.mil import bag, build_mil

    torch.manual_seed(0)
    config = {**SMALL_ABMIL, "in_dim": 16} if name == "abmil" else {"in_dim": 16, "dim": 32}
    model = build_mil(name, config)
    bags = huge_bags(3, seed=0)
    expected = predict_logits(model, bags)  # unlimited memory

    limit = limit_memory(monkeypatch, BUDGET)
    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", BUDGET)
    logits = predict_logits(model, bags)
    assert limit.refused == len(bags)  # each whole bag once; each chunked retry fitted
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_training_step_out_of_memory_names_the_slide_its_size_the_model_and_the_fix(monkeypatch):
    from analysis.errors import AnalysisError

    limit = limit_memory(monkeypatch, BUDGET)
    bags = huge_bags(2, seed=0)
    with pytest.raises(AnalysisError) as caught:
        train_model("abmil", SMALL_ABMIL, bags, huge_bags(2, seed=1), TrainConfig(epochs=1))
    message = str(caught.value)
    slide_id = message.split("training on slide ")[1].split(",")[0]
    assert slide_id in {b.slide_id for b in bags}
    assert message.startswith("ABMIL on cpu ran out of memory training on slide ")
    assert f"{HUGE} of its {HUGE} instances x 16 features" in message
    assert "max_train_instances" in message and "--max-instances" in message
    assert "LOWMAG_DEVICE" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert limit.refused == 1  # a training step is never retried


def test_a_training_step_under_the_instance_cap_fits_where_the_whole_bag_does_not(monkeypatch):
    from analysis.mil import bag

    limit = limit_memory(monkeypatch, BUDGET)
    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", BUDGET)
    cfg = TrainConfig(epochs=1, max_train_instances=100)  # 100 x 32 values: fits
    result = train_model("abmil", SMALL_ABMIL, huge_bags(2, seed=0), huge_bags(2, seed=1), cfg)
    assert len(result.history) == 1
    assert limit.refused == 2  # only the validation bags, each once, then in chunks
