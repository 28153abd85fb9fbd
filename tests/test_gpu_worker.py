"""The analysis worker: the model on its device, kept warm, the cluster map after the result,
GPU memory in /metrics. The 'GPU' is tests/fake_accelerator (models whose weights are not on
the CPU), so these run without one."""

from __future__ import annotations

import pytest

from analysis.bundle import load_bundle
from analysis.encoders import Encoder
from portal.analyses.models import AnalysisJob, Prediction
from tests.bundles import make_tiny_bundle
from tests.conftest import shared_slide
from tests.fake_accelerator import FakeAcceleratorEncoderNet, FakeAcceleratorMIL

pytestmark = pytest.mark.django_db


@pytest.fixture
def cmu_slide(slide_a, settings):
    source = shared_slide("cmu-1-small-region.svs")
    settings.SLIDE_DIR = str(source.parent)
    slide_a.file = source.name
    slide_a.save(update_fields=["file"])
    return slide_a


@pytest.fixture
def fake_gpu_bundle(tmp_path, model_version, monkeypatch):
    """The worker's model as the tiny bundle, 'loaded on a GPU' by the worker's own loader."""
    from portal.analyses import tasks

    real = load_bundle(make_tiny_bundle(tmp_path / "tiny"), device="cpu")
    loads = []

    def fake_load(path, device=None, precision=None):
        loads.append(device)
        real.encoder = Encoder(
            name="fake",
            model=FakeAcceleratorEncoderNet(embed_dim=16),
            dim=16,
            weights_source="test",
            precision="fp32",
            device="meta",
        )
        real.mil = FakeAcceleratorMIL(n_classes=2)
        return real

    monkeypatch.setattr("analysis.bundle.load_bundle", fake_load)
    monkeypatch.setattr(tasks, "_bundles", {})
    return real, loads


def test_analysis_with_the_model_off_the_cpu_stores_one_prediction_then_its_clusters(
    cmu_slide, model_version, fake_gpu_bundle, settings, django_capture_on_commit_callbacks
):
    from portal.analyses.tasks import request_analysis

    settings.LOWMAG_DEVICE = "cpu"
    bundle, loads = fake_gpu_bundle
    with django_capture_on_commit_callbacks(execute=True):
        job = request_analysis(cmu_slide, model_version)
    job.refresh_from_db()
    assert job.state == "succeeded", job.error
    assert loads == ["cpu"]  # the worker's device setting reached the loader
    assert bundle.mil.input_devices and bundle.mil.misplaced_inputs == []
    assert bundle.encoder.model.misplaced_inputs == []
    prediction = Prediction.objects.get(slide=cmu_slide)
    n = len(prediction.grid["grid_rc"])
    assert len(prediction.scores()) == n and len(prediction.cluster_ids()) == n
    assert {"features", "mil", "clusters"} <= set(job.timings)


def test_the_worker_loads_its_model_once_and_keeps_it(
    cmu_slide, model_version, fake_gpu_bundle, cohort_a, django_capture_on_commit_callbacks
):
    from portal.analyses.tasks import loaded_bundle, request_analysis
    from tests.portal_fixtures import make_case

    bundle, loads = fake_gpu_bundle
    other = make_case(cohort_a, "A-OTHER").slides.get()
    other.file = cmu_slide.file
    other.save(update_fields=["file"])
    with django_capture_on_commit_callbacks(execute=True):
        request_analysis(cmu_slide, model_version)
    with django_capture_on_commit_callbacks(execute=True):
        request_analysis(other, model_version)
    assert AnalysisJob.objects.filter(state="succeeded").count() == 2
    assert len(loads) == 1 and loaded_bundle(model_version) is bundle


def test_a_worker_device_that_is_absent_fails_the_job_with_one_line(
    cmu_slide, model_version, settings, monkeypatch, django_capture_on_commit_callbacks
):
    import torch

    from portal.analyses import tasks

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(tasks, "_bundles", {})
    settings.LOWMAG_DEVICE = "cuda"
    with django_capture_on_commit_callbacks(execute=True):
        job = tasks.request_analysis(cmu_slide, model_version)
    job.refresh_from_db()
    assert job.state == "failed"
    assert "no CUDA GPU" in job.error and "\n" not in job.error


