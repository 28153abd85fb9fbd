"""Shared fixtures.

Analysis fixtures: the real slide files in ``../shared/slides`` (tests skip with a reason
when the folder is absent) and small synthetic slides made once per session.
Portal fixtures (users and cohorts) live in ``tests/portal_fixtures.py``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_SLIDES = REPO_ROOT.parent / "shared" / "slides"

pytest_plugins = [
    *(["tests.portal_fixtures"] if (Path(__file__).parent / "portal_fixtures.py").exists() else []),
    "tests.browser_fixtures",  # one served portal and one Chromium for all browser test modules
]


@pytest.fixture(scope="session", autouse=True)
def _tasks_run_in_the_callers_thread():
    """Tasks run synchronously unless a test starts a real worker (see test_worker.py)."""
    from django.conf import settings

    settings.LOWMAG_TASK_MODE = os.environ.get("LOWMAG_TEST_TASK_MODE", "sync")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(int(os.environ.get("LOWMAG_TORCH_THREADS", "2")))


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's test database, and before it is dropped: PostgreSQL sessions that
    threads of this process left open (tile and ``sync_to_async`` pools) closed, so the drop
    does not fail with "database is being accessed by other users"."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """The folder of real vendor slides; skip when this checkout has no ``../shared/slides``."""
    if not SHARED_SLIDES.is_dir():
        pytest.skip(
            f"real slide files not found at {SHARED_SLIDES} (they live beside the repository)"
        )
    return SHARED_SLIDES


def page_login(base: str, username: str, password: str):
    """A ``requests`` session signed in through the login page of a served portal."""
    import requests

    session = requests.Session()
    session.get(f"{base}/login/", timeout=10)
    answer = session.post(
        f"{base}/login/",
        data={
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": session.cookies.get("csrftoken", ""),
        },
        headers={"Referer": f"{base}/login/"},
        timeout=10,
    )
    assert "sessionid" in session.cookies, f"login failed: {answer.status_code}"
    return session


def shared_slide(name: str) -> Path:
    path = SHARED_SLIDES / name
    if not path.exists():
        pytest.skip(f"real slide file {path} not present")
    return path


@pytest.fixture(autouse=True)
def _fresh_throttle_counts():
    """Throttle counters live in the shared cache: each test starts from none."""
    yield
    from django.core.cache import cache

    cache.delete("throttle_wrong_token_127.0.0.1")


# -- the services pass ----------------------------------------------------------------------
# .ci/run runs the suite twice: on the embedded defaults (SQLite, no Redis), then with
# LOWMAG_SERVICES_PASS=1 on PostgreSQL and Redis. The second pass runs what those can change;
# a test that touches neither (the science library's, the command line's, the browser tests'
# portal, which is always SQLite without Redis) gives the same answer twice and runs once.

# a module that names none of these neither imports the portal nor starts it in a subprocess
# (which would inherit DATABASE_URL and REDIS_URL)
SERVICE_WORDS = ("django", "portal", "manage.py", "DATABASE_URL", "REDIS_URL", "celery")
SERVICE_WORDS += ("channels", "rest_framework", "psycopg", "redis")
SERVICE_FIXTURES = {"db", "transactional_db", "django_db_setup", "client", "async_client"}
SERVICE_FIXTURES |= {"admin_client", "admin_user", "django_user_model", "live_server"}
SERVICE_FIXTURE_MODULES = ("tests.portal_fixtures",)  # users, cohorts, cases: the database
SELF_CONTAINED_FIXTURE_MODULES = ("tests.browser_fixtures",)  # SQLite, no Redis, in both passes


@functools.cache
def _mentions_services(path: str) -> bool:
    text = Path(path).read_text()
    return any(word in text for word in SERVICE_WORDS)


def _fixture_modules(item) -> set[str]:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {
        getattr(defs[-1].func, "__module__", "") or ""
        for name, defs in info.name2fixturedefs.items()
        if defs and name in item.fixturenames and not name.startswith("_")  # not the autouse
    }


def _needs_services(item) -> bool:
    modules = _fixture_modules(item)
    if any(m.startswith(SELF_CONTAINED_FIXTURE_MODULES) for m in modules):
        return False
    if item.get_closest_marker("django_db") or item.get_closest_marker("production"):
        return True
    if SERVICE_FIXTURES & set(item.fixturenames):
        return True
    if any(m.startswith(SERVICE_FIXTURE_MODULES) for m in modules):
        return True
    return _mentions_services(str(item.path))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LOWMAG_SERVICES_PASS") != "1":
        return
    kept, once = [], []
    for item in items:
        (kept if _needs_services(item) else once).append(item)
    if once:
        config.hook.pytest_deselected(items=once)
        items[:] = kept
        config._lowmag_ran_once = len(once)


def pytest_terminal_summary(terminalreporter, config):
    ran_once = getattr(config, "_lowmag_ran_once", 0)
    if ran_once:
        terminalreporter.write_line(
            f"services pass: {ran_once} tests that touch neither the database nor Redis "
            "ran in the first pass and are left out of this one"
        )
