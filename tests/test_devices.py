"""Device handling without a GPU: models whose weights are not on the CPU (tests/fake_accelerator)."""

import numpy as np
import pytest
import torch

from analysis.bundle import LoadedBundle, load_bundle
from analysis.devices import ENV_VAR, accelerator_memory, module_device, resolve_device
from analysis.encoders import Encoder
from analysis.errors import AnalysisError
from analysis.pipeline import predict_slide, run_mil
from tests.bundles import make_tiny_bundle
from tests.conftest import shared_slide
from tests.fake_accelerator import (
    FAKE_DEVICE,
    AcceleratorTensor,
    FakeAcceleratorEncoderNet,
    FakeAcceleratorMIL,
    MemoryLimitedNet,
    limit_attention_memory,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny"))


def _fake_bundle(manifest_from: LoadedBundle) -> LoadedBundle:
    net = FakeAcceleratorEncoderNet(embed_dim=16)
    encoder = Encoder(
        name="fake", model=net, dim=16, weights_source="test", precision="fp32", device="meta"
    )
    return LoadedBundle(
        manifest=manifest_from.manifest,
        path=manifest_from.path,
        sha256="0" * 64,
        encoder=encoder,
        mil=FakeAcceleratorMIL(n_classes=len(manifest_from.manifest.classes)),
    )


def test_run_mil_moves_the_bag_to_the_models_device_and_copies_results_back_once():
    mil = FakeAcceleratorMIL(n_classes=3)
    rng = np.random.default_rng(0)
    AcceleratorTensor.copies_back = 0
    probabilities, scores = run_mil(
        mil, rng.normal(size=(40, 8)).astype(np.float32), np.indices((5, 8)).reshape(2, -1).T
    )
    assert mil.input_devices and mil.misplaced_inputs == []  # both tensors on the model's device
    assert AcceleratorTensor.copies_back == 1
    assert isinstance(probabilities, np.ndarray) and probabilities.shape == (3,)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-6)
    assert scores.shape == (40,) and scores[0] == 0.0 and scores[-1] == pytest.approx(1.0)


def test_predict_slide_runs_end_to_end_with_models_off_the_cpu(tiny):
    bundle = _fake_bundle(tiny)
    result = predict_slide(bundle, shared_slide("cmu-1-small-region.svs"))
    assert bundle.encoder.model.input_devices
    assert bundle.encoder.model.misplaced_inputs == []
    assert bundle.mil.misplaced_inputs == []
    assert result.n_patches == len(result.grid.l0_xy) > 10
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.clusters.shape == result.instance_scores.shape


def test_an_out_of_memory_bag_fails_with_its_size_named():
    class Exhausted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, features, coords):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    with pytest.raises(AnalysisError, match=r"bag of 1234 patches x 8 features.*memory"):
        run_mil(Exhausted(), np.zeros((1234, 8), np.float32), np.zeros((1234, 2), np.int64))


