"""Write tiled, pyramidal, JPEG-compressed, Aperio-style TIFFs in one streaming pass.

OpenSlide opens the result as vendor ``aperio`` with ``openslide.mpp-x/y`` and
``openslide.objective-power`` taken from the first page's description
(``Aperio Image Library ...|AppMag = 20|MPP = 0.5``).

Layout (Aperio's): page 0 = level 0 (tiled), page 1 = thumbnail (stripped), then the reduced
levels (tiled), then the associated images (``label``, ``macro``; stripped, named on the
second line of their description). The thumbnail is left out when the smallest level is
already thumbnail-sized, unless level 0 is the only level and label/macro follow: OpenSlide
reads any untiled second page as the thumbnail.

Streaming: the caller hands over horizontal strips of level 0. Each level keeps at most one
band of ``tile`` rows; a finished band is cut into tiles, JPEG-encoded and appended to the file
at once, and its area-average downsample is pushed to the next level. TIFF lets tile data sit
anywhere in the file, so the levels' tiles interleave as they are produced and every IFD is
written at the end. Memory is a few bands of level 0 whatever the slide size.

Tiles are encoded by Pillow as baseline JPEG, YCbCr with 4:2:0 chroma subsampling (what
scanners write; H&E colour is smooth, so chroma at half resolution costs little), each tile
a complete JPEG stream (no shared JPEGTables). The files are BigTIFF when their size could
exceed the 4 GiB of classic TIFF offsets.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

APERIO_HEADER = "Aperio Image Library v12.0.0"
THUMBNAIL_MAX_PX = 768  # longer side, as Aperio scanners write it
ASSOCIATED_SUBFILETYPES = {"label": 1, "macro": 9}
_CLASSIC_LIMIT = 2**32 - 1

# TIFF field types
_ASCII, _SHORT, _LONG, _RATIONAL, _LONG8 = 2, 3, 4, 5, 16
# TIFF compression and photometric values
_COMPRESSION_JPEG, _COMPRESSION_DEFLATE = 7, 8
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6

StripSource = Callable[[int, int], np.ndarray] | Iterable[np.ndarray]


@dataclass
class PyramidInfo:
    """What ``write_pyramidal_tiff`` wrote."""

    path: Path
    level_dimensions: list[tuple[int, int]]  # (width, height) per level
    associated_images: list[str]  # thumbnail (if written), then label/macro if given
    bytes: int
    bigtiff: bool


# -- public entry point --------------------------------------------------------------------------


def write_pyramidal_tiff(
    path: str | Path,
    width: int,
    height: int,
    strips: StripSource,
    *,
    mpp: float,
    app_mag: float,
    quality: int = 80,
    tile: int = 256,
    level_factor: int = 4,
    min_level_size: int = 512,
    associated: Mapping[str, Image.Image] | None = None,
    properties: Mapping[str, str] | None = None,
    bigtiff: bool | None = None,
    workers: int = 2,
) -> PyramidInfo:
    """Stream an Aperio-style pyramidal JPEG TIFF to ``path``.

    ``strips`` is either ``read_rows(y0, rows) -> (rows, width, 3) uint8`` (asked for bands of
    ``tile`` rows, top to bottom) or an iterable of (rows, width, 3) uint8 strips covering the
    image top to bottom. Levels shrink by ``level_factor`` (4 like Aperio, or 2) while the next
    level's longer side stays >= ``min_level_size``. ``associated`` maps ``label``/``macro`` to
    images; ``properties`` are extra ``key = value`` fields of the description.
    """
    _check_arguments(width, height, mpp, app_mag, quality, tile, level_factor)
    associated = dict(associated or {})
    unknown = set(associated) - set(ASSOCIATED_SUBFILETYPES)
    if unknown:
        raise ValueError(f"associated images must be label or macro, got {sorted(unknown)}")
    path = Path(path)
    dims = pyramid_dimensions(width, height, level_factor, min_level_size)
    if bigtiff is None:
        bigtiff = _needs_bigtiff(dims)
    thumbnail = _wants_thumbnail(dims, bool(associated))
    try:
        with open(path, "wb") as fh, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            writer = _TiffFile(fh, bigtiff)
            levels = _build_levels(writer, pool, dims, tile, quality, level_factor, thumbnail)
            _feed(levels[0], _iter_strips(strips, width, height, tile))
            pages = _pyramid_pages(
                levels, width, height, tile, quality, mpp, app_mag, properties, thumbnail
            )
            pages.extend(_associated_pages(writer, associated, quality))
            writer.finish(pages)
            size = fh.tell()
    except BaseException:
        path.unlink(missing_ok=True)  # never leave a truncated TIFF behind
        raise
    names = [n for n in ASSOCIATED_SUBFILETYPES if n in associated]
    return PyramidInfo(path, dims, ["thumbnail", *names] if thumbnail else names, size, bigtiff)


def pyramid_dimensions(
    width: int, height: int, level_factor: int = 4, min_level_size: int = 512
) -> list[tuple[int, int]]:
    """(width, height) of every level: each ``ceil(previous / level_factor)``."""
    dims = [(width, height)]
    while True:
        w, h = dims[-1]
        nw, nh = -(-w // level_factor), -(-h // level_factor)
        if max(nw, nh) < min_level_size or (nw, nh) == (w, h):
            return dims
        dims.append((nw, nh))


def aperio_description(
    width: int,
    height: int,
    *,
    mpp: float,
    app_mag: float,
    tile: int,
    quality: int,
    properties: Mapping[str, str] | None = None,
    reduced_to: tuple[int, int] | None = None,
) -> str:
    """The ImageDescription of an image page; OpenSlide parses the ``|key = value`` fields."""
    geometry = f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    if reduced_to is not None:
        geometry += f" -> {reduced_to[0]}x{reduced_to[1]}"
    fields = {"AppMag": f"{app_mag:g}", "MPP": f"{mpp:.6g}", **dict(properties or {})}
    body = "|".join(f"{_clean(k)} = {_clean(v)}" for k, v in fields.items())
    return f"{APERIO_HEADER} \r\n{geometry} JPEG/RGB Q={quality}|{body}"


def area_downsample(rows: np.ndarray, factor: int) -> np.ndarray:
    """Antialiased (area average) shrink of (H, W, 3) uint8 by ``factor``; size ceil(H/f, W/f).

    Partial blocks at the right and bottom edges average the pixels they hold.
    """
    return np.asarray(Image.fromarray(np.ascontiguousarray(rows)).reduce(factor))


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG, YCbCr 4:2:0, of (H, W, 3) uint8."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


# -- argument checks -----------------------------------------------------------------------------


def _check_arguments(
    width: int, height: int, mpp: float, app_mag: float, quality: int, tile: int, factor: int
) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if width > 2**31 or height > 2**31:
        raise ValueError(f"image size {width}x{height} exceeds TIFF limits")
    if not (mpp > 0 and math.isfinite(mpp)) or not (app_mag > 0 and math.isfinite(app_mag)):
        raise ValueError(f"mpp and app_mag must be positive numbers, got {mpp}, {app_mag}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile size must be a multiple of 16, got {tile}")
    if factor < 2 or tile % factor:
        raise ValueError(f"level factor must be >= 2 and divide the tile size, got {factor}")


def _needs_bigtiff(dims: list[tuple[int, int]]) -> bool:
    """JPEG never grows an image much beyond its raw size: bound the file by 1.25x raw."""
    raw = sum(w * h * 3 for w, h in dims)
    return raw * 1.25 + 64 * 2**20 > _CLASSIC_LIMIT


def _clean(text: object) -> str:
    return str(text).replace("|", "/").replace("\r", " ").replace("\n", " ")


# -- strips --------------------------------------------------------------------------------------


def _iter_strips(strips: StripSource, width: int, height: int, tile: int) -> Iterator[np.ndarray]:
    """Normalise the source to (rows, width, 3) uint8 strips and check they cover the image."""
    if callable(strips):
        source: Iterable[np.ndarray] = (
            strips(y0, min(tile, height - y0)) for y0 in range(0, height, tile)
        )
    else:
        source = strips
    done = 0
    for strip in source:
        strip = np.asarray(strip)
        if strip.ndim != 3 or strip.shape[1:] != (width, 3) or strip.dtype != np.uint8:
            raise ValueError(
                f"strip at row {done} has shape {strip.shape} {strip.dtype}; "
                f"expected (rows, {width}, 3) uint8"
            )
        done += strip.shape[0]
        if done > height:
            raise ValueError(f"strips cover {done} rows, more than the image height {height}")
        yield strip
    if done != height:
        raise ValueError(f"strips cover {done} rows, fewer than the image height {height}")


# -- pyramid levels ------------------------------------------------------------------------------


@dataclass
class _Level:
    """One pyramid level being written: buffers rows until a band of tiles is complete."""

    writer: _TiffFile
    pool: ThreadPoolExecutor
    width: int
    height: int
    tile: int
    quality: int
    factor: int
    child: _Level | None = None
    keep_pixels: bool = False  # the smallest level keeps its pixels for the thumbnail
    offsets: array = field(default_factory=lambda: array("Q"))
    counts: array = field(default_factory=lambda: array("Q"))
    pending: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0
    rows_done: int = 0
    kept: list[np.ndarray] = field(default_factory=list)

    def push(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.pending_rows += rows.shape[0]
        while self.pending_rows >= self.tile:
            self._emit(self._take(self.tile))

    def finish(self) -> None:
        if self.pending_rows:
            self._emit(self._take(self.pending_rows))
        if self.rows_done != self.height:
            raise ValueError(f"level {self.width}x{self.height} received {self.rows_done} rows")
        if self.child is not None:
            self.child.finish()

    def pixels(self) -> np.ndarray:
        return np.concatenate(self.kept, axis=0)  # (H, W, 3)

    def _take(self, n: int) -> np.ndarray:
        band = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        self.pending = [band[n:]] if band.shape[0] > n else []
        self.pending_rows = band.shape[0] - n
        return band[:n]

    def _emit(self, band: np.ndarray) -> None:
        """Encode and write one band (<= tile rows) of tiles, then feed the next level."""
        tiles = [self._tile_pixels(band, x) for x in range(0, self.width, self.tile)]
        for data in self.pool.map(encode_jpeg, tiles, [self.quality] * len(tiles)):
            offset = self.writer.append(data)
            self.offsets.append(offset)
            self.counts.append(len(data))
        self.rows_done += band.shape[0]
        if self.keep_pixels:
            self.kept.append(np.array(band))
        if self.child is not None:
            self.child.push(area_downsample(band, self.factor))

    def _tile_pixels(self, band: np.ndarray, x: int) -> np.ndarray:
        block = band[:, x : x + self.tile]
        ph, pw = self.tile - block.shape[0], self.tile - block.shape[1]
        if ph or pw:  # edge tile: repeat the edge (readers crop; no ringing into the image)
            block = np.pad(block, ((0, ph), (0, pw), (0, 0)), mode="edge")
        return block


def _build_levels(
    writer: _TiffFile,
    pool: ThreadPoolExecutor,
    dims: list[tuple[int, int]],
    tile: int,
    quality: int,
    factor: int,
    thumbnail: bool,
) -> list[_Level]:
    levels = [_Level(writer, pool, w, h, tile, quality, factor) for w, h in dims]
    for parent, child in zip(levels, levels[1:], strict=False):
        parent.child = child
    levels[-1].keep_pixels = thumbnail
    return levels


def _feed(level0: _Level, strips: Iterator[np.ndarray]) -> None:
    for strip in strips:
        level0.push(strip)
    level0.finish()


# -- pages ---------------------------------------------------------------------------------------


@dataclass
class _Page:
    """One IFD: image geometry, where its chunks are, and how they are encoded."""

    width: int
    height: int
    description: str
    offsets: array
    counts: array
    compression: int
    photometric: int
    subfiletype: int = 0
    tile: int | None = None  # None: one strip holding the whole image
    mpp: float | None = None


def _pyramid_pages(
    levels: list[_Level],
    width: int,
    height: int,
    tile: int,
    quality: int,
    mpp: float,
    app_mag: float,
    properties: Mapping[str, str] | None,
    thumbnail: bool,
) -> list[_Page]:
    def page(level: _Level) -> _Page:
        reduced = None if level is levels[0] else (level.width, level.height)
        desc = aperio_description(
            width,
            height,
            mpp=mpp,
            app_mag=app_mag,
            tile=tile,
            quality=quality,
            properties=properties,
            reduced_to=reduced,
        )
        level_mpp = mpp * width / level.width
        return _Page(
            level.width,
            level.height,
            desc,
            level.offsets,
            level.counts,
            _COMPRESSION_JPEG,
            _PHOTOMETRIC_YCBCR,
            tile=tile,
            mpp=level_mpp,
        )

    pages = [page(level) for level in levels]
    if not thumbnail:
        return pages
    thumb = _thumbnail(levels[-1].pixels())
    thumb_desc = aperio_description(
        width,
        height,
        mpp=mpp,
        app_mag=app_mag,
        tile=tile,
        quality=quality,
        properties=properties,
        reduced_to=(thumb.shape[1], thumb.shape[0]),
    )
    thumb_page = _strip_page(levels[0].writer, thumb, thumb_desc, quality, 0, jpeg=True)
    return [pages[0], thumb_page, *pages[1:]]


def _wants_thumbnail(dims: list[tuple[int, int]], has_associated: bool) -> bool:
    """A thumbnail page when the smallest level is large, or to keep label/macro off page 1."""
    return max(dims[-1]) > THUMBNAIL_MAX_PX or (len(dims) == 1 and has_associated)


def _thumbnail(smallest: np.ndarray) -> np.ndarray:
    """At most THUMBNAIL_MAX_PX, and at most half the smallest level (never a duplicate)."""
    h, w = smallest.shape[:2]
    scale = min(THUMBNAIL_MAX_PX / max(h, w), 0.5)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(smallest).resize(size, Image.Resampling.LANCZOS))


def _associated_pages(
    writer: _TiffFile,
    associated: Mapping[str, Image.Image],
    quality: int,
) -> list[_Page]:
    pages = []
    for name, subfiletype in ASSOCIATED_SUBFILETYPES.items():
        if name not in associated:
            continue
        pixels = np.asarray(associated[name].convert("RGB"))
        desc = f"{APERIO_HEADER}\r\n{name} {pixels.shape[1]}x{pixels.shape[0]}"
        # the label keeps sharp text and barcodes: lossless deflate; the macro is a photo
        jpeg = name == "macro"
        pages.append(_strip_page(writer, pixels, desc, quality, subfiletype, jpeg=jpeg))
    return pages


def _strip_page(
    writer: _TiffFile,
    pixels: np.ndarray,
    description: str,
    quality: int,
    subfiletype: int,
    *,
    jpeg: bool,
) -> _Page:
    """A single-strip page (thumbnail, label, macro)."""
    h, w = pixels.shape[:2]
    if jpeg:
        data = encode_jpeg(pixels, quality)
        compression, photometric = _COMPRESSION_JPEG, _PHOTOMETRIC_YCBCR
    else:
        data = zlib.compress(_horizontal_differences(pixels).tobytes(), 6)
        compression, photometric = _COMPRESSION_DEFLATE, _PHOTOMETRIC_RGB
    offset = writer.append(data)
    return _Page(
        w,
        h,
        description,
        array("Q", [offset]),
        array("Q", [len(data)]),
        compression,
        photometric,
        subfiletype=subfiletype,
    )


def _horizontal_differences(pixels: np.ndarray) -> np.ndarray:
    """TIFF predictor 2: each sample minus its left neighbour (mod 256), per row and channel."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    out = pixels.copy()
    out[:, 1:] -= pixels[:, :-1]
    return out


