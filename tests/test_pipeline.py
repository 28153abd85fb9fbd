import json
import subprocess
import sys

import numpy as np
import pytest

from analysis.bundle import load_bundle, load_manifest, verify_bundle
from analysis.errors import BundleError, MagnificationUnavailableError, NoTissueError
from analysis.pipeline import predict_slide
from tests.bundles import make_tiny_bundle
from tests.conftest import shared_slide


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def loaded(tiny_bundle):
    return load_bundle(tiny_bundle)


def test_bundle_manifest_records_weight_checksums(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    assert manifest.mil["weights"] == "mil.safetensors"
    assert len(manifest.mil["sha256"]) == 64
    assert manifest.is_demo and "not for diagnosis" in manifest.label


def test_tampered_weights_are_refused(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    weights = copy / "mil.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        verify_bundle(copy)


def test_manifest_without_required_fields_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(BundleError, match="lacks"):
        load_manifest(tmp_path)


def test_zip_bundle_loads_like_a_directory(tiny_bundle, tmp_path):
    import zipfile

    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for item in tiny_bundle.iterdir():
            zf.write(item, item.name)
    assert load_manifest(archive).name == "tiny-test-model"


def test_zip_bundle_with_escaping_entries_is_refused(tmp_path):
    import zipfile

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../manifest.json", "{}")
    with pytest.raises(BundleError):
        load_manifest(archive)


def test_predict_on_cmu_gives_probabilities_scores_per_cell_and_timings(loaded):
    result = predict_slide(loaded, shared_slide("cmu-1-small-region.svs"))
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert len(result.instance_scores) == len(result.grid.l0_xy) > 10
    assert np.all((result.instance_scores >= 0) & (result.instance_scores <= 1))
    assert {"open", "tissue", "features", "mil", "total"} <= set(result.timings)
    assert result.predicted_class in ("normal", "lesion")
    # class evidence: signed, one per cell, for the call or (on a normal call) for lesion
    assert len(result.evidence_scores) == len(result.instance_scores)
    assert np.isfinite(result.evidence_scores).all()
    assert result.evidence_class == "lesion"


def test_predict_is_deterministic(loaded):
    slide = shared_slide("cmu-1-small-region.svs")
    first = predict_slide(loaded, slide)
    second = predict_slide(loaded, slide)
    assert first.probabilities == second.probabilities
    assert np.array_equal(first.instance_scores, second.instance_scores)


def test_progress_reports_every_stage(loaded):
    seen = []
    predict_slide(
        loaded, shared_slide("cmu-1-small-region.svs"), progress=lambda s, f: seen.append((s, f))
    )
    stages = list(dict.fromkeys(s for s, f in seen if f == 1.0))
    assert stages == ["open", "tissue", "features", "mil", "clusters"]


def test_predict_on_a_slide_without_tissue_says_so(loaded):
    with pytest.raises(NoTissueError):
        predict_slide(loaded, shared_slide("small.svs"))


def test_predict_refuses_a_slide_coarser_than_the_model(loaded):
    with pytest.raises(MagnificationUnavailableError):
        predict_slide(loaded, shared_slide("dicom-jpeg"))


def _lowmag(*args):
    return subprocess.run(
        [sys.executable, "-m", "analysis.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_predict_json_on_cmu(tiny_bundle):
    out = _lowmag(
        "predict", str(tiny_bundle), str(shared_slide("cmu-1-small-region.svs")), "--json"
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert len(body["instance_scores"]) == body["n_patches"] == len(body["grid"]["grid_rc"])
    assert body["timings"]["total"] > 0


def test_cli_predict_on_small_svs_says_no_tissue_and_fails(tiny_bundle):
    out = _lowmag("predict", str(tiny_bundle), str(shared_slide("small.svs")))
    assert out.returncode != 0
    assert "tissue" in out.stderr.lower()
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_patch_clusters_are_one_per_cell_deterministic_and_numbered_by_size(loaded):
    slide = shared_slide("cmu-1-small-region.svs")
    first = predict_slide(loaded, slide)
    second = predict_slide(loaded, slide)
    assert first.clusters.shape == first.instance_scores.shape
    assert np.array_equal(first.clusters, second.clusters)
    sizes = np.bincount(first.clusters)
    assert len(sizes) > 1 and np.all(np.diff(sizes) <= 0)  # cluster 0 is the largest


def test_clusters_separate_two_kinds_of_embedding():
    from analysis.pipeline import cluster_instances

    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (30, 64)), rng.normal(8, 1, (10, 64))])
    clusters = cluster_instances(features.astype(np.float32), k=2)
    assert set(clusters[:30]) == {0} and set(clusters[30:]) == {1}


def test_predict_opens_the_slide_file_once(loaded, monkeypatch):
    import openslide

    opened = []

    class Counting(openslide.OpenSlide):
        def __init__(self, filename):
            opened.append(filename)
            super().__init__(filename)

    monkeypatch.setattr(openslide, "OpenSlide", Counting)
    predict_slide(loaded, shared_slide("cmu-1-small-region.svs"))
    assert len(opened) == 1


def test_cluster_map_can_wait_until_after_the_result(loaded):
    slide = shared_slide("cmu-1-small-region.svs")
    quick = predict_slide(loaded, slide, clusters=False)
    assert "clusters" not in quick.timings and len(quick.clusters) == 0
    assert quick.features is not None and len(quick.features) == quick.n_patches
    full = predict_slide(loaded, slide)
    assert quick.probabilities == full.probabilities
    assert np.array_equal(quick.compute_clusters(), full.clusters)
    assert quick.features is None and quick.timings["clusters"] >= 0


def test_clusters_on_an_accelerator_path_separate_the_same_kinds():
    from analysis.pipeline import _kmeans_torch, cluster_instances

    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (60, 64)), rng.normal(8, 1, (20, 64))])
    labels = _kmeans_torch(features.astype(np.float32), 2, 0, 32, "cpu")  # the torch path
    assert len(set(labels[:60])) == 1 and len(set(labels[60:])) == 1
    assert labels[0] != labels[-1]
    again = _kmeans_torch(features.astype(np.float32), 2, 0, 32, "cpu")
    assert np.array_equal(labels, again)  # seeded: deterministic
    assert set(cluster_instances(features, k=2, device="meta")[:60]) == {0}  # no data: sklearn


