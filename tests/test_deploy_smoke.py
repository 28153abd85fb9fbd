"""The production topology on this machine (deploy/run-local-prod.sh), end to end.

nginx -> the web server (uvicorn), two Celery workers (gpu, cpu queues), the local PostgreSQL and Redis: start
it, check health, static files and metrics through nginx, upload a slide with tus, watch the
analysis finish on a worker, read tiles and the job websocket through nginx, stop it and
check nothing is left running. Skipped unless nginx is installed and PostgreSQL and Redis
answer (with LOWMAG_REQUIRE_SERVICES=1 unreachable services fail instead of skipping).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import page_login

pytestmark = pytest.mark.production

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "run-local-prod.sh"
PYTHON = Path(sys.executable)
PASSWORD = "smoke-password-7Qx!"
# The lowmag_smoke database outlives a run: names are unique per run.
RUN = format(time.time_ns(), "x")[-8:]
USERNAME, COHORT = f"smoke-lis-{RUN}", f"Smoke cohort {RUN}"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _skip_reason() -> str | None:
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        return "nginx is not installed (apt-get install nginx-light)"
    if not shutil.which("psql") or not shutil.which("pg_isready"):
        return "the PostgreSQL client (psql, pg_isready) is not installed"
    missing = [
        name
        for name, port in (("PostgreSQL", 5432), ("Redis", 6379))
        if not _reachable("127.0.0.1", port)
    ]
    if missing:
        message = f"{' and '.join(missing)} not reachable on 127.0.0.1"
        if os.environ.get("LOWMAG_REQUIRE_SERVICES") == "1":
            pytest.fail(f"LOWMAG_REQUIRE_SERVICES=1 but {message}")
        return message
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    def __init__(self, root: Path):
        self.run_dir = root / "run"
        self.data_dir = root / "data"
        self.nginx_port = _free_port()
        self.web_port = _free_port()
        self.base = f"http://127.0.0.1:{self.nginx_port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.endswith("_FILE")},
            "LOWMAG_RUN_DIR": str(self.run_dir),
            "LOWMAG_LOCAL_DATA_DIR": str(self.data_dir),
            "NGINX_PORT": str(self.nginx_port),
            "WEB_PORT": str(self.web_port),
            "LOWMAG_PYTHON": str(PYTHON),
            "LOWMAG_STOP_TIMEOUT": "30",
        }

    def script(self, command: str, timeout: float = 150) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPT), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def manage(self, *args: str, extra_env: dict[str, str] | None = None) -> str:
        """Run manage.py with the stack's own settings (those run-local-prod.sh exports)."""
        env = {
            **self.env,
            "LOWMAG_PRODUCTION": "true",
            "DEBUG": "false",
            "LOWMAG_DATA_DIR": str(self.data_dir),
            "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/lowmag_smoke",
            "REDIS_URL": "redis://127.0.0.1:6379/5",
            "LOWMAG_TASK_MODE": "celery",
            "SECRET_KEY_FILE": str(self.run_dir / "secret_key"),
            "OMP_WAIT_POLICY": "PASSIVE",
            **(extra_env or {}),
        }
        result = subprocess.run(
            [str(PYTHON), "manage.py", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"manage.py {' '.join(args)}:\n{result.stderr}"
        return result.stdout

    def pids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in self.run_dir.glob("*.pid")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    stack = Stack(tmp_path_factory.mktemp("local-prod"))
    result = stack.script("start")
    if result.returncode != 0:
        stack.script("stop")
        pytest.fail(f"run-local-prod.sh start failed:\n{result.stderr[-4000:]}")
    stack.started_pids = stack.pids()
    yield stack
    stack.script("stop")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- the stack itself ---------------------------------------------------------------------


def test_status_reports_every_service_running(stack):
    result = stack.script("status", timeout=30)
    assert result.returncode == 0, result.stdout
    for name in ("web", "worker-gpu", "worker-cpu", "nginx"):
        assert f"{name}: running" in result.stdout
    assert set(stack.started_pids) == {"web", "worker-gpu", "worker-cpu", "nginx"}


def test_healthz_through_nginx_reports_database_and_redis_ok(stack):
    response = requests.get(f"{stack.base}/healthz", timeout=10)
    assert response.status_code == 200
    assert response.headers["Server"].startswith("nginx")
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_nginx_serves_collected_static_files(stack):
    response = requests.get(f"{stack.base}/static/admin/css/base.css", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/css")
    assert "max-age" in response.headers.get("Cache-Control", "") or "Expires" in response.headers


def test_metrics_through_nginx_need_the_token(stack):
    token = (stack.run_dir / "metrics_token").read_text().strip()
    assert requests.get(f"{stack.base}/metrics", timeout=10).status_code == 401
    response = requests.get(
        f"{stack.base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200
    assert 'lowmag_analysis_jobs{state="queued"}' in response.text


# ---- a slide through the whole stack ------------------------------------------------------


def _make_bundle(out: Path) -> Path:
    """A GLTrans bundle with seeded random weights: enough to run the pipeline, not to diagnose."""
    try:
        from analysis.bundle import BundleManifest, write_bundle
        from analysis.mil import build_mil
    except ImportError as exc:
        pytest.fail(f"cannot build a model bundle for the smoke test: {exc}")
    mil = build_mil("gltrans", {})
    manifest = BundleManifest(
        name="smoke-gltrans",
        version=RUN,
        task="lesion-detection",
        classes=["normal", "tumor"],
        magnification=5.0,
        encoder={"name": "resnet50_trunc"},
        mil={"name": "gltrans", "config": {}},
        is_demo=True,
    )
    return write_bundle(out, manifest, mil_state=mil.state_dict())


def _make_slide(out: Path) -> Path:
    from analysis.synth import write_synthetic_slide

    path = out / "smoke-5x.svs"
    write_synthetic_slide(path, width=1600, height=1200, seed=7, label=1, mpp=2.0, workers=1)
    return path


def _tus_upload(stack, token: str, slide: Path, case_id: int) -> str:
    data = slide.read_bytes()

    def b64(value: str) -> str:
        return base64.b64encode(value.encode()).decode()

    headers = {"Authorization": f"Token {token}", "Tus-Resumable": "1.0.0"}
    created = requests.post(
        f"{stack.base}/api/v1/uploads/",
        headers={
            **headers,
            "Upload-Length": str(len(data)),
            "Upload-Metadata": f"filename {b64(slide.name)},case {b64(str(case_id))}",
        },
        timeout=30,
    )
    assert created.status_code == 201, f"tus creation: {created.status_code} {created.text[:500]}"
    location = requests.compat.urljoin(f"{stack.base}/api/v1/uploads/", created.headers["Location"])
    half = len(data) // 2
    for offset, chunk in ((0, data[:half]), (half, data[half:])):
        digest = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
        patched = requests.patch(
            location,
            data=chunk,
            headers={
                **headers,
                "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": str(offset),
                "Upload-Checksum": f"sha256 {digest}",
            },
            timeout=60,
        )
        assert patched.status_code == 204, (
            f"tus PATCH at {offset}: {patched.status_code} {patched.text[:500]}"
        )
        assert int(patched.headers["Upload-Offset"]) == offset + len(chunk)
    return location


def _poll(what: str, fetch, done, timeout: float = 150.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fetch()
        if done(last):
            return last
        time.sleep(1.0)
    pytest.fail(f"timed out waiting for {what}; last answer: {last}")


def _results(response: requests.Response) -> list[dict]:
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    return body["results"] if isinstance(body, dict) else body


def _websocket_first_message(stack, path: str, cookies: dict[str, str]) -> dict:
    """A minimal RFC 6455 client: handshake through nginx, read one unmasked text frame."""
    key = base64.b64encode(os.urandom(16)).decode()
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{stack.nginx_port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nOrigin: {stack.base}\r\nCookie: {cookie}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", stack.nginx_port), timeout=15) as sock:
        sock.sendall(request.encode())
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(4096)
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head.decode(errors="replace")
        while len(buffer) < 2:
            buffer += sock.recv(4096)
        length = buffer[1] & 0x7F
        start = 2
        if length == 126:
            length, start = int.from_bytes(buffer[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(buffer[2:10], "big"), 10
        while len(buffer) < start + length:
            buffer += sock.recv(4096)
        assert buffer[0] & 0x0F == 1, f"expected a text frame, got opcode {buffer[0] & 0x0F}"
        return json.loads(buffer[start : start + length])


def test_a_slide_uploaded_through_nginx_is_analysed_and_viewable(stack, tmp_path):
    stack.manage("create_user", f"smoke-admin-{RUN}", "--role", "admin", "--password", PASSWORD)
    admin_token = stack.manage("create_token", f"smoke-admin-{RUN}").strip().splitlines()[-1]
    cohort = requests.post(
        f"{stack.base}/api/v1/cohorts/",
        json={"name": COHORT, "slug": f"smoke-{RUN}", "is_demo": True},  # a demo model serves it
        headers={"Authorization": f"Token {admin_token}"},
        timeout=10,
    )
    assert cohort.status_code == 201, f"cohort creation: {cohort.status_code} {cohort.text[:500]}"
    cohort_id = cohort.json()["id"]
    bundle = _make_bundle(tmp_path / "bundle")
    stack.manage("register_model", str(bundle), "--activate", "--cohort", COHORT)
    stack.manage(
        "create_user", USERNAME, "--role", "integration", "--cohort", COHORT, "--password", PASSWORD
    )
    token = stack.manage("create_token", USERNAME, "--name", "smoke").strip().splitlines()[-1]
    api = {"Authorization": f"Token {token}"}
    case = requests.post(
        f"{stack.base}/api/v1/cases/",
        json={"cohort": cohort_id, "patient_id": "P-1", "accession_number": f"S-{time.time_ns()}"},
        headers=api,
        timeout=10,
    )
    assert case.status_code == 201, f"case creation: {case.status_code} {case.text[:500]}"
    case_id = case.json()["id"]

    _tus_upload(stack, token, _make_slide(tmp_path), case_id)

    def slide_of_case():
        return _results(
            requests.get(f"{stack.base}/api/v1/slides/?case={case_id}", headers=api, timeout=10)
        )

    slides = _poll(
        "the ingest on the cpu worker",
        slide_of_case,
        lambda s: s and s[0]["status"] in ("ready", "failed"),
    )
    assert slides[0]["status"] == "ready", f"ingest refused the slide: {slides[0]}"
    slide_id = slides[0]["id"]

    def jobs_of_slide():
        return _results(
            requests.get(f"{stack.base}/api/v1/jobs/?slide={slide_id}", headers=api, timeout=10)
        )

    jobs = _poll(
        "the analysis on the gpu worker",
        jobs_of_slide,
        lambda j: j and j[0]["state"] in ("succeeded", "failed"),
    )
    assert jobs[0]["state"] == "succeeded", f"analysis failed: {jobs[0]}"

    pathologist = f"smoke-path-{RUN}"
    stack.manage(
        "create_user",
        pathologist,
        "--role",
        "pathologist",
        "--cohort",
        COHORT,
        "--password",
        PASSWORD,
    )
    browser = page_login(stack.base, pathologist, PASSWORD)
    dzi = browser.get(f"{stack.base}/slides/{slide_id}.dzi", timeout=10)
    assert dzi.status_code == 200, dzi.text[:300]
    tile = browser.get(f"{stack.base}/slides/{slide_id}_files/0/0_0.jpeg", timeout=10)
    assert tile.status_code == 200 and tile.content[:2] == b"\xff\xd8"
    assert "immutable" in tile.headers.get("Cache-Control", "")

    message = _websocket_first_message(stack, f"/ws/jobs/{jobs[0]['id']}/", dict(browser.cookies))
    assert message["type"] == "job.snapshot"
    assert message.get("state") == "succeeded"


# ---- shutdown (last: it stops the stack) -------------------------------------------------


def test_stop_shuts_everything_down_and_leaves_no_process(stack):
    pids = stack.pids()
    assert pids, "no PID files before stop"
    result = stack.script("stop", timeout=120)
    assert result.returncode == 0, result.stderr
    assert not list(stack.run_dir.glob("*.pid"))
    leftovers = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert not leftovers, f"still running after stop: {leftovers}"
    group_members = subprocess.run(
        ["pgrep", "-g", ",".join(str(p) for p in pids.values())], capture_output=True, text=True
    )
    assert group_members.stdout.strip() == "", f"children left: {group_members.stdout}"
    status = stack.script("status", timeout=30)
    assert status.returncode == 3, status.stdout
    assert not _reachable("127.0.0.1", stack.nginx_port)
    assert not _reachable("127.0.0.1", stack.web_port)
