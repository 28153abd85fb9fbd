"""``lowmag send`` against a live portal: 5x export on the wire, resume after a kill, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from analysis.cli import main
from tests.conftest import REPO_ROOT, shared_slide

pytestmark = pytest.mark.django_db(transaction=True)

ACCESSION = "S-001"
COHORT = "send-cohort"


@dataclass
class Portal:
    url: str
    token: str
    case_id: int
    work_dir: Path

    def args(self, slide: Path, *extra: str) -> list[str]:
        return [
            "send",
            str(slide),
            "--server",
            self.url,
            "--case",
            ACCESSION,
            "--cohort",
            COHORT,
            "--work-dir",
            str(self.work_dir),
            *extra,
        ]


@pytest.fixture(scope="module")
def slide_20x(tmp_path_factory) -> Path:
    from analysis.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("send-slide") / "biopsy-20x.svs"
    write_synthetic_slide(path, width=3000, height=3000, seed=11, label=1)
    return path


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from tests.bundles import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("send-bundle") / "bundle")


def _register_model(bundle: Path):
    from analysis.bundle import bundle_sha256, load_manifest
    from portal.analyses.models import ModelVersion

    manifest = load_manifest(bundle)
    return ModelVersion.objects.create(
        name=manifest.name,
        version=manifest.version,
        task=manifest.task,
        classes=manifest.classes,
        magnification=manifest.magnification,
        bundle_path=str(bundle),
        sha256=bundle_sha256(bundle),
        is_demo=True,
        active=True,
    )


def _portal(live_server, settings, tmp_path: Path, model) -> Portal:
    from portal.api.models import ApiToken
    from portal.cases.models import Case, Cohort
    from tests.portal_fixtures import make_user

    settings.UPLOAD_DIR = tmp_path / "uploads"
    settings.SLIDE_DIR = tmp_path / "slides"
    settings.LOWMAG_TASK_MODE = "thread"  # the analysis runs in a thread of the server process
    cohort = Cohort.objects.create(name="Send cohort", slug=COHORT, active_model=model)
    lis = make_user("lis-send", cohort=cohort, role="integration")
    _token, raw = ApiToken.issue(lis, "send tests")
    case = Case.objects.create(
        cohort=cohort, patient_id="P-S1", accession_number=ACCESSION, created_by=lis
    )
    return Portal(live_server.url, raw, case.pk, tmp_path / "work")


@pytest.fixture
def portal(live_server, settings, tmp_path) -> Portal:
    """A cohort without an active model: uploads are ingested, nothing runs in the background."""
    return _portal(live_server, settings, tmp_path, model=None)


@pytest.fixture
def portal_with_model(live_server, settings, tmp_path, tiny_bundle) -> Portal:
    return _portal(live_server, settings, tmp_path, model=_register_model(tiny_bundle))


@pytest.fixture
def token_env(monkeypatch):
    def set_token(raw: str) -> None:
        monkeypatch.setenv("LOWMAG_TOKEN", raw)

    return set_token


def _run_json(capsys, args: list[str]) -> tuple[int, dict, str]:
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return code, json.loads(lines[0]), err


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the whole way -----------------------------------------------------------------------------


def test_send_with_wait_uploads_only_the_5x_export_and_ends_with_a_prediction(
    portal_with_model, slide_20x, token_env, capsys
):
    from portal.cases.models import Slide

    token_env(portal_with_model.token)
    args = portal_with_model.args(slide_20x, "--wait", "--keep-export")
    code, report, _ = _run_json(capsys, args)

    assert code == 0
    export = Path(report["file"]["path"])
    export_bytes = export.stat().st_size
    assert report["file"]["magnification"] == 5.0
    assert report["export"]["width"] == 750  # 3000 px at 0.5 µm/px -> 750 px at 2 µm/px
    assert report["file"]["bytes"] == export_bytes < slide_20x.stat().st_size / 4
    assert report["bytes_sent"] == export_bytes  # the 20x original never crossed the wire
    slide = Slide.objects.get(pk=report["slide_id"])
    assert slide.sha256 == report["file"]["sha256"] == _sha256(export)
    assert slide.size_bytes == export_bytes == slide.path.stat().st_size
    assert slide.magnification == pytest.approx(5.0, rel=0.01)
    assert report["status"] == "succeeded"
    prediction = report["prediction"]
    assert set(prediction["probabilities"]) == {"normal", "lesion"}
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert prediction["predicted_class"] in prediction["probabilities"]
    assert report["viewer_url"] == f"{portal_with_model.url}/cases/{portal_with_model.case_id}/"
    assert set(report["timings"]) >= {"export_s", "upload_s", "wait_s", "total_s"}


def test_human_output_names_the_slide_the_call_and_the_viewer(
    portal_with_model, slide_20x, token_env, capsys
):
    token_env(portal_with_model.token)
    assert main(portal_with_model.args(slide_20x, "--wait")) == 0
    out = capsys.readouterr().out
    assert "AI call: " in out
    assert f"viewer: {portal_with_model.url}/cases/{portal_with_model.case_id}/" in out


def test_sending_again_re_exports_the_same_bytes_and_gets_the_existing_slide(
    portal, slide_20x, token_env, capsys
):
    token_env(portal.token)
    _, first, _ = _run_json(capsys, portal.args(slide_20x))
    assert not Path(first["file"]["path"]).exists()  # sent: the export is not kept by default
    _, second, _ = _run_json(capsys, portal.args(slide_20x))
    assert second["file"]["reused"] is False
    assert second["file"]["sha256"] == first["file"]["sha256"]  # exports are deterministic
    assert second["duplicate"] is True
    assert second["slide_id"] == first["slide_id"]


def test_wait_without_an_active_model_says_the_slide_is_stored(
    portal, slide_20x, token_env, capsys
):
    token_env(portal.token)
    line = _one_line_error(capsys, portal.args(slide_20x, "--wait"))
    assert "has no active model" in line and "the slide is stored" in line


# -- resuming ------------------------------------------------------------------------------------


def test_killed_send_resumes_from_the_servers_offset(portal, slide_20x, capsys):
    from portal.cases.models import Slide
    from portal.uploads.models import Upload

    chunk = 16 * 1024
    env = {**os.environ, "LOWMAG_TOKEN": portal.token, "OMP_WAIT_POLICY": "PASSIVE"}
    throttled = [*portal.args(slide_20x), "--chunk-size", "16K", "--rate-limit", "0.4", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "analysis.cli", *throttled],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        seen = _wait_for_state_offset(portal.work_dir / "uploads", 3 * chunk, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    upload = Upload.objects.get()
    assert not upload.completed and upload.offset >= seen

    resumed = [*portal.args(slide_20x), "--token", portal.token, "--keep-export"]
    code, report, _ = _run_json(capsys, resumed)

    assert code == 0
    size = report["file"]["bytes"]
    assert report["resumed_from"] >= seen > 0
    assert report["bytes_sent"] == size - report["resumed_from"] < size
    assert Upload.objects.count() == 1  # the same upload, continued
    slide = Slide.objects.get(pk=report["slide_id"])
    assert slide.sha256 == report["file"]["sha256"] == _sha256(Path(report["file"]["path"]))
    assert slide.path.read_bytes() == Path(report["file"]["path"]).read_bytes()
    assert not list((portal.work_dir / "uploads").glob("*.json"))  # done: nothing to resume


def test_an_upload_the_server_forgot_starts_over(portal, slide_20x, token_env, capsys):
    from client.prepare import prepare_file
    from client.sender import Target
    from portal.uploads.models import Upload

    token_env(portal.token)
    prepared = prepare_file(slide_20x, 5.0, portal.work_dir)
    key = Target(portal.url, portal.token, ACCESSION, COHORT).key()
    state = portal.work_dir / "uploads" / f"{prepared.sha256}-{key}.json"
    state.parent.mkdir(parents=True)
    state.write_text(
        json.dumps(
            {
                "version": 1,
                "upload_url": f"{portal.url}/api/v1/uploads/00000000-0000-4000-8000-000000000000",
                "server": portal.url,
                "case": ACCESSION,
                "cohort": COHORT,
                "sha256": prepared.sha256,
                "size": prepared.bytes,
                "offset": 32768,
            }
        )
    )
    code, report, _ = _run_json(capsys, [*portal.args(slide_20x), "--chunk-size", "16K"])
    assert code == 0
    assert report["file"]["reused"] is True
    assert report["resumed_from"] == 0 and report["bytes_sent"] == prepared.bytes
    assert Upload.objects.get().completed


def test_a_send_killed_after_the_last_byte_gets_its_slide_on_the_next_run(
    portal, slide_20x, token_env, capsys
):
    import requests

    from client.prepare import prepare_file
    from client.sender import Target
    from client.tus import encode_metadata
    from portal.cases.models import Slide

    token_env(portal.token)
    prepared = prepare_file(slide_20x, 5.0, portal.work_dir)
    data = prepared.path.read_bytes()
    tus = {"Authorization": f"Token {portal.token}", "Tus-Resumable": "1.0.0"}
    metadata = encode_metadata({"filename": "x.tiff", "case": ACCESSION, "cohort": COHORT})
    created = requests.post(
        f"{portal.url}/api/v1/uploads/",
        headers={**tus, "Upload-Length": str(len(data)), "Upload-Metadata": metadata},
        timeout=30,
    )
    url = created.headers["Location"]
    done = requests.patch(
        url,
        data=data,
        headers={**tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        timeout=60,
    )
    assert done.headers["Upload-Slide-Status"] == "ready"
    key = Target(portal.url, portal.token, ACCESSION, COHORT).key()
    state = portal.work_dir / "uploads" / f"{prepared.sha256}-{key}.json"
    state.parent.mkdir(parents=True)
    state.write_text(
        json.dumps(
            {
                "version": 1,
                "upload_url": url,
                "server": portal.url,
                "case": ACCESSION,
                "cohort": COHORT,
                "sha256": prepared.sha256,
                "size": prepared.bytes,
            }
        )
    )
    code, report, _ = _run_json(capsys, portal.args(slide_20x))
    assert code == 0
    assert report["resumed_from"] == prepared.bytes and report["bytes_sent"] == 0
    assert report["slide_id"] == int(done.headers["Upload-Slide-Id"])
    assert Slide.objects.count() == 1


def test_a_lost_answer_mid_upload_is_retried_from_the_servers_offset(
    portal, slide_20x, token_env, capsys, monkeypatch
):
    import requests

    from portal.cases.models import Slide

    real_request = requests.Session.request
    patches = []

    def answer_lost_once(self, method, url, **kwargs):
        response = real_request(self, method, url, **kwargs)
        if method == "PATCH":
            patches.append(url)
            if len(patches) == 3:  # the server stored the chunk; its answer never arrives
                raise requests.ConnectionError("connection reset by peer")
        return response

    monkeypatch.setattr(requests.Session, "request", answer_lost_once)
    token_env(portal.token)
    args = portal.args(slide_20x, "--chunk-size", "16K", "--retry-wait", "0.05")
    code, report, _ = _run_json(capsys, args)
    assert code == 0
    assert report["upload"]["retries"] == 1
    assert report["bytes_sent"] == report["file"]["bytes"]  # the stored chunk was not resent
    assert Slide.objects.get(pk=report["slide_id"]).sha256 == report["file"]["sha256"]


def _wait_for_state_offset(state_dir: Path, at_least: int, proc, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in state_dir.glob("*.json"):
            try:
                offset = json.loads(path.read_text()).get("offset", 0)
            except ValueError:
                continue
            if offset >= at_least:
                return offset
        if proc.poll() is not None:
            raise AssertionError(f"lowmag send ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError(f"no upload progress in {state_dir} after {timeout_s} s")


# -- errors: one line, non-zero exit, no traceback ----------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_line_error(capsys, args: list[str]) -> str:
    """Run in --json mode (as an LIS would): one JSON error on stdout, one line on stderr."""
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lowmag send: error: ")
    assert json.loads(captured.out)["error"] in lines[0]
    return lines[0]


def test_wrong_token_is_one_line_error(portal, slide_20x, token_env, capsys):
    token_env("lmg_not-a-real-token")
    line = _one_line_error(capsys, portal.args(slide_20x))
    assert "refused the token (401" in line and "LOWMAG_TOKEN" in line


def test_unknown_case_is_one_line_error(portal, slide_20x, token_env, capsys):
    token_env(portal.token)
    args = portal.args(slide_20x)
    args[args.index(ACCESSION)] = "S-404"
    line = _one_line_error(capsys, args)
    assert "no case 'S-404' of cohort 'send-cohort'" in line


def test_slide_refused_by_ingest_shows_the_servers_reason(portal, token_env, capsys):
    from portal.cases.models import Slide

    token_env(portal.token)
    patch = shared_slide("kather-patch-1.tif")
    line = _one_line_error(capsys, portal.args(patch, "--mag", "native"))
    slide = Slide.objects.get(case_id=portal.case_id)
    assert slide.status == "failed"
    assert f"the server refused the slide: {slide.failure_reason}" in line


def test_native_dicom_folder_is_sent_zipped_and_ingest_answers_with_its_reason(
    portal, token_env, capsys
):
    from portal.cases.models import Slide

    token_env(portal.token)
    folder = shared_slide("dicom-jpeg")
    line = _one_line_error(capsys, portal.args(folder, "--mag", "native"))
    slide = Slide.objects.get(case_id=portal.case_id)
    assert slide.original_name == "dicom-jpeg.zip"  # unpacked by the server, then opened
    assert slide.status == "failed" and "5x" in slide.failure_reason  # far coarser than 5x
    assert slide.failure_reason in line


def test_corrupt_slide_is_one_line_error_before_anything_is_sent(portal, token_env, capsys):
    from portal.uploads.models import Upload

    token_env(portal.token)
    line = _one_line_error(capsys, portal.args(shared_slide("broken.svs")))
    assert "broken.svs" in line
    assert not Upload.objects.exists()


def test_mirax_in_native_mode_is_refused_with_what_to_do(tmp_path, token_env, capsys):
    token_env("t")
    mrxs = tmp_path / "slide.mrxs"
    mrxs.write_bytes(b"[GENERAL]\n")
    args = ["send", str(mrxs), "--server", "http://127.0.0.1:9", "--case", "1"]
    line = _one_line_error(capsys, [*args, "--mag", "native", "--work-dir", str(tmp_path)])
    assert "--mag 5" in line


def test_unreachable_server_retries_then_one_line_error_in_a_real_process(slide_20x, tmp_path):
    port = _closed_port()
    env = {**os.environ, "LOWMAG_TOKEN": "lmg_x", "OMP_WAIT_POLICY": "PASSIVE"}
    args = ["send", str(slide_20x), "--server", f"http://127.0.0.1:{port}", "--case", "1"]
    args += ["--work-dir", str(tmp_path), "--retries", "1", "--retry-wait", "0.1"]
    result = subprocess.run(
        [sys.executable, "-m", "analysis.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lowmag send: error: cannot reach http://127.0.0.1:")
    assert "connection refused after 2 attempts" in last
