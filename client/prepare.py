"""The file ``lowmag send`` sends: by default a streaming low-magnification export
(``analysis.export``) cached in a work folder, so a re-run after a crash sends the very same
bytes; with ``magnification=None`` the original (a DICOM folder is zipped, a MIRAX slide refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.files import sha256_file, write_json_atomic
from client.errors import SendError

HASH_BLOCK_BYTES = 4 * 1024 * 1024
# Fixed timestamp for zipped DICOM entries: the same folder always zips to the same bytes,
# so a resumed upload of a re-made zip still matches the server's partial file.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass
class PreparedFile:
    """The exact bytes that will be uploaded, and where they came from."""

    path: Path
    upload_name: str  # the file name the server records
    sha256: str
    bytes: int
    source_path: Path
    source_bytes: int
    magnification: float | None  # None: the original is sent as is
    export: dict[str, Any] | None = None  # width, height, mpp, source level, ...; None: native
    reused: bool = False  # an earlier run's export (or zip) was reused
    owned: bool = False  # ``path`` was made here (export, zip), not the caller's original
    timings: dict[str, float] = field(default_factory=dict)  # export_s, hash_s

    def discard(self) -> None:
        """Remove the export (or zip) once the server has it; never touches an original."""
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.path.with_suffix(".json").unlink(missing_ok=True)


def prepare_file(
    slide: str | Path,
    magnification: float | None,
    work_dir: str | Path,
    *,
    quality: int = 80,
    mpp: float | None = None,
) -> PreparedFile:
    """The file to upload: a cached low-mag export, or the original (``magnification=None``)."""
    slide = Path(slide)
    if not slide.exists():
        raise SendError(f"{slide}: no such file or folder; check the slide's path")
    if magnification is None:
        return _prepare_native(slide, Path(work_dir))
    return _prepare_export(slide, float(magnification), Path(work_dir), quality, mpp)


def _prepare_export(
    slide: Path, magnification: float, work_dir: Path, quality: int, mpp: float | None
) -> PreparedFile:
    from analysis.export import export_lowmag, path_bytes

    key = _source_key(slide, f"{magnification:g}x|q{quality}|mpp{mpp}")
    out = work_dir / "exports" / f"{_stem(slide)}-{key}-{magnification:g}x.tiff"
    meta_path = out.with_suffix(".json")
    _remove_stale_parts(out)
    meta = _read_json(meta_path)
    timings: dict[str, float] = {}
    reused = _export_still_valid(out, meta)
    if not reused:
        t0 = time.perf_counter()
        result = export_lowmag(slide, out, magnification=magnification, quality=quality, mpp=mpp)
        timings["export_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        meta = {
            "sha256": sha256_file(out),
            "bytes": result.bytes,
            "mtime_ns": out.stat().st_mtime_ns,
            "export": {
                "width": result.width,
                "height": result.height,
                "mpp": result.mpp,
                "magnification": result.magnification,
                "quality": quality,
                "source_width": result.source_width,
                "source_height": result.source_height,
                "source_mpp": result.source_mpp,
                "source_level": result.source_level,
                "size_ratio": result.size_ratio,
            },
        }
        timings["hash_s"] = time.perf_counter() - t0
        _write_json(meta_path, meta)
    assert meta is not None
    return PreparedFile(
        path=out,
        upload_name=f"{_stem(slide)}.{magnification:g}x.tiff",
        sha256=meta["sha256"],
        bytes=int(meta["bytes"]),
        source_path=slide,
        source_bytes=path_bytes(slide),
        magnification=magnification,
        export=meta["export"],
        reused=reused,
        owned=True,
        timings=timings,
    )


def _remove_stale_parts(out: Path, older_than_s: float = 3600.0) -> None:
    """Half-written exports of runs that were killed (a live run's file is younger)."""
    if not out.parent.is_dir():
        return
    now = time.time()
    for part in out.parent.glob(f".{out.name}.*.part"):
        try:
            if now - part.stat().st_mtime > older_than_s:
                part.unlink()
        except OSError:
            continue


def _export_still_valid(out: Path, meta: dict | None) -> bool:
    if meta is None or not out.is_file():
        return False
    stat = out.stat()
    return stat.st_size == meta.get("bytes") and stat.st_mtime_ns == meta.get("mtime_ns")


def _prepare_native(slide: Path, work_dir: Path) -> PreparedFile:
    from analysis.export import path_bytes

    timings: dict[str, float] = {}
    reused = False
    if slide.is_dir():
        path, reused = _zip_dicom_folder(slide, work_dir, timings)
        upload_name = f"{_stem(slide)}.zip"
    elif slide.suffix.lower() == ".mrxs":
        raise SendError(
            f"{slide}: a MIRAX slide is a .mrxs file plus a data folder, which --mag native "
            "does not send; send its 5x export instead (--mag 5)"
        )
    else:
        path, upload_name = slide, slide.name
    t0 = time.perf_counter()
    sha256 = sha256_file(path)
    timings["hash_s"] = time.perf_counter() - t0
    return PreparedFile(
        path=path,
        upload_name=upload_name,
        sha256=sha256,
        bytes=path.stat().st_size,
        source_path=slide,
        source_bytes=path_bytes(slide),
        magnification=None,
        reused=reused,
        owned=slide.is_dir(),
        timings=timings,
    )


def _zip_dicom_folder(folder: Path, work_dir: Path, timings: dict[str, float]) -> tuple[Path, bool]:
    """One DICOM series folder -> an uncompressed zip the server unpacks (same bytes every time)."""
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    others = [p.name for p in files if not (p.is_file() and p.suffix.lower() == ".dcm")]
    if not files or others:
        shown = ", ".join(others[:3]) or "nothing"
        raise SendError(
            f"{folder}: only a folder holding one DICOM series (.dcm files) can be sent as is, "
            f"but it holds {shown}; send a single-file slide, or its 5x export (--mag 5)"
        )
    out = work_dir / "zips" / f"{_stem(folder)}-{_source_key(folder, 'zip')}.zip"
    if out.is_file():
        return out, True
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for path in files:
                info = zipfile.ZipInfo(f"{folder.name}/{path.name}", date_time=ZIP_DATE_TIME)
                info.external_attr = 0o644 << 16
                with open(path, "rb") as src, archive.open(info, "w", force_zip64=True) as dst:
                    while block := src.read(HASH_BLOCK_BYTES):
                        dst.write(block)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SendError(f"{folder}: cannot zip the DICOM series into {out.parent}: {exc}") from exc
    timings["zip_s"] = time.perf_counter() - t0
    return out, False


def _source_key(slide: Path, extra: str) -> str:
    """Changes when the source file (or folder) or the export settings change."""
    entries = [slide] if slide.is_file() else sorted(p for p in slide.rglob("*") if p.is_file())
    parts = [str(slide.resolve()), extra]
    for path in entries:
        stat = path.stat()
        parts.append(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:12]


def _stem(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem if path.is_file() else path.name)
    return stem.strip("._")[:80] or "slide"


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict) -> None:
    """Atomically: a process killed mid-write leaves the previous record, never half of one."""
    write_json_atomic(path, value, indent=1)
