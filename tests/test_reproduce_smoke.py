"""A tiny end-to-end run of ``benchmarks/reproduce_synthetic.py`` (cohort -> MAGA -> CV -> speed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "reproduce_synthetic.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    repro = _load_script()
    out = tmp_path_factory.mktemp("reproduce")
    cfg = repro.parse_args(
        [
            *("--out", str(out), "--seed", "5", "--patients", "6", "--slides-per-patient", "1"),
            *("--size", "1500", "--folds", "3", "--epochs", "2", "--patience", "2"),
            *("--models", "gltrans", "--conditions", "20x,5x-maga,5x-export"),
            *("--maga5-pairs", "4", "--maga-patients", "2"),
            *("--maga5-epochs", "1", "--timing-slides", "1", "--jobs", "1", "--bootstrap", "200"),
        ]
    )
    return repro, cfg, repro.run(cfg)


def test_tiny_reproduction_writes_every_output_and_a_row_per_model_and_condition(tiny_run):
    _, cfg, results = tiny_run
    for name in ("results.json", "results.csv", "results.md", "roc_gltrans.png"):
        assert (cfg.out / name).is_file(), name
    assert {(r["model"], r["condition"]) for r in results["rows"]} == {
        ("gltrans", "20x"),
        ("gltrans", "5x-maga"),
        ("gltrans", "5x-export"),
    }
    saved = json.loads((cfg.out / "results.json").read_text())
    assert saved["comparisons"][0]["a"] == "5x-maga" and saved["comparisons"][0]["b"] == "20x"
    assert {(c["a"], c["b"]) for c in saved["comparisons"]} >= {("5x-export", "20x")}
    # MAGA and the fallback teacher saw only the disjoint unlabeled cohort, never these slides
    maga = cfg.out / "maga"
    assert (maga / "maga5x" / "teacher.safetensors").is_file()
    evaluated = {p.name for p in (cfg.out / "cohort").glob("*.svs")}
    assert not evaluated & {p.name for p in (maga / "cohort").glob("*.svs")} or all(
        (maga / "cohort" / name).read_bytes() != (cfg.out / "cohort" / name).read_bytes()
        for name in evaluated & {p.name for p in (maga / "cohort").glob("*.svs")}
    )
    # the headline is pooled with a patient-bootstrap CI; the fallback teacher is named loudly
    row = results["rows"][0]
    assert row["auc_pooled_ci_low"] <= row["auc_pooled"] <= row["auc_pooled_ci_high"]
    markdown = (cfg.out / "results.md").read_text()
    assert markdown.startswith("**FALLBACK TEACHER")
    assert set(results["baselines"]) == {"colour_od_5x_lr"}  # no plain 5x features here
    assert (cfg.out / "exports" / "P001-S1-5x-q80.svs").is_file()


def test_tiny_reproduction_measures_5x_faster_and_smaller_than_20x(tiny_run):
    _, _, results = tiny_run
    timing = results["speed"]["timing"]
    assert timing["20x"]["features_s"] > 2 * timing["5x-maga"]["features_s"]
    assert timing["20x"]["patches_per_slide"] == timing["5x-maga"]["patches_per_slide"]
    assert results["speed"]["sizes"]["ratio_5x-q90"] > 4


def test_rerun_with_other_data_settings_in_the_same_folder_is_refused(tiny_run):
    repro, cfg, _ = tiny_run
    other = repro.parse_args(["--out", str(cfg.out), "--seed", "6"])
    with pytest.raises(SystemExit, match="other settings"):
        repro.check_out_dir(other)
