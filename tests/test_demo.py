"""`manage.py demo` (what `make demo` runs), end to end on a tiny model and cohort."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _demo(data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOWMAG_DATA_DIR": str(data_dir), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("DATABASE_URL", None)  # the embedded default: SQLite under the data folder
    env.pop("REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "manage.py", "demo", "--no-serve", "--small"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_demo_trains_a_model_analyses_every_case_and_reuses_everything_the_second_time(tmp_path):
    first = _demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("analysis succeeded") == 3, first.stdout
    assert "log in as pathologist / lowmag-demo" in first.stdout
    assert "demo model, not for diagnosis" in first.stdout
    second = _demo(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the demo model" in second.stdout
    assert "scanning" not in second.stdout
