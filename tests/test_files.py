"""analysis.files: the one copy of each file helper."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from analysis.files import json_ready, sha256_file, write_json_atomic, write_markdown_section


def test_sha256_file_matches_hashlib_across_block_boundaries(tmp_path):
    data = np.random.default_rng(0).bytes(3 * 1000 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, block=1000) == hashlib.sha256(data).hexdigest()


def test_write_json_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "state.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2}, indent=None)
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_json_ready_makes_numpy_paths_and_nan_plain():
    value = {1: (np.float32(0.5), np.int64(3)), "p": Path("/x"), "a": np.arange(2), "n": np.nan}
    assert json_ready(value) == {"1": [0.5, 3], "p": "/x", "a": [0, 1], "n": None}
    json.dumps(json_ready(value), allow_nan=False)


def test_write_markdown_section_replaces_only_its_section(tmp_path):
    readme = tmp_path / "README.md"
    write_markdown_section(readme, "## A", "## A\n\none\n\n")
    write_markdown_section(readme, "## B", "## B\n\ntwo\n")
    write_markdown_section(readme, "## A", "## A\n\nthree\n\n")
    assert readme.read_text() == "# Benchmarks\n\n## A\n\nthree\n\n## B\n\ntwo\n"
