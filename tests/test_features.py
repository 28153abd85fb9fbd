from __future__ import annotations

import h5py
import numpy as np
import pytest

from analysis.cli import main as lowmag
from analysis.encoders import build_encoder
from analysis.errors import AnalysisError, MagnificationUnavailableError
from analysis.features import (
    Features,
    extract_features,
    grid_rc_from_coords,
    load_h5,
    save_h5,
)
from analysis.slides import open_slide
from analysis.tissue import patch_grid
from tests.conftest import shared_slide

CMU = "cmu-1-small-region.svs"


def _cells(l0_patch: float = 256.5) -> tuple[np.ndarray, np.ndarray]:
    """A sparse grid over 40 columns with a fractional cell size: (coords, grid_rc)."""
    rng = np.random.default_rng(0)
    rc = np.array([(r, c) for r in range(3, 12) for c in range(2, 42)], np.int64)
    rc = rc[rng.random(len(rc)) < 0.6]
    origin = np.array([130, 77])
    coords = np.rint(origin + rc[:, ::-1] * l0_patch).astype(np.int64)  # (x, y)
    return coords, rc


def test_h5_round_trip_keeps_features_coords_grid_and_attrs(tmp_path):
    coords, rc = _cells()
    feats = Features(
        features=np.random.default_rng(1).normal(size=(len(rc), 1024)).astype(np.float32),
        coords=coords,
        grid_rc=rc,
        mag=5.0,
        mpp=2.0,
        patch_size=64,
        l0_patch_size=256.5,
        encoder="resnet50_trunc",
    )
    path = save_h5(tmp_path / "slide.h5", feats)
    back = load_h5(path)
    np.testing.assert_array_equal(back.features, feats.features)
    np.testing.assert_array_equal(back.coords, coords)
    np.testing.assert_array_equal(back.grid_rc, rc)
    assert (back.mag, back.mpp, back.patch_size, back.l0_patch_size, back.encoder) == (
        5.0,
        2.0,
        64,
        256.5,
        "resnet50_trunc",
    )
    with h5py.File(path) as f:  # what CLAM's loaders look for
        assert f["features"].shape == (len(rc), 1024)
        assert f["coords"].dtype == np.int64


def test_clam_file_with_only_features_and_coords_loads_with_derived_grid(tmp_path):
    coords, rc = _cells(256.5)
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((len(coords), 1024), np.float32))
        f.create_dataset("coords", data=coords)
    loaded = load_h5(path)
    assert loaded.features.shape == (len(coords), 1024)
    assert loaded.mag is None and loaded.encoder == ""
    np.testing.assert_array_equal(loaded.grid_rc, rc - rc.min(axis=0))


def _write_clam_h5(path, coords, level: int, downsample: float | None) -> None:
    """A feature file the way CLAM writes it: coords attributes copied from its patch file."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((len(coords), 16), np.float32))
        dset = f.create_dataset("coords", data=coords.astype(np.int64))
        dset.attrs["patch_size"] = 256  # pixels at patch_level, not level 0
        dset.attrs["patch_level"] = level
        if downsample is not None:
            dset.attrs["downsample"] = np.array([downsample, downsample])
            dset.attrs["downsampled_level_dim"] = np.array([10000, 8000]) // int(downsample)
        dset.attrs["level_dim"] = np.array([10000, 8000])
        dset.attrs["name"] = "slide"
        dset.attrs["save_path"] = "/data/patches"


def test_clam_coords_patched_above_level_0_use_the_downsample_for_the_grid(tmp_path):
    rows, cols = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    rc = np.stack([rows.ravel(), cols.ravel()], axis=1)
    coords = rc[:, ::-1] * 1024 + np.array([500, 700])  # level-1 patches of 256 px, downsample 4
    path = tmp_path / "clam.h5"
    _write_clam_h5(path, coords, level=1, downsample=4.0)
    loaded = load_h5(path)
    assert loaded.l0_patch_size == 1024.0
    np.testing.assert_array_equal(loaded.grid_rc, rc)  # neighbours stay neighbours


def test_clam_coords_above_level_0_without_downsample_are_refused(tmp_path):
    coords = np.array([[0, 0], [1024, 0]])
    _write_clam_h5(tmp_path / "clam.h5", coords, level=2, downsample=None)
    with pytest.raises(AnalysisError, match="no 'downsample' attribute"):
        load_h5(tmp_path / "clam.h5")


def test_grid_from_coords_uses_patch_size_attribute_when_present():
    coords = np.array([[0, 0], [512, 0], [512, 1024]])
    np.testing.assert_array_equal(grid_rc_from_coords(coords, 256.0), [[0, 0], [0, 2], [4, 2]])
    np.testing.assert_array_equal(grid_rc_from_coords(coords[:1]), [[0, 0]])


def test_non_feature_h5_is_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros(3))
    with pytest.raises(AnalysisError, match="no 'features' and 'coords'"):
        load_h5(path)


@pytest.fixture(scope="module")
def cmu_grid():
    path = shared_slide(CMU)
    with open_slide(path) as slide:
        return path, patch_grid(slide)


def test_extract_features_on_cmu_at_5x_gives_grid_ordered_embeddings(cmu_grid):
    path, grid = cmu_grid
    encoder = build_encoder(device="cpu", batch_size=16)
    feats = extract_features(path, grid, encoder, mag=5, batch_size=16, workers=2)
    n = len(grid.l0_xy)
    assert feats.features.shape == (n, 1024)
    assert feats.features.dtype == np.float32
    np.testing.assert_array_equal(feats.coords, grid.l0_xy)
    np.testing.assert_array_equal(feats.grid_rc, grid.grid_rc)
    assert (feats.patch_size, feats.mpp) == (64, 2.0)
    with open_slide(path) as slide:  # row i is the embedding of cell i, read on its own
        picks = [0, n // 2, n - 1]
        direct = encoder.embed(slide.read_patches(grid.l0_xy[picks], 5))
    np.testing.assert_allclose(feats.features[picks], direct, rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats.features[0], feats.features[-1])


def test_extract_features_surfaces_reader_errors(cmu_grid):
    path, grid = cmu_grid
    with pytest.raises(MagnificationUnavailableError):
        extract_features(path, grid, build_encoder(device="cpu"), mag=40)


def test_extract_command_writes_a_loadable_h5(cmu_grid, tmp_path, capsys):
    path, grid = cmu_grid
    out = tmp_path / "cmu.h5"
    assert lowmag(["extract", str(path), "--mag", "5", "--precision", "fp32", "-o", str(out)]) == 0
    loaded = load_h5(out)
    assert loaded.features.shape == (len(grid.l0_xy), 1024)
    assert loaded.mag == 5.0 and loaded.encoder == "resnet50_trunc"
    assert "not pretrained" in capsys.readouterr().err
