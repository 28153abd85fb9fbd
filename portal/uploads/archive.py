"""Unpack a multi-file slide (a DICOM series, a MIRAX slide) that arrived as one .zip.

Every entry is checked before a byte is written: no absolute paths, no ``..``, no symlinks
or other special files, no encryption, a cap on the number of entries and on the total
uncompressed size, and on the expansion ratio: no entry may expand more than ``MAX_RATIO``
times, the entries' compressed data may not overlap (one deflate stream named by many
entries) and may not add up to more than the file, so a bomb is refused before anything is
written. The archive must hold exactly one slide and nothing else:

- a DICOM series: ``.dcm`` files, all in one folder;
- a MIRAX slide: one ``.mrxs`` file and the files of its data folder (same name, no suffix).

The slide lands directly in ``dest`` (its folder prefix inside the zip is dropped), so
``dest`` is the slide's own folder whatever the zip's layout was.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

COPY_CHUNK_BYTES = 1024 * 1024
MAX_ENTRIES = 20_000
# Slide data (JPEG tiles, DICOM frames) barely compresses; deflate's best is about 1000:1.
MAX_RATIO = 100
RATIO_FREE_BYTES = 1024 * 1024  # small files (XML, indexes) may compress as well as they like
# Files that archivers add on their own; skipped rather than refused.
_IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
_IGNORED_TOP_FOLDERS = {"__MACOSX"}


class UnsafeArchiveError(ValueError):
    """The zip is unreadable, escapes its folder, is too large, or is not exactly one slide."""


@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    path: PurePosixPath  # normalised name inside the zip


def extract_slide_archive(zip_path: Path, dest: Path, max_total_bytes: int) -> Path:
    """Unpack the one slide in ``zip_path`` into ``dest``; return what to open (file or folder).

    Raises UnsafeArchiveError before writing anything when a check on the entries fails, and
    while writing if the data turns out larger than declared. The caller owns ``dest`` and
    removes it on failure.
    """
    try:
        with zipfile.ZipFile(zip_path) as archive:
            entries = _checked_entries(archive, max_total_bytes)
            _check_expansion(entries, zip_path.stat().st_size)
            prefix, opened = _slide_layout(entries)
            _write_entries(archive, entries, prefix, dest, max_total_bytes)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError) as exc:
        raise UnsafeArchiveError(f"not a readable zip archive ({exc})") from exc
    except (FileExistsError, NotADirectoryError) as exc:
        raise UnsafeArchiveError(
            "the zip holds two entries named "
            f"{Path(str(exc.filename or '?')).name!r}; zip each file once"
        ) from exc
    return dest / opened


def _checked_entries(archive: zipfile.ZipFile, max_total_bytes: int) -> list[_Entry]:
    infos = archive.infolist()
    if len(infos) > MAX_ENTRIES:
        raise UnsafeArchiveError(f"the zip holds {len(infos)} entries (at most {MAX_ENTRIES})")
    entries: list[_Entry] = []
    total = 0
    for info in infos:
        path = _safe_name(info)
        _refuse_special(info)
        if info.is_dir() or _ignored(path):
            continue
        total += info.file_size
        if total > max_total_bytes:
            raise UnsafeArchiveError(
                f"the zip expands to more than {max_total_bytes} bytes; refusing to unpack it"
            )
        entries.append(_Entry(info, path))
    return entries


def _check_expansion(entries: list[_Entry], zip_bytes: int) -> None:
    """Refuse zip bombs from the directory alone: ratio per entry, overlapping data."""
    compressed = 0
    for entry in entries:
        info = entry.info
        compressed += info.compress_size
        if info.file_size > max(RATIO_FREE_BYTES, MAX_RATIO * info.compress_size):
            raise UnsafeArchiveError(
                f"zip entry {ascii(info.filename)} would expand {info.compress_size} bytes to "
                f"{info.file_size} (more than {MAX_RATIO}x); refusing a zip bomb"
            )
    offsets = sorted((e.info.header_offset, e.info.compress_size) for e in entries)
    overlapping = any(a[0] + a[1] > b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    if compressed > zip_bytes or overlapping:
        raise UnsafeArchiveError(
            "the zip's entries share or overstate their compressed data; refusing a zip bomb"
        )


def _safe_name(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename
    shown = ascii(name)
    if "\x00" in name:
        raise UnsafeArchiveError(f"zip entry {shown} has a NUL byte in its name")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UnsafeArchiveError(f"zip entry {shown} has an absolute path")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"zip entry {shown} points outside its folder ('..')")
    if not parts:
        raise UnsafeArchiveError(f"zip entry {shown} has an empty name")
    return PurePosixPath(*parts)


def _refuse_special(info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise UnsafeArchiveError(f"zip entry {ascii(info.filename)} is a symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchiveError(f"zip entry {ascii(info.filename)} is not a regular file")
    if info.flag_bits & 0x1:
        raise UnsafeArchiveError(f"zip entry {ascii(info.filename)} is encrypted")


def _ignored(path: PurePosixPath) -> bool:
    return path.name in _IGNORED_NAMES or path.parts[0] in _IGNORED_TOP_FOLDERS


def _slide_layout(entries: list[_Entry]) -> tuple[PurePosixPath, PurePosixPath]:
    """(prefix to drop from every entry, what to open relative to dest)."""
    paths = [e.path for e in entries]
    mrxs = [p for p in paths if p.suffix.lower() == ".mrxs"]
    dcm_folders = {p.parent for p in paths if p.suffix.lower() == ".dcm"}
    if len(mrxs) == 1 and not dcm_folders:
        return _mirax_layout(mrxs[0], paths)
    if not mrxs and len(dcm_folders) == 1:
        return _dicom_layout(dcm_folders.pop(), paths)
    if not mrxs and not dcm_folders:
        raise UnsafeArchiveError(
            "the zip holds no slide (no .dcm series and no .mrxs file); "
            "upload a single-file slide directly, or zip one DICOM series or one MIRAX slide"
        )
    raise UnsafeArchiveError(
        f"the zip holds more than one slide ({len(mrxs)} .mrxs files, "
        f"{len(dcm_folders)} DICOM folders); upload each slide on its own"
    )


def _dicom_layout(
    folder: PurePosixPath, paths: list[PurePosixPath]
) -> tuple[PurePosixPath, PurePosixPath]:
    stray = [p for p in paths if p.parent != folder or p.suffix.lower() != ".dcm"]
    _refuse_stray(stray, "a DICOM series")
    return folder, PurePosixPath(".")


def _mirax_layout(
    mrxs: PurePosixPath, paths: list[PurePosixPath]
) -> tuple[PurePosixPath, PurePosixPath]:
    data_folder = mrxs.parent / mrxs.stem
    stray = [p for p in paths if p != mrxs and data_folder not in p.parents]
    _refuse_stray(stray, "a MIRAX slide")
    return mrxs.parent, PurePosixPath(mrxs.name)


def _refuse_stray(stray: list[PurePosixPath], what: str) -> None:
    if stray:
        names = ", ".join(ascii(str(p)) for p in stray[:3])
        raise UnsafeArchiveError(
            f"besides {what} the zip holds {len(stray)} other file(s) ({names}); "
            "zip exactly one slide and nothing else"
        )


def _write_entries(
    archive: zipfile.ZipFile,
    entries: list[_Entry],
    prefix: PurePosixPath,
    dest: Path,
    max_total_bytes: int,
) -> None:
    root = dest.resolve()
    written = 0
    for entry in entries:
        target = (root / entry.path.relative_to(prefix)).resolve()
        if root not in target.parents:
            raise UnsafeArchiveError(
                f"zip entry {ascii(str(entry.path))} points outside its folder"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        written = _copy_entry(archive, entry, target, written, max_total_bytes)


def _copy_entry(
    archive: zipfile.ZipFile, entry: _Entry, target: Path, written: int, max_total_bytes: int
) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out, archive.open(entry.info) as src:
        entry_written = 0
        while chunk := src.read(COPY_CHUNK_BYTES):
            written += len(chunk)
            entry_written += len(chunk)
            if written > max_total_bytes or entry_written > entry.info.file_size:
                raise UnsafeArchiveError(
                    f"the zip expands to more than {max_total_bytes} bytes; refusing to unpack it"
                )
            out.write(chunk)
    return written
