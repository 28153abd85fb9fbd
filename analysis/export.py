"""Write the low-magnification copy of a slide that a hospital sends (SPEC §1, §2).

The source is read through ``analysis.slides`` from the pyramid level with the largest
downsample still at least as fine as the target (10% tolerance), strip by strip, and shrunk
with Pillow's antialiased LANCZOS filter (the same filter ``Slide.read_patch`` uses, so a 5x
patch of the export matches a 5x read of the source). The output is an Aperio-style
pyramidal JPEG TIFF with ``MPP = 10 / magnification`` and ``AppMag = magnification``; the
source's label and macro images travel with it. It is written under a temporary name in the
destination folder and renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from analysis.errors import AnalysisError
from analysis.slides import RESAMPLE_FILTER, Slide, mpp_for_magnification, open_slide
from analysis.tiffio import write_pyramidal_tiff

STRIP_PX = 256  # output rows per strip
CHUNK_PX = 2048  # output columns read per source region
LANCZOS_LOBES = 3  # the filter's support is this many output pixels on each side
COPY_TOLERANCE = 0.01  # a level this close to the target mpp is copied pixel for pixel


@dataclass
class ExportResult:
    """The written export and what it was made from."""

    path: Path
    width: int
    height: int
    mpp: float
    bytes: int
    magnification: float
    source_path: Path
    source_width: int
    source_height: int
    source_mpp: float
    source_bytes: int
    source_level: int  # the source pyramid level the pixels were read from

    @property
    def size_ratio(self) -> float:
        """Source bytes on disk per export byte."""
        return self.source_bytes / self.bytes if self.bytes else math.inf


def export_lowmag(
    src: str | Path,
    dst: str | Path,
    magnification: float = 5,
    quality: int = 80,
    mpp: float | None = None,
) -> ExportResult:
    """Export ``src`` at ``magnification`` to ``dst``; ``mpp`` overrides/supplies the source scale.

    Raises MagnificationUnavailableError when the source is coarser than the target, and
    AnalysisError when the destination cannot be written (nothing is left behind).
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    src, dst = Path(src), Path(dst)
    target_mpp = mpp_for_magnification(magnification)
    with open_slide(src, mpp=mpp) as slide:
        level = slide.level_for_mpp(target_mpp)
        width, height = _output_size(slide, level, target_mpp)
        associated: dict[str, Image.Image] = {
            name: slide.associated_image(name)
            for name in ("label", "macro")
            if name in slide.associated_image_names
        }
        strips = _StripReader(slide, level, target_mpp, width, height)
        _write_atomically(
            dst,
            src,
            magnification,
            lambda tmp: write_pyramidal_tiff(
                tmp,
                width,
                height,
                strips.read_rows,
                mpp=target_mpp,
                app_mag=magnification,
                quality=quality,
                tile=STRIP_PX,
                associated=associated,
                properties=_provenance(slide),
            ),
        )
        return ExportResult(
            path=dst,
            width=width,
            height=height,
            mpp=target_mpp,
            bytes=dst.stat().st_size,
            magnification=float(magnification),
            source_path=src,
            source_width=slide.dimensions[0],
            source_height=slide.dimensions[1],
            source_mpp=slide.mpp,
            source_bytes=path_bytes(src),
            source_level=level,
        )


def path_bytes(path: str | Path) -> int:
    """Size on disk of a slide: the file, or every file of a slide folder (DICOM series)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _output_size(slide: Slide, level: int, target_mpp: float) -> tuple[int, int]:
    """The export's pixel size: the level's own when it already is at the target mpp."""
    if abs(slide.level_mpps[level] / target_mpp - 1.0) <= COPY_TOLERANCE:
        return slide.level_dimensions[level]
    scale = slide.mpp / target_mpp  # output pixels per level-0 pixel
    w, h = slide.dimensions
    return max(1, round(w * scale)), max(1, round(h * scale))


def _provenance(slide: Slide) -> dict[str, str]:
    w, h = slide.dimensions
    props = {
        "Source": slide.name,
        "SourceSize": f"{w}x{h}",
        "SourceMPP": f"{slide.mpp:.6g}",
    }
    if slide.objective_power is not None:
        props["SourceAppMag"] = f"{slide.objective_power:g}"
    return props


class _StripReader:
    """Serves output rows by reading and shrinking the matching source region, chunk by chunk."""

    def __init__(
        self, slide: Slide, level: int, target_mpp: float, width: int, height: int
    ) -> None:
        self.slide = slide
        self.level = level
        self.downsample = slide.level_downsamples[level]
        self.level_w, self.level_h = slide.level_dimensions[level]
        self.width, self.height = width, height
        # level pixels per output pixel, per axis (exact: the output spans the whole level)
        self.rx = self.level_w / width
        self.ry = self.level_h / height
        self.identity = width == self.level_w and height == self.level_h

    def read_rows(self, y0: int, rows: int) -> np.ndarray:
        """(rows, width, 3) uint8 output rows [y0, y0 + rows)."""
        chunks = [
            self._read_block(x0, y0, min(CHUNK_PX, self.width - x0), rows)
            for x0 in range(0, self.width, CHUNK_PX)
        ]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=1)

    def _read_block(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        if self.identity:
            return self._read_level(x0, y0, w, h)
        lx0, lx1 = self._span(x0, w, self.rx, self.level_w)
        ly0, ly1 = self._span(y0, h, self.ry, self.level_h)
        region = self._read_level(lx0, ly0, lx1 - lx0, ly1 - ly0)
        box = (
            x0 * self.rx - lx0,
            y0 * self.ry - ly0,
            (x0 + w) * self.rx - lx0,
            (y0 + h) * self.ry - ly0,
        )
        image = Image.fromarray(region).resize((w, h), RESAMPLE_FILTER, box=box)
        return np.asarray(image)  # (h, w, 3)

    @staticmethod
    def _span(start: int, n: int, ratio: float, limit: int) -> tuple[int, int]:
        """Level-pixel range covering output [start, start + n) plus the filter's reach, clipped."""
        pad = math.ceil(LANCZOS_LOBES * max(ratio, 1.0)) + 2
        lo = max(0, math.floor(start * ratio) - pad)
        hi = min(limit, math.ceil((start + n) * ratio) + pad)
        return lo, hi

    def _read_level(self, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        l0_xy = (round(lx * self.downsample), round(ly * self.downsample))
        return self.slide.read_region_rgb(l0_xy, self.level, (w, h))  # (h, w, 3)


def _write_atomically(dst: Path, src: Path, magnification: float, write) -> None:
    """Run ``write(tmp_path)`` on a temporary file beside ``dst``, then rename it to ``dst``."""
    what = f"{src.name}: cannot write the {magnification:g}x export to {dst}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
        os.close(fd)
    except OSError as exc:
        raise AnalysisError(f"{what}: {_os_reason(exc, dst.parent)}") from exc
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AnalysisError(f"{what}: {_os_reason(exc, dst.parent)}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _os_reason(exc: OSError, folder: Path) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk holding {folder} is full; free space or choose another destination"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write in {folder}; choose a writable destination"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{folder} is not a folder; choose a destination inside a folder"
    return f"{exc.strerror or exc}; choose another destination"