# -- raw TIFF structure --------------------------------------------------------------------------


class _TiffFile:
    """Appends chunk data, then writes all IFDs at the end and links them from the header."""

    def __init__(self, fh: BinaryIO, bigtiff: bool) -> None:
        self.fh = fh
        self.bigtiff = bigtiff
        header = (
            b"II" + struct.pack("<HHHQ", 43, 8, 0, 0)
            if bigtiff
            else b"II" + struct.pack("<HI", 42, 0)
        )
        fh.write(header)
        self.pos = len(header)

    def append(self, data: bytes) -> int:
        """Write ``data`` (word-aligned) and return its offset."""
        if self.pos % 2:
            self.fh.write(b"\0")
            self.pos += 1
        offset = self.pos
        self.fh.write(data)
        self.pos += len(data)
        self._check_offset(self.pos)
        return offset

    def finish(self, pages: list[_Page]) -> None:
        if self.pos % 2:
            self.fh.write(b"\0")
            self.pos += 1
        first = self.pos
        for i, page in enumerate(pages):
            ifd = self._ifd_bytes(page, self.pos, last=i == len(pages) - 1)
            self.fh.write(ifd)
            self.pos += len(ifd)
            self._check_offset(self.pos)
        self.fh.seek(8 if self.bigtiff else 4)
        self.fh.write(struct.pack("<Q" if self.bigtiff else "<I", first))
        self.fh.seek(self.pos)

    def _check_offset(self, pos: int) -> None:
        if not self.bigtiff and pos > _CLASSIC_LIMIT:
            raise ValueError("the image data exceeds 4 GiB; write it as BigTIFF (bigtiff=True)")

    def _ifd_bytes(self, page: _Page, ifd_pos: int, *, last: bool) -> bytes:
        """Serialise one IFD at ``ifd_pos``; values too large to inline follow it."""
        entries = sorted(_page_tags(page, self.bigtiff), key=lambda e: e[0])
        entry_size, count_fmt, head_fmt = (20, "<Q", "<HHQ") if self.bigtiff else (12, "<H", "<HHI")
        inline = 8 if self.bigtiff else 4
        next_size = 8 if self.bigtiff else 4
        header_len = struct.calcsize(count_fmt) + entry_size * len(entries) + next_size
        table = bytearray(struct.pack(count_fmt, len(entries)))
        extra = bytearray()
        for tag, ftype, count, payload in entries:
            table += struct.pack(head_fmt, tag, ftype, count)
            if len(payload) <= inline:
                table += payload.ljust(inline, b"\0")
            else:
                if len(extra) % 2:
                    extra += b"\0"
                where = ifd_pos + header_len + len(extra)
                table += struct.pack("<Q" if self.bigtiff else "<I", where)
                extra += payload
        next_ifd = 0 if last else ifd_pos + header_len + len(extra) + len(extra) % 2
        table += struct.pack("<Q" if self.bigtiff else "<I", next_ifd)
        if len(extra) % 2:
            extra += b"\0"
        return bytes(table + extra)


