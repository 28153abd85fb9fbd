"""The web server as deployed (``python -m portal.web``: uvicorn, httptools, uvloop, websockets).

Against real processes: the browser tests' portal (``tests.browser_fixtures.portal``, served by
``portal.web``) and, where options differ, a second server on the same database. Covers what
changing the server could break: websockets with the session's user, forwarded headers believed
only from the configured proxies, no server banner, a clean stop with websockets open, and bad
options refused with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from portal import web
from tests.browser_fixtures import PASSWORD, _free_port, _portal_env, _wait_healthy
from tests.conftest import REPO_ROOT, page_login

pytestmark = pytest.mark.timeout(120)


def _login(url: str, username: str = "path_a") -> requests.Session:
    return page_login(url, username, PASSWORD)


def _ws(url: str, path: str, session: requests.Session | None = None):
    cookie = "; ".join(f"{k}={v}" for k, v in (session.cookies.items() if session else []))
    return connect(
        url.replace("http://", "ws://") + path,
        origin=url,  # type: ignore[arg-type]
        additional_headers={"Cookie": cookie} if cookie else None,
        open_timeout=10,
        close_timeout=5,
    )


@contextmanager
def _server(portal: dict, *options: str, **env: str):
    """A second web server on the browser portal's database, with other options."""
    tmp = Path(portal["db"]).parent
    port = _free_port()
    log = (tmp / f"web-{port}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "portal.web", "--port", str(port), *options],
        cwd=REPO_ROOT,
        env={**_portal_env(tmp), **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        yield url, process
        log.flush()
        assert "Traceback" not in Path(log.name).read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()


def test_the_default_options_serve_fast_and_believe_no_forwarded_header():
    options = web.server_options(web.parse_args([]))
    assert (options["http"], options["loop"], options["ws"]) == (
        "httptools",
        "uvloop",
        "websockets-sansio",
    )
    assert options["proxy_headers"] is False
    assert options["access_log"] is False and options["server_header"] is False
    assert options["lifespan"] == "off"
    assert (options["host"], options["port"], options["workers"]) == ("127.0.0.1", 8000, 1)
    assert options["timeout_keep_alive"] == web.KEEPALIVE_S
    behind = web.server_options(web.parse_args(["--proxy-headers", "--host", "0.0.0.0"]))
    assert behind["proxy_headers"] is True and behind["forwarded_allow_ips"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "0"], {}, "--port must be 1-65535, not 0"),
        (["--workers", "0"], {}, "--workers must be at least 1, not 0"),
        ([], {"LOWMAG_WEB_PORT": "eighty"}, "LOWMAG_WEB_PORT must be a whole number, not 'eighty'"),
        (["--keepalive", "0"], {}, "--keepalive must be at least 1 second, not 0"),
        (
            [],
            {"LOWMAG_WEB_LOG_LEVEL": "loud"},
            "--log-level must be one of critical, error, warning, info, debug, trace, not 'loud'",
        ),
    ],
)
def test_bad_options_are_refused_with_one_line(argv, env, message):
    done = subprocess.run(
        [sys.executable, "-m", "portal.web", *argv],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_pages_and_tiles_carry_no_server_banner(portal):
    session = _login(portal["url"])
    for path in ("/healthz", "/", f"/slides/{portal['slide_a']}_files/0/0_0.jpeg"):
        response = session.get(portal["url"] + path, timeout=10)
        assert response.status_code == 200, (path, response.status_code)
        assert "server" not in {name.lower() for name in response.headers}, path


def test_the_worklist_websocket_knows_the_signed_in_user(portal):
    session = _login(portal["url"])
    with _ws(portal["url"], "/ws/worklist/", session) as socket:
        hello = json.loads(socket.recv(timeout=10))
    assert hello["type"] == "worklist.hello" and hello["cohorts"] >= 1


def test_a_websocket_without_a_session_is_refused(portal):
    with pytest.raises((InvalidStatus, ConnectionClosed)) as refused:
        with _ws(portal["url"], "/ws/worklist/") as socket:
            socket.recv(timeout=10)
    if isinstance(refused.value, InvalidStatus):
        assert refused.value.response.status_code == 403
    else:
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 4401


def _metrics_status(url: str, forwarded_for: str | None) -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return requests.get(f"{url}/metrics", headers=headers, timeout=10).status_code


def test_a_forwarded_address_is_ignored_without_proxy_headers(portal):
    # /metrics answers loopback only (no METRICS_TOKEN): a forged header must not change that
    assert _metrics_status(portal["url"], None) == 200
    assert _metrics_status(portal["url"], "203.0.113.9") == 200


def test_proxy_headers_are_believed_only_from_the_allowed_proxies(portal):
    with _server(portal, "--proxy-headers") as (url, _):
        assert _metrics_status(url, None) == 200
        assert _metrics_status(url, "203.0.113.9") == 401  # the client behind nginx
    with _server(portal, "--proxy-headers", LOWMAG_FORWARDED_ALLOW_IPS="10.0.0.1") as (url, _):
        assert _metrics_status(url, "203.0.113.9") == 200  # not from that proxy: ignored


def test_a_stop_closes_open_websockets_and_exits_promptly(portal):
    session = _login(portal["url"])
    with _server(portal) as (url, process), _ws(url, "/ws/worklist/", session) as socket:
        assert json.loads(socket.recv(timeout=10))["type"] == "worklist.hello"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            socket.recv(timeout=web.GRACEFUL_SHUTDOWN_S + 5)
        # uvicorn finishes its shutdown, then re-raises the signal: the status says "terminated"
        assert process.wait(timeout=web.GRACEFUL_SHUTDOWN_S + 5) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < web.GRACEFUL_SHUTDOWN_S + 5


def test_nginx_drops_idle_upstream_connections_before_the_web_server_does():
    """Otherwise nginx may send a request on a connection the server is closing: a 502."""
    import re

    conf = (REPO_ROOT / "deploy" / "nginx.conf").read_text()
    upstream = re.search(r"upstream lowmag_web \{(.*?)\n\}", conf, flags=re.S)
    assert upstream is not None and re.search(r"^\s*keepalive \d+;", upstream[1], flags=re.M)
    nginx_idle = re.search(r"keepalive_timeout (\d+)s;", upstream[1])
    assert nginx_idle is not None
    assert int(nginx_idle[1]) < web.KEEPALIVE_S
