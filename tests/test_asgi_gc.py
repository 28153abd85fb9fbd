"""The serving process keeps the garbage collector's full passes rare (tile latency tail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import gc, json; before = gc.get_threshold(); import portal.asgi; "
    "print(json.dumps({'before': before, 'after': gc.get_threshold(), "
    "'frozen': gc.get_freeze_count()}))"
)


def _serving_process_gc() -> dict:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_asgi_freezes_the_startup_heap_and_makes_full_collections_rare():
    gc_state = _serving_process_gc()
    young, middle, _ = gc_state["before"]
    assert gc_state["frozen"] > 10_000
    # young collections as before; a full pass only after 1000 middle ones (default 10)
    assert gc_state["after"] == [young, middle, 1000]
