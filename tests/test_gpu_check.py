"""benchmarks/gpu_check.py runs on a CPU too and writes its JSON (small parts only here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_the_cpu_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu_check.json"
    argv = ["--device", "cpu", "--small", "--parts", "tissue,read", "--out", str(out)]
    assert module.main([*argv, "--size", "2048", "--work", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())
    names = [row["name"] for row in rows]
    assert names[0] == "environment" and names[-1] == "done"
    assert rows[0]["device"] == "cpu" and rows[-1]["errors"] == 0
    tissue = [row for row in rows if row["name"] == "tissue"]
    assert len(tissue) == 2 and all(row["cells"] > 10 for row in tissue)
    assert (tmp_path / "synthetic-2048.5x.svs").is_file()  # made, then measured
    assert any(row["name"] == "read" and row["patches_per_s"] > 0 for row in rows)
