"""File helpers every part of LowMag uses: one SHA-256 of a file, one atomic JSON writer."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

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
