"""The production path: a real Redis broker and real Celery worker processes (not eager mode).

Runs where the database is PostgreSQL (the worker process must see the test's committed
rows); each test starts its own redis-server on a free port so it can be killed and
restarted without touching anything else.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection

from tests.bundles import make_tiny_bundle

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True)]

REPO = Path(__file__).resolve().parent.parent


def _needs_services():
    if connection.vendor != "postgresql":
        pytest.skip("worker tests need PostgreSQL (set DATABASE_URL; .ci/run does)")
    if not shutil.which("redis-server"):
        pytest.skip("worker tests need the redis-server binary")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path):
        self.port = _free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Worker:
    def __init__(self, env: dict, log: Path):
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        handle = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "portal",
                "worker",
                "-Q",
                "gpu,cpu",
                "--pool",
                "solo",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "info",
            ],
            cwd=REPO,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def _point_celery_at(app, broker_url: str) -> None:
    """Make this process's Celery app publish to ``broker_url`` (dropping cached connections)."""
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None
    app.conf.broker_url = broker_url


@pytest.fixture
def stack(tmp_path, settings):
    _needs_services()
    from portal import celery_app

    redis = RedisServer(tmp_path)
    redis.start()
    settings.SLIDE_DIR = tmp_path / "data" / "slides"
    settings.LOWMAG_TASK_MODE = "celery"
    previous_broker = celery_app.conf.broker_url
    _point_celery_at(celery_app, redis.url)
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "REDIS_URL": redis.url,
        "LOWMAG_DATA_DIR": str(tmp_path / "data"),
        "LOWMAG_VISIBILITY_TIMEOUT": "4",
        "LOWMAG_CLAIM_LEASE_S": "10",  # a killed worker's claim runs out within the test
        "LOWMAG_TORCH_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    workers: list[Worker] = []

    def new_worker() -> Worker:
        worker = Worker(env, tmp_path / "worker.log")
        worker.start()
        workers.append(worker)
        return worker

    yield {"redis": redis, "new_worker": new_worker, "tmp": tmp_path}
    for worker in workers:
        worker.stop()
    redis.stop()
    _point_celery_at(celery_app, previous_broker)


def _slide_with_model(tmp_path: Path, settings, *, size: int):
    from django.contrib.auth.models import User

    from analysis.bundle import bundle_sha256, load_manifest
    from analysis.synth import write_synthetic_slide
    from portal.analyses.models import ModelVersion
    from portal.cases.models import Case, Cohort, Slide

    bundle = make_tiny_bundle(tmp_path / "bundle")
    manifest = load_manifest(bundle)
    model = ModelVersion.objects.create(
        name=manifest.name,
        version=manifest.version,
        task=manifest.task,
        classes=manifest.classes,
        magnification=manifest.magnification,
        bundle_path=str(bundle),
        manifest={},
        sha256=bundle_sha256(bundle),
        is_demo=True,
        active=True,
    )
    cohort = Cohort.objects.create(name="Worker cohort", slug="worker", active_model=model)
    user = User.objects.create_user("lis", password="x")
    case = Case.objects.create(
        cohort=cohort, patient_id="P1", accession_number="A1", created_by=user
    )
    slide_dir = Path(settings.SLIDE_DIR) / "w1"
    slide_dir.mkdir(parents=True)
    synth = write_synthetic_slide(
        slide_dir / "slide.tiff", width=size, height=size, seed=3, mpp=2.0
    )
    slide = Slide.objects.create(
        case=case,
        original_name="slide.tiff",
        file="w1/slide.tiff",
        sha256="ab" * 32,
        size_bytes=synth.path.stat().st_size,
        status="ready",
        width=size,
        height=size,
        mpp=2.0,
        magnification=5.0,
    )
    return slide, model


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_analysis_runs_on_a_real_worker_and_creates_one_prediction(stack, settings):
    from portal.analyses.models import AnalysisJob, Prediction
    from portal.analyses.tasks import request_analysis

    slide, _ = _slide_with_model(stack["tmp"], settings, size=1500)
    stack["new_worker"]()
    job = request_analysis(slide)
    _wait_for(lambda: AnalysisJob.objects.get(pk=job.pk).state == "succeeded", 180, "the job")
    assert Prediction.objects.filter(slide=slide).count() == 1
    job.refresh_from_db()
    assert job.timings["total"] > 0


def test_worker_killed_mid_analysis_the_job_finishes_once_another_worker_runs(stack, settings):
    from portal.analyses.models import AnalysisJob, Prediction
    from portal.analyses.tasks import request_analysis

    slide, _ = _slide_with_model(stack["tmp"], settings, size=5000)
    first = stack["new_worker"]()
    job = request_analysis(slide)
    _wait_for(
        lambda: AnalysisJob.objects.filter(pk=job.pk, stage="features", progress__gt=0).exists(),
        180,
        "the analysis to be encoding patches",
    )
    first.kill()  # SIGKILL in the middle of the analysis: the message was never acknowledged
    assert AnalysisJob.objects.get(pk=job.pk).state == "running"
    assert not Prediction.objects.filter(slide=slide).exists()
    stack["new_worker"]()
    _wait_for(
        lambda: AnalysisJob.objects.get(pk=job.pk).state == "succeeded", 300, "the redelivered job"
    )
    assert Prediction.objects.filter(slide=slide).count() == 1
    assert AnalysisJob.objects.get(pk=job.pk).attempts >= 2


def test_redis_restarted_while_idle_the_next_job_still_runs(stack, settings):
    from portal.analyses.models import AnalysisJob, Prediction
    from portal.analyses.tasks import request_analysis

    slide, _ = _slide_with_model(stack["tmp"], settings, size=1200)
    stack["new_worker"]()
    time.sleep(3)  # the worker is connected and idle
    stack["redis"].stop()
    time.sleep(1)
    stack["redis"].start()
    job = request_analysis(slide)
    _wait_for(
        lambda: AnalysisJob.objects.get(pk=job.pk).state == "succeeded",
        180,
        "the job after restart",
    )
    assert Prediction.objects.filter(slide=slide).count() == 1
