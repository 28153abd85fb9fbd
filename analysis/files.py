"""File helpers every part of LowMag uses: one SHA-256 of a file, one atomic JSON writer, one
way to make values JSON-ready, one way to replace a section of a Markdown file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

HASH_BLOCK_BYTES = 4 * 1024 * 1024


def sha256_file(path: str | Path, block: int = HASH_BLOCK_BYTES) -> str:
    """Hex SHA-256 of the file's bytes, read in blocks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` as JSON so that a reader (or a process killed mid-write) sees the old
    file or the new one, never half of one: a temporary file beside it, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        tmp.write_text(json.dumps(value, indent=indent))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def json_ready(value: Any) -> Any:
    """``value`` with what ``json`` cannot write made plain: string keys, lists for tuples and
    arrays, numpy scalars as Python numbers, paths as strings, NaN as None (null)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_markdown_section(path: str | Path, heading: str, body: str) -> None:
    """Replace the section that starts with the line ``heading`` (up to the next ``## ``) by
    ``body``, or append ``body`` when there is none; the rest of the file is kept."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body + (text[end + 1 :] if end != -1 else "")
    path.write_text(text)
