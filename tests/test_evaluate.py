"""Patient-level cross-validation, metrics with bootstrap CIs, paired comparison, report, CLI."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from analysis.cli import main as lowmag
from analysis.commands.crossval import load_bags
from analysis.evaluate import compare_crossval, crossval, make_folds, read_predictions
from analysis.features import grid_rc_from_coords
from analysis.metrics import auc_score, bootstrap_auc_ci, bootstrap_mean_ci, paired_bootstrap_test
from analysis.train import Bag, TrainConfig


def layout_bags(slides_per_patient: list[int], labels: list[int]) -> list[Bag]:
    empty = np.zeros((1, 4), np.float32)
    cell = np.zeros((1, 2), np.int64)
    return [
        Bag(empty, cell, label, f"p{p}-s{s}", f"p{p}")
        for p, (count, label) in enumerate(zip(slides_per_patient, labels, strict=True))
        for s in range(count)
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(3, 10).flatmap(
        lambda k: st.tuples(
            st.just(k),
            st.lists(st.tuples(st.integers(1, 4), st.integers(0, 2)), min_size=k, max_size=40),
            st.integers(0, 10_000),
        )
    )
)
def test_folds_never_put_one_patient_in_two_sets(case):
    k, patients, seed = case
    bags = layout_bags([n for n, _ in patients], [label for _, label in patients])
    splits = make_folds(bags, k=k, seed=seed)
    tested = []
    for split in splits:
        sets = [{bags[i].patient_id for i in part} for part in (split.train, split.val, split.test)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert len(split.train) + len(split.val) + len(split.test) == len(bags)
        assert sets[1] and sets[2]
        tested.extend(split.test)
    assert sorted(tested) == list(range(len(bags)))  # every slide is tested exactly once


def test_folds_are_stratified_and_about_80_10_10():
    bags = layout_bags([1] * 100, [0] * 60 + [1] * 40)
    for split in make_folds(bags, k=10, seed=1):
        assert len(split.test) == 10 and len(split.val) == 10 and len(split.train) == 80
        assert sum(bags[i].label for i in split.test) == 4


def test_auc_matches_sklearn_for_binary_and_multiclass_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) * 0.5 + labels * 0.3, 1)  # many ties
    probs = np.stack([1 - scores, scores], axis=1)
    assert auc_score(labels, probs) == pytest.approx(roc_auc_score(labels, scores))
    labels3 = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[labels3]
    probs3 = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert auc_score(labels3, probs3) == pytest.approx(
        roc_auc_score(labels3, probs3, multi_class="ovr", average="macro")
    )
    assert np.isnan(auc_score(np.zeros(5, int), np.full((5, 2), 0.5)))


def noisy_predictions(n: int = 120, signal: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = 1 / (1 + np.exp(-(signal * (2 * labels - 1) + rng.normal(size=n))))
    return (
        labels,
        np.stack([1 - scores, scores], axis=1),
        np.array([f"p{i // 2}" for i in range(n)]),
    )


def test_bootstrap_ci_contains_the_point_estimate_and_has_width():
    labels, probs, patients = noisy_predictions()
    ci = bootstrap_auc_ci(labels, probs, patients, n_resamples=1000, seed=0)
    assert ci.estimate == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert ci.low < ci.estimate < ci.high
    assert 0.02 < ci.high - ci.low < 0.4
    assert ci.n_resamples == 1000
    fold_ci = bootstrap_mean_ci([0.8, 0.85, 0.9, 0.7, 0.95], n_resamples=1000)
    assert fold_ci.estimate == pytest.approx(0.84)
    assert fold_ci.low < fold_ci.estimate < fold_ci.high


def test_paired_comparison_finds_a_clearly_better_model_and_not_identical_ones():
    labels, strong, patients = noisy_predictions(signal=2.5, seed=1)
    _, weak, _ = noisy_predictions(signal=0.0, seed=2)
    weak = weak[np.random.default_rng(3).permutation(len(weak))]  # unrelated to labels
    better = paired_bootstrap_test(labels, strong, weak, patients, n_resamples=1000)
    assert better.delta > 0.3 and better.p_value < 0.01 and better.delta_low > 0
    same = paired_bootstrap_test(labels, strong, strong.copy(), patients, n_resamples=1000)
    assert same.delta == 0 and same.p_value == 1.0


def separable_bags(n_patients: int, dim: int = 8, seed: int = 0) -> list[Bag]:
    rng = np.random.default_rng(seed)
    bags = []
    for p in range(n_patients):
        label = p % 2
        for s in range(1 + p % 2):
            features = rng.normal(size=(12, dim)).astype(np.float32)
            features[:6, :2] += 3.0 * label
            grid_rc = np.stack(np.unravel_index(rng.choice(25, 12, replace=False), (5, 5)), 1)
            bags.append(Bag(features, grid_rc, label, f"p{p}-s{s}", f"p{p}"))
    return bags


FAST = TrainConfig(lr=5e-3, epochs=5, patience=5)
TINY_ABMIL = {"dim": 16, "attn_dim": 8}


def test_crossval_writes_json_csv_markdown_and_png(tmp_path):
    bags = separable_bags(20)
    result = crossval(bags, "abmil", TINY_ABMIL, FAST, folds=4, out_dir=tmp_path, n_bootstrap=1000)
    report = json.loads((tmp_path / "crossval.json").read_text())
    assert report["model"] == "abmil" and len(report["folds"]) == 4
    assert report["summary"]["auc_mean"] > 0.9
    low, high = report["summary"]["auc_pooled_ci"]
    assert low <= report["summary"]["auc_pooled"] <= high
    with (tmp_path / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["slide_id"] for r in rows) == sorted(b.slide_id for b in bags)
    folds_of_patient = {}
    for row in rows:
        folds_of_patient.setdefault(row["patient_id"], set()).add(row["fold"])
    assert all(len(folds) == 1 for folds in folds_of_patient.values())
    assert (tmp_path / "folds.csv").read_text().startswith("fold,n_train,n_val,n_test")
    assert "| abmil |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = read_predictions(tmp_path / "predictions.csv")
    assert np.allclose(again.probs, result.predictions.probs, atol=1e-6)
    assert compare_crossval(again, result.predictions, n_resamples=1000).p_value == 1.0


def write_h5_folder(tmp_path, bags: list[Bag], with_grid: bool) -> None:
    folder = tmp_path / "features"
    folder.mkdir()
    for bag in bags:
        with h5py.File(folder / f"{bag.slide_id}.h5", "w") as h5:
            h5["features"] = bag.features
            l0_xy = bag.grid_rc[:, ::-1] * 256.5 + np.array([1000.0, 2000.0])  # (x, y)
            h5["coords"] = l0_xy
            if with_grid:
                h5["grid_rc"] = bag.grid_rc
            else:
                h5.attrs["l0_patch_size"] = 256.5
    with (tmp_path / "labels.csv").open("w") as handle:
        handle.write("patient_id,slide_id,label\n")
        for bag in bags:
            handle.write(f"{bag.patient_id},{bag.slide_id},{['LUAD', 'LUSC'][bag.label]}\n")


def test_cli_crossval_runs_on_a_tiny_h5_directory(tmp_path, capsys):
    write_h5_folder(tmp_path, separable_bags(9), with_grid=False)
    code = lowmag(
        [
            "crossval",
            "--features",
            str(tmp_path / "features"),
            "--labels",
            str(tmp_path / "labels.csv"),
            "--model",
            "abmil",
            "--folds",
            "3",
            "--epochs",
            "2",
            "--lr",
            "0.003",
            "--bootstrap",
            "1000",
            "--mil-config",
            json.dumps(TINY_ABMIL),
            "-o",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "run" / "crossval.json").read_text())
    assert report["classes"] == ["LUAD", "LUSC"]
    assert report["mil_config"]["in_dim"] == 8
    assert "AUC mean (95% CI)" in capsys.readouterr().out


def test_loader_derives_the_grid_from_coords_and_patch_spacing(tmp_path):
    bags = separable_bags(3)
    write_h5_folder(tmp_path, bags, with_grid=False)
    loaded, classes = load_bags(tmp_path / "features", tmp_path / "labels.csv")
    assert classes == ["LUAD", "LUSC"]
    for original, bag in zip(bags, loaded, strict=True):
        shift = original.grid_rc.min(axis=0)
        assert np.array_equal(bag.grid_rc, original.grid_rc - shift)
        assert bag.label == original.label and bag.patient_id == original.patient_id


def test_grid_from_coords_falls_back_to_the_smallest_coordinate_step():
    l0_xy = np.array([[0, 0], [512, 0], [1024, 512], [256, 1536]])
    assert grid_rc_from_coords(l0_xy).tolist() == [[0, 0], [0, 2], [2, 4], [6, 1]]


def test_cli_names_a_missing_feature_file_in_one_line(tmp_path, capsys):
    write_h5_folder(tmp_path, separable_bags(3), with_grid=True)
    (tmp_path / "features" / "p1-s0.h5").unlink()
    code = lowmag(
        ["crossval", "--features", str(tmp_path / "features"), "--labels",
         str(tmp_path / "labels.csv"), "-o", str(tmp_path / "run")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "p1-s0.h5" in err


def test_cli_refuses_a_labels_file_listing_a_slide_twice(tmp_path, capsys):
    write_h5_folder(tmp_path, separable_bags(3), with_grid=True)
    with (tmp_path / "labels.csv").open("a") as handle:
        handle.write("p0,p0-s0,LUAD\n")
    code = lowmag(
        ["crossval", "--features", str(tmp_path / "features"), "--labels",
         str(tmp_path / "labels.csv"), "-o", str(tmp_path / "run")]
    )  # fmt: skip
    assert code == 2
    assert "slide p0-s0 is listed twice" in capsys.readouterr().err


def _crossval_argv(tmp_path, *extra: str) -> list[str]:
    return [
        "crossval", "--features", str(tmp_path / "features"), "--labels",
        str(tmp_path / "labels.csv"), "--model", "abmil", "--epochs", "2", "--lr", "0.003",
        "--bootstrap", "1000", "--mil-config", json.dumps(TINY_ABMIL), "-o",
        str(tmp_path / "run"), *extra,
    ]  # fmt: skip


def _write_test_list(path, slide_ids) -> None:
    path.write_text("slide_id\n" + "".join(f"{s}\n" for s in slide_ids))


def test_cli_crossval_with_a_fixed_test_list_never_trains_on_the_test_slides(tmp_path, capsys):
    bags = separable_bags(12)
    write_h5_folder(tmp_path, bags, with_grid=True)
    test_ids = [b.slide_id for b in bags if b.patient_id in ("p0", "p1", "p2", "p3")]
    _write_test_list(tmp_path / "test.csv", test_ids)
    argv = _crossval_argv(tmp_path, "--test-list", str(tmp_path / "test.csv"), "--repeats", "3")
    assert lowmag([*argv, "--val-fraction", "0.25"]) == 0
    report = json.loads((tmp_path / "run" / "crossval.json").read_text())
    assert len(report["folds"]) == 3
    assert all(row["n_test"] == len(test_ids) for row in report["folds"])
    assert all(
        row["n_train"] + row["n_val"] == len(bags) - len(test_ids) for row in report["folds"]
    )
    assert report["summary"]["protocol"].startswith("fixed test set (6 slides), 3 train/validation")
    with (tmp_path / "run" / "predictions.csv").open() as handle:
        assert sorted(r["slide_id"] for r in csv.DictReader(handle)) == sorted(test_ids)
    assert "fixed test set" in capsys.readouterr().out


def test_fixed_test_splits_vary_validation_and_keep_patients_together():
    from analysis.evaluate import fixed_test_splits

    bags = separable_bags(20)
    test = [i for i, b in enumerate(bags) if b.patient_id in ("p0", "p1")]
    splits = fixed_test_splits(bags, test, repeats=4, val_fraction=0.2, seed=0)
    assert len({tuple(s.val) for s in splits}) > 1  # the splits differ
    for split in splits:
        assert list(split.test) == test
        groups = [
            {bags[i].patient_id for i in part} for part in (split.train, split.val, split.test)
        ]
        assert not (groups[0] & groups[1]) and not (groups[0] & groups[2])
        assert not (groups[1] & groups[2])


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("overlap", "have slides both in the test list and outside it"),
        ("unknown", "names 1 slide(s) not in"),
        ("two_classes", "patient p2 has slides in 2 classes"),
        ("missing", "(and 1 more slides)"),
    ],
)
def test_cli_bad_cohort_input_is_one_line_and_writes_nothing(tmp_path, capsys, problem, expected):
    bags = separable_bags(8)
    write_h5_folder(tmp_path, bags, with_grid=True)
    test_ids = ["p0-s0", "p2-s0"]
    if problem == "overlap":
        test_ids = ["p1-s0"]  # p1 has a second slide, p1-s1, outside the list
    if problem == "unknown":
        test_ids = ["p0-s0", "nobody-s9"]
    if problem == "two_classes":
        text = (tmp_path / "labels.csv").read_text().replace("p3,p3-s1,LUSC", "p2,p3-s1,LUSC")
        (tmp_path / "labels.csv").write_text(text)
    if problem == "missing":
        (tmp_path / "features" / "p1-s0.h5").unlink()
        (tmp_path / "features" / "p3-s1.h5").unlink()
    _write_test_list(tmp_path / "test.csv", test_ids)
    code = lowmag(_crossval_argv(tmp_path, "--test-list", str(tmp_path / "test.csv")))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_bags_load_lazily_and_train_one_at_a_time_like_in_memory_bags(tmp_path):
    from analysis.features import H5Features
    from analysis.train import train_model

    bags = separable_bags(6)
    write_h5_folder(tmp_path, bags, with_grid=True)
    lazy, _ = load_bags(tmp_path / "features", tmp_path / "labels.csv")
    assert all(isinstance(b.features, H5Features) and b.features.reads == 0 for b in lazy)
    assert lazy[0].features.shape == bags[0].features.shape
    train, val = [0, 1, 2, 3, 4, 5, 8], [6, 7]  # validation: p4 (LUAD) and p5 (LUSC)
    cfg = TrainConfig(lr=5e-3, epochs=2, patience=5)
    eager = train_model("abmil", TINY_ABMIL, [bags[i] for i in train], [bags[i] for i in val], cfg)
    streamed = train_model(
        "abmil", TINY_ABMIL, [lazy[i] for i in train], [lazy[i] for i in val], cfg
    )
    assert streamed.history == eager.history
    # every epoch re-reads each training bag from its file (2 epochs) after one read that
    # measures the features' scale, plus validation reads
    assert [lazy[i].features.reads for i in train] == [3] * len(train)
    assert [lazy[i].features.reads for i in val] == [2] * len(val)


def test_crossval_validation_and_test_fold_predictions_under_a_memory_limit_equal_unlimited(
    monkeypatch,
):
    """Bags too big for the device: training steps fit under the instance cap; validation and
    test-fold predictions run each bag again in chunks, with the same result."""
    from analysis.mil import bag
    from tests.fake_accelerator import limit_memory

    rng = np.random.default_rng(0)
    grid_rc = np.stack(np.divmod(np.arange(500), 25), axis=1)  # 500 instances each
    bags = []
    for p in range(6):
        features = rng.normal(size=(500, 8)).astype(np.float32)
        features[:20, 0] += 3.0 * (p % 2)
        bags.append(Bag(features, grid_rc, p % 2, f"p{p}-s0", f"p{p}"))
    cfg = TrainConfig(lr=5e-3, epochs=2, patience=2, max_train_instances=40)
    config = {"dim": 32, "attn_dim": 8}
    expected = crossval(bags, "abmil", config, cfg, folds=3, n_bootstrap=10)

    limit = limit_memory(monkeypatch, 8192)  # a whole bag's embedding: 500 x 32 values
    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", 8192)
    limited = crossval(bags, "abmil", config, cfg, folds=3, n_bootstrap=10)
    assert limit.refused > 0 and max(limit.ran) <= 8192
    for got, want in zip(limited.histories, expected.histories, strict=True):
        for row, expected_row in zip(got, want, strict=True):
            assert row == pytest.approx(expected_row, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(limited.predictions.probs, expected.predictions.probs, atol=1e-5)


def test_cli_crossval_reports_a_training_step_out_of_memory_in_one_line(
    tmp_path, capsys, monkeypatch
):
    from tests.fake_accelerator import limit_memory

    write_h5_folder(tmp_path, separable_bags(9), with_grid=True)
    limit_memory(monkeypatch, 100)  # a 12-instance bag's embedding is 12 x 16 values
    code = lowmag(
        ["crossval", "--features", str(tmp_path / "features"), "--labels",
         str(tmp_path / "labels.csv"), "--model", "abmil", "--folds", "3", "--epochs", "1",
         "--device", "cpu", "--mil-config", json.dumps(TINY_ABMIL), "-o", str(tmp_path / "run")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(
        "lowmag crossval: error: ABMIL on cpu ran out of memory training on slide p"
    )
    assert "a step of 12 of its 12 instances x 8 features" in err and "--max-instances" in err