def test_an_out_of_memory_bag_is_retried_with_chunked_attention_and_gives_the_same_result(
    monkeypatch,
):
    from analysis.mil import bag, build_mil

    torch.manual_seed(0)
    config = {"in_dim": 16, "dim": 32, "n_heads": 4, "depth": 2, "n_classes": 3}
    mil = build_mil("gltrans", config).eval()
    rng = np.random.default_rng(0)
    n = 500  # 1 + n tokens: one (4, 501, 501) score matrix is ~1M values
    features = rng.normal(size=(n, 16)).astype(np.float32)
    grid_rc = np.stack(np.divmod(np.arange(n), 25), axis=1)
    expected = run_mil(mil, features, grid_rc)  # unlimited memory

    ran = limit_attention_memory(monkeypatch, max_scores=4 * 501 * 100)
    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", 4 * 501 * 64)
    probabilities, scores = run_mil(mil, features, grid_rc)
    assert ran and max(ran) <= 4 * 501 * 64  # it ran, in chunks of 64 queries
    np.testing.assert_allclose(probabilities, expected[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores, expected[1], rtol=0, atol=1e-6)

    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", 4 * 501 * 200)  # chunks too big too
    with pytest.raises(AnalysisError, match=r"bag of 500 patches x 16 features.*chunked"):
        run_mil(mil, features, grid_rc)


def test_the_class_evidence_path_gets_the_same_chunked_retry(monkeypatch):
    """predict_slide's default path (GLTrans with class evidence) retries like run_mil."""
    from analysis.mil import bag, build_mil
    from analysis.pipeline import run_mil_evidence

    torch.manual_seed(0)
    config = {"in_dim": 16, "dim": 32, "n_heads": 4, "depth": 2, "n_classes": 2}
    mil = build_mil("gltrans", config).eval()
    rng = np.random.default_rng(1)
    n = 500
    features = rng.normal(size=(n, 16)).astype(np.float32)
    grid_rc = np.stack(np.divmod(np.arange(n), 25), axis=1)
    classes = ["normal", "tumor"]
    expected = run_mil_evidence(mil, features, grid_rc, classes)  # unlimited memory

    ran = limit_attention_memory(monkeypatch, max_scores=4 * 501 * 100)
    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", 4 * 501 * 64)
    probabilities, attention, evidence, target = run_mil_evidence(mil, features, grid_rc, classes)
    assert ran and max(ran) <= 4 * 501 * 64
    assert target == expected[3]
    for got, want in zip((probabilities, attention, evidence), expected[:3], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", 4 * 501 * 200)
    with pytest.raises(AnalysisError, match=r"bag of 500 patches x 16 features.*chunked"):
        run_mil_evidence(mil, features, grid_rc, classes)


def test_the_encoder_halves_its_batch_on_out_of_memory_and_gives_the_same_embeddings():
    from analysis.encoders import ResNet50Trunc

    torch.manual_seed(0)
    net = ResNet50Trunc().eval()
    patches = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    expected = Encoder(name="r", model=net, dim=1024, weights_source="t", device="cpu").embed(
        patches
    )
    limited = MemoryLimitedNet(net, max_batch=3)
    encoder = Encoder(
        name="r", model=limited, dim=1024, weights_source="t", device="cpu", batch_size=8
    )
    np.testing.assert_allclose(encoder.embed(patches), expected, rtol=1e-5, atol=1e-5)
    assert limited.batch_sizes[:3] == [8, 4, 2] and max(limited.batch_sizes[2:]) <= 3
    assert encoder.batch_size == 2  # later batches start at the size that fitted

    limited.max_batch = 0
    with pytest.raises(AnalysisError, match=r"one 32x32 px patch does not fit.*encoder"):
        encoder.embed(patches)


def test_device_resolution_follows_flag_then_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None) == expected
    assert resolve_device("auto") == expected
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert resolve_device(None) == "cpu"
    assert resolve_device("CPU") == "cpu"  # the flag wins over the environment


def test_unknown_or_absent_devices_are_refused_in_one_line(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(AnalysisError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(AnalysisError, match="no CUDA GPU"):
            resolve_device("cuda")
        monkeypatch.setenv(ENV_VAR, "cuda:0")
        with pytest.raises(AnalysisError, match="LOWMAG_DEVICE"):
            resolve_device(None)


def test_load_bundle_puts_encoder_and_mil_on_the_device_lowmag_device_names(tiny, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "meta")  # a real torch device that is not the CPU
    bundle = load_bundle(tiny.path)
    assert bundle.encoder.device == "meta"
    assert module_device(bundle.encoder.model) == FAKE_DEVICE
    assert module_device(bundle.mil) == FAKE_DEVICE
    assert module_device(load_bundle(tiny.path, device="cpu").mil).type == "cpu"  # flag wins


def test_accelerator_memory_is_reported_absent_without_a_gpu():
    memory = accelerator_memory()
    assert memory["present"] is torch.cuda.is_available()
    if not memory["present"]:
        assert memory["allocated_bytes"] == memory["total_bytes"] == 0


def test_cli_device_flag_is_used_and_a_bad_one_is_one_line(tiny, capsys, monkeypatch):
    from analysis.cli import main

    monkeypatch.delenv(ENV_VAR, raising=False)
    slide = str(shared_slide("cmu-1-small-region.svs"))
    assert main(["predict", str(tiny.path), slide, "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'gpu0'" in err and len(err.strip().splitlines()) == 1
    assert main(["predict", str(tiny.path), slide, "--device", "cpu"]) == 0
    assert "patches" in capsys.readouterr().out


def test_cross_validation_inference_feeds_bags_on_the_models_device():
    from analysis.train import Bag, predict_proba

    rng = np.random.default_rng(1)
    bags = [
        Bag(rng.normal(size=(n, 8)).astype(np.float32), np.zeros((n, 2), np.int64), 0, f"s{n}", "p")
        for n in (5, 9)
    ]
    mil = FakeAcceleratorMIL(n_classes=2)
    probabilities = predict_proba(mil, bags)
    assert probabilities.shape == (2, 2) and mil.misplaced_inputs == []


def test_bad_input_with_models_off_the_cpu_gets_the_cpu_paths_errors(tiny):
    from analysis.errors import MagnificationUnavailableError, NoTissueError

    bundle = _fake_bundle(tiny)
    with pytest.raises(NoTissueError):
        predict_slide(bundle, shared_slide("small.svs"))
    bundle.manifest.magnification = 40.0  # finer than the CMU slide (20x)
    try:
        with pytest.raises(MagnificationUnavailableError, match="upsampling"):
            predict_slide(bundle, shared_slide("cmu-1-small-region.svs"))
    finally:
        bundle.manifest.magnification = 5.0
    assert bundle.mil.input_devices == []  # refused before anything reached the model


def test_reading_defaults_follow_the_encoders_device():
    from analysis.pipeline import reading_defaults

    assert reading_defaults("cpu") == (64, 2)
    batch, readers = reading_defaults("cuda:0")
    assert batch == 512 and 2 <= readers <= 8
