"""Shared fixtures.

Analysis fixtures: the real slide files in ``../shared/slides`` (tests skip with a reason
when the folder is absent) and small synthetic slides made once per session.
Portal fixtures (users and cohorts) live in ``tests/portal_fixtures.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_SLIDES = REPO_ROOT.parent / "shared" / "slides"

pytest_plugins = [
    *(["tests.portal_fixtures"] if (Path(__file__).parent / "portal_fixtures.py").exists() else []),
    "tests.browser_fixtures",  # one daphne portal and one Chromium for all browser test modules
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
def shared_slides() -> Path:
    """The folder of real vendor slides; skip when this checkout has no ``../shared/slides``."""
    if not SHARED_SLIDES.is_dir():
        pytest.skip(
            f"real slide files not found at {SHARED_SLIDES} (they live beside the repository)"
        )
    return SHARED_SLIDES


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