def test_predict_slides_encodes_across_slides_and_matches_one_slide_at_a_time(loaded, tmp_path):
    from analysis.errors import AnalysisError
    from analysis.pipeline import predict_slides

    slide = shared_slide("cmu-1-small-region.svs")
    alone = [
        predict_slide(loaded, slide, batch_size=48),
        predict_slide(loaded, slide, min_tissue=0.6, batch_size=48),
    ]
    calls: list[int] = []
    embed = loaded.encoder.embed

    def counting(patches):
        calls.append(len(patches))
        return embed(patches)

    loaded.encoder.embed = counting
    heard: list[tuple[str, float]] = []
    try:
        batched = predict_slides(
            loaded, [slide, slide], batch_size=48, progress=lambda *report: heard.append(report)
        )
        mixed = predict_slides(loaded, [slide], min_tissue=0.6, batch_size=48)
    finally:
        del loaded.encoder.embed
    n = alone[0].n_patches
    assert n % 48 and calls[: n // 48 + 1] == [48] * (n // 48 + 1)  # a batch spans both slides
    for one, many in zip([alone[0], alone[0], alone[1]], batched + mixed, strict=True):
        assert many.slide == one.slide and many.predicted_class == one.predicted_class
        assert list(many.probabilities) == list(one.probabilities)
        np.testing.assert_allclose(
            list(many.probabilities.values()), list(one.probabilities.values()), atol=1e-5
        )
        np.testing.assert_allclose(many.instance_scores, one.instance_scores, atol=1e-4)
        np.testing.assert_array_equal(many.grid.l0_xy, one.grid.l0_xy)
        assert set(many.timings) == set(one.timings)
    assert [stage for stage, done in heard if done == 1.0] == [
        *["open", "tissue"] * 2,
        "features",
        *["mil", "clusters"] * 2,
    ]
    encoded = [done for stage, done in heard if stage == "features"]
    assert encoded == sorted(encoded) and encoded[0] == 0.0 and encoded[-1] == 1.0
    with pytest.raises(AnalysisError):
        predict_slides(loaded, [slide, tmp_path / "missing.svs"])
