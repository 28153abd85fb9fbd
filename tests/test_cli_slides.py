"""``lowmag info`` and ``lowmag grid`` through a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def lowmag(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "analysis.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_grid_json_l0_xy_is_identical_at_5x_and_20x(shared_slides):
    slide = str(shared_slides / "cmu-1-small-region.svs")
    at5 = lowmag("grid", slide, "--mag", "5", "--json")
    at20 = lowmag("grid", slide, "--mag", "20", "--json")
    assert at5.returncode == 0, at5.stderr
    assert at20.returncode == 0, at20.stderr
    grid5, grid20 = json.loads(at5.stdout), json.loads(at20.stdout)
    assert grid5["l0_xy"] == grid20["l0_xy"] and len(grid5["l0_xy"]) > 10
    assert grid5["grid_rc"] == grid20["grid_rc"]
    assert (grid5["patch_size_px"], grid20["patch_size_px"]) == (64, 256)
    assert grid5["l0_patch_size"] == pytest.approx(128 / 0.499)
    assert (grid5["n_rows"], grid5["n_cols"]) == (11, 8)
    assert grid5["mag"] == 5


def test_grid_text_reports_count_and_sizes(shared_slides):
    result = lowmag("grid", str(shared_slides / "cmu-1-small-region.svs"), "--mag", "10")
    assert result.returncode == 0, result.stderr
    assert "128 px at 10x" in result.stdout
    assert "256.51 px" in result.stdout
    assert "11 rows x 8 cols" in result.stdout


def test_grid_min_tissue_changes_the_patch_count(shared_slides):
    slide = str(shared_slides / "cmu-1-small-region.svs")
    loose = json.loads(lowmag("grid", slide, "--mag", "5", "--min-tissue", "0.1", "--json").stdout)
    strict = json.loads(
        lowmag("grid", slide, "--mag", "5", "--min-tissue", "0.95", "--json").stdout
    )
    assert len(strict["l0_xy"]) < len(loose["l0_xy"])


def test_grid_refuses_a_magnification_the_slide_cannot_give(shared_slides):
    result = lowmag("grid", str(shared_slides / "dicom-jpeg"), "--mag", "5")
    assert result.returncode != 0
    assert "upsampling would invent pixels" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_grid_on_a_tiny_slide_says_no_tissue_patches(shared_slides):
    result = lowmag("grid", str(shared_slides / "small.svs"), "--mag", "5")
    assert result.returncode != 0
    assert "no tissue patches" in result.stderr and "small.svs" in result.stderr


def test_info_json_describes_cmu(shared_slides):
    result = lowmag("info", str(shared_slides / "cmu-1-small-region.svs"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["vendor"] == "aperio"
    assert info["mpp"] == pytest.approx(0.499)
    assert info["mpp_source"] == "metadata"
    assert info["objective_power"] == 20
    assert info["levels"][0]["dimensions"] == [2220, 2967]
    assert set(info["associated_images"]) == {"label", "macro", "thumbnail"}
    assert info["readable_magnifications"] == {"40": None, "20": 0, "10": 0, "5": 0, "2.5": 0}


def test_info_text_lists_levels_of_ndpi(shared_slides):
    result = lowmag("info", str(shared_slides / "fluorescence-dapi.ndpi"))
    assert result.returncode == 0, result.stderr
    assert "hamamatsu" in result.stdout
    assert "5x: level 3" in result.stdout
    assert "downsample 64.000" in result.stdout


def test_info_with_mpp_flag_overrides_scale(shared_slides):
    result = lowmag(
        "info", str(shared_slides / "cmu-1-small-region.svs"), "--mpp", "0.25", "--json"
    )
    info = json.loads(result.stdout)
    assert info["mpp"] == 0.25 and info["mpp_source"] == "caller"
    assert info["readable_magnifications"]["40"] == 0


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("unreadable.svs", "corrupt"),
        ("unopenable.tiff", "unsupported"),
        ("broken.svs", "corrupt"),
        ("kather-patch-1.tif", "not a whole-slide image"),
        ("missing.svs", "no such slide"),
    ],
)
def test_info_on_a_bad_file_prints_one_line_and_fails(shared_slides, name, words):
    result = lowmag("info", str(shared_slides / name))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0] and words in lines[0]
    assert result.stdout == ""