def _page_tags(page: _Page, bigtiff: bool) -> list[tuple[int, int, int, bytes]]:
    """(tag, type, count, little-endian payload) of every tag of ``page``."""
    offset_type, offset_dtype = (_LONG8, "<u8") if bigtiff else (_LONG, "<u4")

    def short(tag: int, *values: int) -> tuple[int, int, int, bytes]:
        return tag, _SHORT, len(values), struct.pack(f"<{len(values)}H", *values)

    def long(tag: int, value: int) -> tuple[int, int, int, bytes]:
        return tag, _LONG, 1, struct.pack("<I", value)

    def offsets(tag: int, values: array) -> tuple[int, int, int, bytes]:
        data = np.frombuffer(values, dtype=np.uint64).astype(offset_dtype)
        return tag, offset_type, len(values), data.tobytes()

    desc = page.description.encode("ascii", "replace") + b"\0"
    tags = [
        long(254, page.subfiletype),
        long(256, page.width),
        long(257, page.height),
        short(258, 8, 8, 8),
        short(259, page.compression),
        short(262, page.photometric),
        (270, _ASCII, len(desc), desc),
        short(277, 3),
        short(284, 1),
    ]
    if page.tile is not None:
        tags += [
            long(322, page.tile),
            long(323, page.tile),
            offsets(324, page.offsets),
            offsets(325, page.counts),
        ]
    else:
        tags += [offsets(273, page.offsets), long(278, page.height), offsets(279, page.counts)]
    if page.compression == _COMPRESSION_DEFLATE:
        tags.append(short(317, 2))  # Predictor: horizontal differencing
    if page.photometric == _PHOTOMETRIC_YCBCR:
        tags.append(short(530, 2, 2))
        ref = (0, 1, 255, 1, 128, 1, 255, 1, 128, 1, 255, 1)
        tags.append((532, _RATIONAL, 6, struct.pack("<12I", *ref)))
    if page.mpp is not None:
        per_cm = round(1e4 / page.mpp * 1000)  # pixels per cm as a rational /1000
        res = struct.pack("<II", per_cm, 1000)
        tags += [(282, _RATIONAL, 1, res), (283, _RATIONAL, 1, res), short(296, 3)]
    return tags
