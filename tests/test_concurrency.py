"""Signing is ordinary use while colleagues annotate: it must not fail on a busy database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from django.db import OperationalError, connection

from tests.concurrent_writes import WRITERS, sign_and_amend_while_writing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(codes: dict) -> None:
    assert codes["sign"] == [200], codes["bodies"]
    assert codes["amend"] == [201, 201, 201], codes["bodies"]
    writes = Counter(codes["writes"])
    assert writes[201] > 0, writes
    assert set(writes) <= {201, 503}, writes  # a write may be asked to retry, never a 500


def test_sign_and_amend_succeed_while_eight_clients_write_on_embedded_sqlite(tmp_path):
    """A real SQLite file, as the embedded portal runs, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LOWMAG_REQUIRE_SERVICES")}
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'portal.sqlite3'}",
        LOWMAG_DATA_DIR=str(tmp_path / "data"),
        LOWMAG_TASK_MODE="sync",
        DJANGO_SETTINGS_MODULE="portal.settings",
        DJANGO_ALLOW_ASYNC_UNSAFE="true",
    )
    done = subprocess.run(
        [sys.executable, "-m", "tests.concurrent_writes"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _check(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.django_db(transaction=True)
def test_sign_and_amend_succeed_while_eight_clients_write_on_the_configured_database():
    if connection.vendor == "sqlite":
        pytest.skip("the in-memory test database is shared by threads; see the SQLite file test")
    _check(sign_and_amend_while_writing(WRITERS))


def test_a_database_still_locked_answers_json_503_with_retry_after(rf):
    from portal.core.middleware import SecurityHeadersMiddleware

    middleware = SecurityHeadersMiddleware(lambda request: None)
    response = middleware.process_exception(
        rf.post("/cases/1/"), OperationalError("database is locked")
    )
    assert response.status_code == 503
    assert response["Retry-After"] == "2"
    assert json.loads(response.content)["detail"].startswith("The database is busy")
