"""Cohort feature extraction: one idempotent, resumable task per slide on the gpu queue."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from django.core.management import call_command

from analysis.cohort import ExtractSettings, extract_slide, is_done
from analysis.features import load_h5
from tests.conftest import shared_slide

CMU = "cmu-1-small-region.svs"
FAST = ExtractSettings(mag=5, encoder="vit_tiny", precision="fp32", device="cpu", batch_size=32)


@pytest.fixture
def slide_folder(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "A-1.svs").symlink_to(shared_slide(CMU))
    return folder


def test_extract_slide_writes_once_and_skips_a_finished_slide(slide_folder, tmp_path):
    out = tmp_path / "features"
    first = extract_slide(slide_folder / "A-1.svs", out, FAST)
    assert first["status"] == "extracted" and first["patches"] > 10
    target = out / "A-1.h5"
    stamp = target.stat().st_mtime_ns
    again = extract_slide(slide_folder / "A-1.svs", out, FAST)
    assert again["status"] == "exists" and target.stat().st_mtime_ns == stamp
    loaded = load_h5(target)
    assert loaded.features.shape == (first["patches"], 192) and loaded.mag == 5.0
    assert sorted(p.name for p in out.iterdir()) == ["A-1.h5"]  # no temp files left


def test_other_settings_or_a_truncated_file_extract_again(slide_folder, tmp_path):
    out = tmp_path / "features"
    extract_slide(slide_folder / "A-1.svs", out, FAST)
    other = ExtractSettings(**{**FAST.__dict__, "mag": 10})
    assert not is_done(slide_folder / "A-1.svs", out, other)
    (out / "A-1.h5").write_bytes(b"\x89HDF\r\n")  # a crash mid-write of an older tool
    assert not is_done(slide_folder / "A-1.svs", out, FAST)
    assert extract_slide(slide_folder / "A-1.svs", out, FAST)["status"] == "extracted"
    with h5py.File(out / "A-1.h5") as f:
        assert np.asarray(f["features"]).shape[1] == 192


def test_extraction_task_is_routed_to_the_gpu_queue():
    from portal.analyses.extraction import extract_slide_features
    from portal.celery import app

    route = app.amqp.router.route({}, extract_slide_features.name)
    assert route["queue"].name == "gpu"


@pytest.mark.django_db
def test_extract_cohort_command_runs_in_process_and_resumes(
    slide_folder, tmp_path, capsys, django_capture_on_commit_callbacks
):
    (slide_folder / "B-1.svs").symlink_to(shared_slide(CMU))
    out = tmp_path / "features"
    argv = ["--slides", str(slide_folder), "-o", str(out), "--encoder", "vit_tiny"]
    argv += ["--precision", "fp32", "--device", "cpu"]
    with django_capture_on_commit_callbacks(execute=True):
        call_command("extract_cohort", *argv)
    assert "2 slide(s) queued (sync mode), 0 already extracted" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["A-1.h5", "B-1.h5"]
    os.unlink(out / "B-1.h5")  # as if the run had stopped after the first slide
    with django_capture_on_commit_callbacks(execute=True):
        call_command("extract_cohort", *argv)
    assert "1 slide(s) queued (sync mode), 1 already extracted" in capsys.readouterr().out
    assert (out / "B-1.h5").is_file()


def test_lowmag_extract_cohort_runs_without_django_and_skips_done_slides(
    slide_folder, tmp_path, capsys
):
    from analysis.cli import main as lowmag

    argv = ["extract-cohort", "--slides", str(slide_folder), "-o", str(tmp_path / "f")]
    argv += ["--encoder", "vit_tiny", "--precision", "fp32", "--device", "cpu"]
    assert lowmag(argv) == 0
    assert "1 slide(s) extracted, 0 already there" in capsys.readouterr().out
    assert lowmag(argv) == 0
    assert "0 slide(s) extracted, 1 already there" in capsys.readouterr().out
