"""The browser-test portal and Chromium, shared by every browser test module of a session.

``portal``: a throw-away portal (SQLite file, data folder, ``tests.test_browser.seed_portal``)
served by the web server as deployed (``python -m portal.web``) on a free port, stopped by PID
at the end. ``browser``: Debian's Chromium through Playwright. ``session``: one browser context (one user) per call, closed after the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, shared_slide

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "test-artifacts"
PASSWORD = "lowmag-browser-pw-7"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-unsafe-swiftshader",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _portal_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LOWMAG_REQUIRE_SERVICES")}
    env.update(
        DJANGO_SETTINGS_MODULE="portal.settings",
        LOWMAG_DATA_DIR=str(tmp / "data"),
        DATABASE_URL=f"sqlite:///{tmp / 'portal.sqlite3'}",
        DEBUG="false",
        LOWMAG_TASK_MODE="sync",
        OMP_WAIT_POLICY="PASSIVE",
        PYTHONPATH=str(REPO_ROOT),
    )
    return env


def _run(args: list[str], env: dict) -> str:
    done = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(args[:3])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the web server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the web server did not answer /healthz in time")


@pytest.fixture(scope="session")
def portal(tmp_path_factory):
    slide_src = shared_slide("cmu-1-small-region.svs")
    tmp = tmp_path_factory.mktemp("browser-portal")
    env = _portal_env(tmp)
    python = sys.executable
    _run([python, "manage.py", "migrate", "--noinput", "-v", "0"], env)
    seeded = _run(
        [
            python,
            "-c",
            "import django, json; django.setup(); from tests.test_browser import seed_portal; "
            f"print(json.dumps(seed_portal({str(slide_src)!r})))",
        ],
        env,
    )
    ids = json.loads(seeded.strip().splitlines()[-1])
    port = _free_port()
    log = (tmp / "web.log").open("w")
    server = subprocess.Popen(
        [python, "-m", "portal.web", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server)
        yield {"url": url, "db": tmp / "portal.sqlite3", "log": tmp / "web.log", **ids}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Session:
    """One browser context (one user), its page, console errors and failed responses."""

    def __init__(self, browser, portal, name: str):
        self.portal = portal
        self.name = name
        self.context = browser.new_context(
            viewport={"width": 1366, "height": 768}, accept_downloads=True
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.tiles: list[tuple[str, int]] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("response", self._on_response)
        self.step = 0
        ARTIFACTS.mkdir(exist_ok=True)

    def _on_response(self, response) -> None:
        if "_files/" in response.url:
            self.tiles.append((response.url, response.status))

    def url(self, path: str) -> str:
        return self.portal["url"] + path

    def shot(self, label: str) -> None:
        self.step += 1
        self.page.screenshot(path=str(ARTIFACTS / f"{self.name}-{self.step:02d}-{label}.png"))

    def login(self, username: str) -> None:
        self.page.goto(self.url("/"))
        assert "/login/" in self.page.url, "an anonymous visitor must land on the login page"
        self.page.fill("#id_username", username)
        self.page.fill("#id_password", PASSWORD)
        self.page.click("button[type=submit]")
        self.page.wait_for_selector("table.cases")

    def wait_js(self, expression: str, timeout_ms: int = 15000) -> None:
        self.page.wait_for_function(expression, timeout=timeout_ms)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def session(browser, portal, request):
    sessions: list[Session] = []

    def make(name: str) -> Session:
        s = Session(browser, portal, f"{request.node.name[5:40]}-{name}")
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.close()
