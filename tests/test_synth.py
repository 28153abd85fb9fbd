"""Synthetic H&E-like slides: format, determinism, ground truth, and the class signal's scale."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import ndimage

from analysis.cli import main as cli_main
from analysis.slides import open_slide
from analysis.synth import (
    MASK_L0_PER_PX,
    SlideModel,
    SynthDesign,
    lesion_mask_from_png,
    write_cohort,
    write_synthetic_slide,
)
from analysis.synthcheck import colour_od_stats, cord_alignment, cord_fineness
from analysis.tiffio import area_downsample

SIZE = 3000


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    return {
        label: write_synthetic_slide(
            folder / f"label{label}.svs", width=SIZE, height=SIZE, seed=11 + label, label=label
        )
        for label in (0, 1)
    }


def test_synthetic_slide_opens_as_aperio_20x_with_its_dimensions(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.svs", width=2500, height=1800, seed=3)
    with open_slide(slide.path) as opened:
        assert opened.vendor == "aperio"
        assert opened.dimensions == (2500, 1800)
        assert opened.mpp == pytest.approx(0.5)
        assert opened.mpp_source == "metadata"
        assert opened.objective_power == 20
        assert opened.magnification == pytest.approx(20)
        assert opened.level_dimensions == ((2500, 1800), (625, 450))
        assert {"label", "macro"} <= set(opened.associated_image_names)


def test_same_seed_writes_the_same_file_and_another_seed_does_not(tmp_path):
    paths = [tmp_path / f"{name}.svs" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (5, 5, 6), strict=True):
        write_synthetic_slide(path, width=1500, height=1100, seed=seed, label=1)
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c


def test_regions_render_the_same_whatever_the_strip_they_belong_to():
    model = SlideModel(
        2000,
        2000,
        seed=2,
        label=1,
        mpp=0.5,
        lesion_fraction=0.5,
        morphology_strength=1.0,
        design=SynthDesign(tissue_fraction=0.9),
    )
    whole = model.render(700, 300, 600, 900)
    top = model.render(700, 300, 250, 900)
    bottom_right = model.render(950, 777, 350, 423)
    assert np.array_equal(whole[:250], top)
    assert np.array_equal(whole[250:, 477:], bottom_right)


def test_label1_slide_has_lesions_inside_tissue_and_label0_none(slides):
    positive, negative = slides[1], slides[0]
    assert positive.lesion_mask.shape == (SIZE // MASK_L0_PER_PX + 1, SIZE // MASK_L0_PER_PX + 1)
    assert positive.lesion_mask.any()
    assert not (positive.lesion_mask & ~positive.tissue_mask).any()
    assert positive.lesion_area_fraction == pytest.approx(0.3, abs=0.03)
    assert not negative.lesion_mask.any()
    assert np.array_equal(lesion_mask_from_png(positive.path), positive.lesion_mask)
    assert positive.mask_path.name == "label1.svs.mask.png"


def _patches(slide, mask: np.ndarray, level: int, n: int = 30) -> np.ndarray:
    """(n, S, S, 3) patches of 128 µm centred well inside ``mask`` (S = 256 / 4**level)."""
    core = ndimage.binary_erosion(mask, iterations=9)
    rows, cols = np.nonzero(core)
    pick = np.random.default_rng(0).choice(len(rows), n, replace=False)
    side = 256 // 4**level
    out = []
    with open_slide(slide.path) as opened:
        for i in pick:
            l0_xy = (int(cols[i]) * MASK_L0_PER_PX - 128, int(rows[i]) * MASK_L0_PER_PX - 128)
            out.append(opened.read_region_rgb(l0_xy, level, (side, side)))
    return np.stack(out).astype(np.float32)


def _cohort_regions(n_seeds: int, size: int, strength: float = 1.0):
    """(seed, label, 20x region) for each seed rendered as normal and as all-lesion tissue."""
    design = SynthDesign(tissue_fraction=0.97)
    for seed in range(n_seeds):
        for label in (0, 1):
            model = SlideModel(
                size + 256,
                size + 256,
                seed=100 + seed,
                label=label,
                mpp=0.5,
                lesion_fraction=1.0,
                morphology_strength=strength,
                design=design,
            )
            yield seed, label, model.render(128, 128, size, size)


def _downsample(region: np.ndarray, factor: int) -> np.ndarray:
    return area_downsample(region, factor) if factor > 1 else region


@pytest.fixture(scope="module")
def cohort():
    """A small cohort: 10 tissue regions per class, 320 µm square each."""
    rows = list(_cohort_regions(10, 640))
    labels = np.array([label for _, label, _ in rows])
    groups = np.array([seed for seed, _, _ in rows])
    return rows, labels, groups


def _loo_auc(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Logistic regression on standardised features, scored out of fold (one seed held out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = np.zeros(len(labels))
    for held in np.unique(groups):
        test = groups == held
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        model.fit(features[~test], labels[~test])
        scores[test] = model.predict_proba(features[test])[:, 1]
    return float(roc_auc_score(labels, scores))


def test_plain_5x_colour_and_od_statistics_do_not_separate_the_classes(cohort):
    rows, labels, groups = cohort
    stats_5x = np.stack([colour_od_stats(_downsample(r, 4)) for _, _, r in rows])
    assert _loo_auc(stats_5x, labels, groups) <= 0.7
    # the per-slide number that used to give AUC 1.000 (a -0.115 shift): mean red OD of nuclear
    # pixels at 5x; paired by seed (same nuclei, only the lesion morphology differs) it must
    # not move (without the fine-cord density trim it moved by +0.002, 4 standard errors)
    red = stats_5x[:, 0].reshape(-1, 2)  # (seed, label)
    shift = red[:, 1] - red[:, 0]
    assert abs(shift.mean()) < max(3 * shift.std() / np.sqrt(len(shift)), 1e-3)
    assert abs(shift.mean()) < 0.2 * red[:, 0].std()


def test_20x_features_separate_the_classes_and_10x_keeps_less_of_it(cohort):
    rows, labels, groups = cohort
    by_scale = {
        factor: np.array([cord_fineness(_downsample(r, factor), 0.5 * factor) for _, _, r in rows])
        for factor in (1, 2, 4)
    }
    assert _loo_auc(by_scale[1][:, None], labels, groups) >= 0.95
    gap = {f: v[labels == 1].mean() - v[labels == 0].mean() for f, v in by_scale.items()}
    assert gap[1] > 0.5  # lesion cords are finer
    assert abs(gap[2]) < 0.5 * gap[1]  # degraded at 10x
    assert abs(gap[4]) < 0.01 * gap[1]  # gone at 5x


def test_morphology_strength_tunes_the_20x_signal():
    gaps = []
    for strength in (0.0, 0.5, 1.0):
        values = {0: [], 1: []}
        for _, label, region in _cohort_regions(2, 512, strength):
            values[label].append(cord_fineness(region, 0.5))
        gaps.append(np.mean(values[1]) - np.mean(values[0]))
    assert gaps[0] == pytest.approx(0.0, abs=1e-9)
    assert 0.1 < gaps[1] < gaps[2]


def test_the_alignment_cue_keeps_period_and_turns_lesion_cords_to_the_nucleus_axis():
    design = SynthDesign(tissue_fraction=0.97, cue="alignment")
    values = {0: [], 1: []}
    for seed in range(2):
        for label in (0, 1):
            model = SlideModel(
                768, 768, seed=100 + seed, label=label, mpp=0.5, lesion_fraction=1.0,
                morphology_strength=1.0, design=design,
            )  # fmt: skip
            region = model.render(128, 128, 512, 512)
            values[label].append((cord_alignment(region, 0.5), cord_fineness(region, 0.5)))
    normal, lesion = np.mean(values[0], axis=0), np.mean(values[1], axis=0)
    assert lesion[0] - normal[0] > 0.1  # aligned
    assert abs(lesion[1] - normal[1]) < 0.1  # same period
    with pytest.raises(ValueError, match="unknown cue"):
        SlideModel(
            256, 256, seed=1, label=1, mpp=0.5, lesion_fraction=1.0, morphology_strength=1.0,
            design=SynthDesign(tissue_fraction=0.97, cue="colour"),
        ).render(0, 0, 256, 256)  # fmt: skip


def test_classes_match_in_colour_at_5x(slides):
    lesion = _patches(slides[1], slides[1].lesion_mask, 1).mean(axis=(0, 1, 2))  # (3,)
    normal = _patches(slides[0], slides[0].tissue_mask, 1).mean(axis=(0, 1, 2))
    assert np.abs(lesion - normal).max() < 8


def test_zero_morphology_strength_makes_lesions_invisible():
    kwargs = dict(mpp=0.5, lesion_fraction=0.6, design=SynthDesign(tissue_fraction=0.9))
    lesion = SlideModel(1500, 1500, seed=4, label=1, morphology_strength=0.0, **kwargs)
    normal = SlideModel(1500, 1500, seed=4, label=0, morphology_strength=1.0, **kwargs)
    assert lesion.lesion_mask.any()
    assert np.array_equal(lesion.render(0, 0, 1500, 1500), normal.render(0, 0, 1500, 1500))


def test_cohort_writes_labels_csv_and_patients_slides_share_labels(tmp_path):
    labels_path = write_cohort(
        tmp_path, n_patients=4, slides_per_patient=2, width=1024, height=1024, seed=9
    )
    with open(labels_path, newline="") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["patient_id", "slide_id", "label"]
        rows = list(reader)
    assert len(rows) == 8
    by_patient: dict[str, set[str]] = {}
    for patient_id, slide_id, label in rows:
        by_patient.setdefault(patient_id, set()).add(label)
        assert (tmp_path / f"{slide_id}.svs").is_file()
        assert slide_id.startswith(patient_id)
    assert all(len(labels) == 1 for labels in by_patient.values())
    assert sorted(labels.pop() for labels in by_patient.values()) == ["0", "0", "1", "1"]


def test_cli_synth_slide_prints_json(tmp_path, capsys):
    out = tmp_path / "cli.svs"
    code = cli_main(
        ["synth", "slide", str(out), "--width", "1200", "--height", "900", "--seed", "2",
         "--label", "1", "--json"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(out) and summary["label"] == 1
    assert summary["width"] == 1200 and summary["mpp"] == 0.5
    assert out.is_file() and (tmp_path / "cli.svs.mask.png").is_file()