def test_metrics_report_each_workers_gpu_memory_absent_on_a_cpu(client, settings, monkeypatch):
    from portal.core import metrics

    settings.METRICS_TOKEN = "t0ken"
    settings.REDIS_URL = ""
    monkeypatch.setattr(metrics, "_local_gpu", {})
    fake = {
        "present": True,
        "device": "NVIDIA H200",
        "allocated_bytes": 3 << 30,
        "reserved_bytes": 4 << 30,
        "peak_bytes": 5 << 30,
        "total_bytes": 140 << 30,
    }
    from analysis.devices import accelerator_memory

    real = accelerator_memory  # this machine's own view (no GPU here)
    monkeypatch.setattr("analysis.devices.accelerator_memory", lambda: fake)
    metrics.publish_worker_memory("gpu@node-1")
    monkeypatch.setattr("analysis.devices.accelerator_memory", real)
    metrics.publish_worker_memory("cpu@node-2")
    text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer t0ken").content.decode()
    assert "lowmag_gpu_workers 2" in text
    assert 'lowmag_gpu_present{worker="gpu@node-1"} 1' in text
    assert f'lowmag_gpu_memory_bytes{{worker="gpu@node-1",kind="peak"}} {5 << 30}' in text
    assert 'lowmag_gpu_present{worker="cpu@node-2"} 0' in text
    assert 'lowmag_gpu_memory_bytes{worker="cpu@node-2",kind="allocated"} 0' in text


def test_gpu_worker_manifests_pin_the_device_and_one_child_per_gpu():
    from pathlib import Path

    import yaml

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    pod = yaml.safe_load((deploy / "k8s" / "worker-gpu.yaml").read_text())
    container = pod["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LOWMAG_DEVICE"] == "cuda" and env["LOWMAG_PRELOAD_MODELS"] == "true"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["command"][container["command"].index("-c") + 1] == "1"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())["services"]["worker-gpu"]
    assert compose["environment"]["LOWMAG_DEVICE"] == "cuda"
    assert compose["environment"]["LOWMAG_PRELOAD_MODELS"] == "true"
    assert compose["command"][compose["command"].index("-c") + 1] == "1"
    assert compose["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1


def test_a_gpu_worker_child_preloads_the_active_models_when_told_to(
    model_version, cohort_a, fake_gpu_bundle, settings
):
    from portal.analyses import tasks
    from portal.celery import _preload_models

    bundle, loads = fake_gpu_bundle
    cohort_a.active_model = model_version
    cohort_a.save(update_fields=["active_model"])
    settings.LOWMAG_PRELOAD_MODELS = False
    _preload_models()
    assert loads == []
    settings.LOWMAG_PRELOAD_MODELS = True
    _preload_models()
    assert len(loads) == 1
    assert tasks._bundles[model_version.sha256] is bundle


def test_gpu_memory_travels_through_redis_between_worker_and_web(settings, monkeypatch):
    from portal.core import metrics

    if not settings.REDIS_URL:
        pytest.skip("needs REDIS_URL (the production path)")
    client = metrics._redis()
    client.delete(metrics.GPU_REDIS_KEY)
    try:
        monkeypatch.setattr(
            "analysis.devices.accelerator_memory",
            lambda: {"present": True, "allocated_bytes": 7, "total_bytes": 9},
        )
        metrics.publish_worker_memory("gpu@redis-test")
        text = "\n".join(metrics._gpu_lines())
        assert 'lowmag_gpu_present{worker="gpu@redis-test"} 1' in text
        assert 'lowmag_gpu_memory_bytes{worker="gpu@redis-test",kind="allocated"} 7' in text
    finally:
        client.delete(metrics.GPU_REDIS_KEY)
