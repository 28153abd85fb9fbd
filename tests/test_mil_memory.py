"""A huge bag on a device too small for it: every MIL model retries in chunks, with the same
result, or fails with one clear message (``tests.fake_accelerator.limit_memory`` plays the
device: any op bigger than its limit raises ``torch.OutOfMemoryError``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.errors import AnalysisError
from analysis.mil import bag, build_mil
from analysis.pipeline import run_mil, run_mil_evidence
from tests.fake_accelerator import limit_memory

N = 500  # instances: a 20 x 25 grid
IN_DIM = 16
BUDGET = 8192  # values per op: the unchunked bag needs more (its embedding alone is 500 x 32)
CLASS_NAMES = {"gltrans": "GLTrans", "abmil": "ABMIL", "clam_sb": "CLAMSB", "transmil": "TransMIL"}
EVIDENCE_MODELS = ["gltrans", "abmil", "clam_sb"]


def small_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {"in_dim": IN_DIM, "dim": 32, "n_classes": 3}
    if name in ("gltrans", "transmil"):
        config["n_heads"] = 4
    if name in ("abmil", "clam_sb"):
        config["attn_dim"] = 16
    return build_mil(name, config).eval()


def huge_bag(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(N, IN_DIM)).astype(np.float32)
    return features, np.stack(np.divmod(np.arange(N), 25), axis=1)


@pytest.mark.parametrize("name", sorted(CLASS_NAMES))
def test_every_model_runs_a_bag_too_big_for_the_device_in_chunks_with_the_same_result(
    name, monkeypatch
):
    mil = small_model(name)
    features, grid_rc = huge_bag()
    expected = run_mil(mil, features, grid_rc)  # unlimited memory

    limit = limit_memory(monkeypatch, BUDGET)
    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", BUDGET)
    probabilities, scores = run_mil(mil, features, grid_rc)
    assert limit.refused == 1  # the whole bag did not fit; the retry never hit the limit
    assert limit.ran and max(limit.ran) <= BUDGET
    np.testing.assert_allclose(probabilities, expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores, expected[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", EVIDENCE_MODELS)
def test_class_evidence_in_chunks_equals_the_normal_path(name, monkeypatch):
    mil = small_model(name)
    features, grid_rc = huge_bag(seed=1)
    classes = ["normal", "tumour", "other"]
    expected = run_mil_evidence(mil, features, grid_rc, classes)

    limit = limit_memory(monkeypatch, BUDGET)
    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", BUDGET)
    probabilities, attention, evidence, target = run_mil_evidence(mil, features, grid_rc, classes)
    assert limit.refused == 1 and max(limit.ran) <= BUDGET
    assert target == expected[3]
    np.testing.assert_allclose(probabilities, expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(attention, expected[1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(evidence, expected[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["abmil", "clam_sb"])
def test_chunked_attention_pooling_keeps_a_running_max_so_peaked_attention_stays_exact(
    name, monkeypatch
):
    """Attention logits in the thousands: a chunked softmax without the running max overflows."""
    mil = small_model(name)
    with torch.no_grad():
        mil.attention.score.weight.mul_(2000.0)
    features, grid_rc = huge_bag(seed=2)
    expected = run_mil(mil, features, grid_rc)
    assert expected[1].max() > 0.5  # one patch takes most of the attention

    limit_memory(monkeypatch, BUDGET)
    monkeypatch.setattr(bag, "LOW_MEMORY_CHUNK_ELEMENTS", BUDGET)
    probabilities, scores = run_mil(mil, features, grid_rc)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(probabilities, expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores, expected[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", sorted(CLASS_NAMES))
def test_a_bag_too_big_even_in_chunks_fails_naming_its_size_the_model_the_device_and_the_fix(
    name, monkeypatch
):
    mil = small_model(name)
    features, grid_rc = huge_bag()
    limit = limit_memory(monkeypatch, 8)  # not even one instance's embedding fits
    with pytest.raises(AnalysisError) as caught:
        run_mil(mil, features, grid_rc)
    message = str(caught.value)
    assert message.startswith(f"{CLASS_NAMES[name]} on cpu ran out of memory")
    assert f"bag of {N} patches x {IN_DIM} features, even chunked" in message
    assert "LOWMAG_DEVICE" in message and "--min-tissue" in message
    assert "same size at every magnification" in message  # a lower one would not help
    assert "Traceback" not in message and len(message.splitlines()) == 1
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert limit.refused == 2  # the whole bag, then the chunked retry: never a third try

    if name in EVIDENCE_MODELS:
        with pytest.raises(AnalysisError, match=f"{CLASS_NAMES[name]} on cpu.*bag of {N} patches"):
            run_mil_evidence(mil, features, grid_rc, ["normal", "tumour", "other"])


class _CpuExhausted(torch.nn.Module):
    """A model whose host allocation fails the way torch's CPU allocator reports it."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.error = error

    def forward(self, features, coords):
        raise RuntimeError(self.error)


def test_the_cpu_allocators_out_of_memory_gets_the_same_clear_message():
    mil = _CpuExhausted(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 81604378624 bytes. Error code 12 (Cannot allocate memory)"
    )
    features, grid_rc = np.zeros((1234, 8), np.float32), np.zeros((1234, 2), np.int64)
    with pytest.raises(
        AnalysisError, match=r"_CpuExhausted on cpu .*bag of 1234 patches x 8 features"
    ):
        run_mil(mil, features, grid_rc)


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    mil = _CpuExhausted("mat1 and mat2 shapes cannot be multiplied (1234x8 and 16x32)")
    features, grid_rc = np.zeros((1234, 8), np.float32), np.zeros((1234, 2), np.int64)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_mil(mil, features, grid_rc)
