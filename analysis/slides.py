"""Open whole-slide images, resolve their physical scale, read patches at a magnification.

Magnification is defined by microns per pixel (SPEC section 2): 20x = 0.5 µm/px, 5x = 2.0.
A patch always covers ``PATCH_UM`` µm square. To read at a target mpp we take the pyramid
level with the largest downsample whose mpp is still at most 10% coarser than the target,
read the region covering the cell there, and shrink it with Pillow's LANCZOS filter (which
widens its kernel with the scale factor, so downscaling is antialiased). A slide coarser
than the target by more than 10% is refused: upsampling would invent pixels.

Every coordinate exchanged here is in level-0 pixels, origin top-left (``l0_xy``).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np
import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image, UnidentifiedImageError

from analysis.errors import (
    AnalysisError,
    CorruptSlideError,
    MagnificationUnavailableError,
    MissingScaleError,
    UnsupportedSlideError,
)

PATCH_UM = 128.0  # every patch covers 128 µm square (SPEC §2)
MAG_TOLERANCE = 0.10  # a level may be this much coarser than the target mpp and still be used
STANDARD_MAGNIFICATIONS = (40.0, 20.0, 10.0, 5.0, 2.5)
RESAMPLE_FILTER = Image.Resampling.LANCZOS

# A generic TIFF with one level this small is a plain image (a patch, a photo), not a slide.
_MIN_GENERIC_SIDE_PX = 1024
# Extensions that only whole-slide formats use: a file with one that OpenSlide cannot
# recognise is damaged (typically truncated), not merely of another kind.
_SLIDE_ONLY_EXTENSIONS = {".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"}
_SCALE_HELP = (
    "supply the scale yourself: open_slide(path, mpp=...) or the --mpp flag of the CLI "
    "(µm per level-0 pixel, e.g. 0.25 for 40x, 0.5 for 20x)"
)


THUMBNAIL_MAX_SIDE = 4096  # a thumbnail is an overview; larger asks are refused


class SlideNotFoundError(AnalysisError, FileNotFoundError):
    """The slide path does not exist."""


def mpp_for_magnification(mag: float) -> float:
    """Microns per pixel of a magnification: 10 / mag (20x -> 0.5, 5x -> 2.0)."""
    if mag <= 0:
        raise ValueError(f"magnification must be positive, got {mag}")
    return 10.0 / mag


def patch_size_px(mag: float, patch_um: float = PATCH_UM) -> int:
    """Side in pixels of a ``patch_um`` patch at ``mag``: 256 at 20x, 128 at 10x, 64 at 5x."""
    return int(round(patch_um / mpp_for_magnification(mag)))


def _format_mag(mag: float) -> str:
    return f"{mag:g}x"


class Slide:
    """An open whole-slide image with a resolved physical scale. Use ``open_slide``."""

    def __init__(self, path: Path, osr: openslide.OpenSlide, mpp: float | None = None) -> None:
        self.path = path
        self._osr: openslide.OpenSlide | None = osr
        self._failed = False
        self._deepzoom_generators: dict[tuple[int, int], DeepZoomGenerator] = {}
        props = osr.properties
        self.vendor: str = props.get(openslide.PROPERTY_NAME_VENDOR, "") or "unknown"
        self.dimensions: tuple[int, int] = tuple(osr.dimensions)  # type: ignore[assignment]
        self.level_count: int = osr.level_count
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in osr.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in osr.level_downsamples)
        self.objective_power: float | None = _positive_float(
            props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        )
        self.mpp, self.mpp_source = self._resolve_mpp(props, mpp)
        self.magnification: float = 10.0 / self.mpp
        self.associated_image_names: list[str] = sorted(osr.associated_images.keys())

    # -- scale -------------------------------------------------------------------------------

    def _resolve_mpp(self, props, caller_mpp: float | None) -> tuple[float, str]:
        if caller_mpp is not None:
            if not (caller_mpp > 0 and math.isfinite(caller_mpp)):
                raise ValueError(f"mpp must be a positive number, got {caller_mpp}")
            return float(caller_mpp), "caller"
        values = [
            _positive_float(props.get(key))
            for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)
        ]
        known = [v for v in values if v is not None]
        if known:
            return float(np.mean(known)), "metadata"
        if self.objective_power is not None:
            return 10.0 / self.objective_power, "objective-power"
        raise MissingScaleError(
            f"{self.name}: the slide carries neither a pixel size (mpp) nor an objective power, "
            f"so its magnification is unknown; {_SCALE_HELP}"
        )

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def level_mpps(self) -> tuple[float, ...]:
        """µm per pixel of each pyramid level."""
        return tuple(self.mpp * d for d in self.level_downsamples)

    def level_for_magnification(self, mag: float) -> int:
        """The level to read ``mag`` from; raises MagnificationUnavailableError if too coarse."""
        return self.level_for_mpp(mpp_for_magnification(mag))

    def level_for_mpp(self, target_mpp: float) -> int:
        """Largest-downsample level whose mpp is at most ``target_mpp`` * (1 + tolerance)."""
        limit = target_mpp * (1.0 + MAG_TOLERANCE)
        usable = [i for i, m in enumerate(self.level_mpps) if m <= limit]
        if not usable:
            wanted = 10.0 / target_mpp
            raise MagnificationUnavailableError(
                f"{self.name}: cannot read at {_format_mag(wanted)} ({target_mpp:g} µm/px): the "
                f"slide's finest level is {self.mpp:.4g} µm/px (native "
                f"{_format_mag(round(self.magnification, 3))}), coarser than requested by more "
                f"than {MAG_TOLERANCE:.0%}; upsampling would invent pixels. Use a magnification "
                f"of at most {_format_mag(round(self.magnification * (1 + MAG_TOLERANCE), 3))} "
                "or a slide scanned at higher resolution"
            )
        return max(usable, key=lambda i: self.level_downsamples[i])

    def readable_magnifications(
        self, mags: tuple[float, ...] = STANDARD_MAGNIFICATIONS
    ) -> dict[float, int | None]:
        """For each magnification, the level it is read from, or None when refused."""
        out: dict[float, int | None] = {}
        for mag in mags:
            try:
                out[mag] = self.level_for_magnification(mag)
            except MagnificationUnavailableError:
                out[mag] = None
        return out

    # -- pixels ------------------------------------------------------------------------------

    def _handle(self) -> openslide.OpenSlide:
        if self._osr is None:
            raise AnalysisError(f"{self.name}: the slide was closed; open it again")
        if self._failed:
            raise CorruptSlideError(
                f"{self.name}: an earlier read of this slide failed, so its handle is unusable; "
                "the file is damaged or uses an encoding that cannot be decoded"
            )
        return self._osr

    def _read_failed(self, what: str, exc: Exception) -> CorruptSlideError:
        self._failed = True
        return CorruptSlideError(
            f"{self.name}: corrupt slide: reading {what} failed ({exc}); the file is damaged or uses an "
            "encoding that cannot be decoded; re-export or re-scan the slide"
        )

    @property
    def usable(self) -> bool:
        """False once closed or after a read error (OpenSlide handles do not recover)."""
        return self._osr is not None and not self._failed

    def read_region_rgb(
        self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read ``size`` (w, h) level pixels from level-0 ``l0_xy``; (H, W, 3) uint8, transparent -> white."""
        osr = self._handle()
        x, y = int(l0_xy[0]), int(l0_xy[1])
        w, h = int(size[0]), int(size[1])
        try:
            rgba = osr.read_region((x, y), int(level), (w, h))
        except openslide.OpenSlideError as exc:
            raise self._read_failed(
                f"region {w}x{h} at level {level} from ({x}, {y})", exc
            ) from exc
        return _rgba_on_white(np.asarray(rgba))

    def best_level_for_downsample(self, downsample: float) -> int:
        """The finest level at least as coarse as needed: the largest downsample <= ``downsample``."""
        fitting = [i for i, d in enumerate(self.level_downsamples) if d <= downsample + 1e-9]
        return max(fitting, default=0)

    def _deepzoom(self, tile_size: int, overlap: int) -> DeepZoomGenerator:
        key = (tile_size, overlap)
        generator = self._deepzoom_generators.get(key)
        if generator is None:
            generator = DeepZoomGenerator(self._handle(), tile_size=tile_size, overlap=overlap)
            self._deepzoom_generators[key] = generator
        return generator

    def deepzoom_level_tiles(self, tile_size: int = 254, overlap: int = 1) -> list[tuple[int, int]]:
        """(columns, rows) of every DeepZoom level (OpenSlide's geometry), coarsest first."""
        return [(int(c), int(r)) for c, r in self._deepzoom(tile_size, overlap).level_tiles]

    def deepzoom_tile(
        self, level: int, tile_cr: tuple[int, int], tile_size: int = 254, overlap: int = 1
    ) -> Image.Image:
        """DeepZoom tile ``(col, row)`` of DeepZoom ``level`` as RGB. Raises ``ValueError`` for
        a level or address outside the pyramid, ``CorruptSlideError`` when the read fails."""
        generator = self._deepzoom(tile_size, overlap)
        self._handle()  # refuse a closed or failed handle
        try:
            tile = generator.get_tile(level, tile_cr)
        except openslide.OpenSlideError as exc:
            raise self._read_failed(f"DeepZoom tile {tile_cr} of level {level}", exc) from exc
        return tile.convert("RGB")

    def read_patch(
        self, l0_xy: tuple[int, int], mag: float, patch_um: float = PATCH_UM
    ) -> np.ndarray:
        """The ``patch_um`` cell at ``l0_xy`` seen at ``mag``: (S, S, 3) uint8, S = patch_size_px."""
        level = self.level_for_magnification(mag)
        return self._read_patch_at(l0_xy, level, patch_size_px(mag, patch_um), patch_um)

    def _read_patch_at(
        self, l0_xy: tuple[int, int], level: int, out_px: int, patch_um: float
    ) -> np.ndarray:
        l0_side = patch_um / self.mpp
        level_side = max(1, int(round(l0_side / self.level_downsamples[level])))
        region = self.read_region_rgb(l0_xy, level, (level_side, level_side))  # (s, s, 3)
        if level_side == out_px:
            return region
        image = Image.fromarray(region).resize((out_px, out_px), RESAMPLE_FILTER)
        return np.asarray(image)  # (S, S, 3)

    def read_patches(
        self,
        l0_xys: np.ndarray,
        mag: float,
        patch_um: float = PATCH_UM,
        workers: int = 4,
    ) -> np.ndarray:
        """Read many cells, overlapping I/O in threads; (N, S, S, 3) in input order."""
        l0_xys = np.asarray(l0_xys, dtype=np.int64).reshape(-1, 2)  # (N, 2)
        level = self.level_for_magnification(mag)
        out_px = patch_size_px(mag, patch_um)
        out = np.empty((len(l0_xys), out_px, out_px, 3), dtype=np.uint8)  # (N, S, S, 3)
        if len(l0_xys) == 0:
            return out
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [
                pool.submit(self._read_patch_at, tuple(xy), level, out_px, patch_um)
                for xy in l0_xys
            ]
            try:
                for i, future in enumerate(futures):
                    out[i] = future.result()
            finally:
                for future in futures:
                    future.cancel()
        return out

    def iter_patch_batches(
        self,
        l0_xys: np.ndarray,
        mag: float,
        batch_size: int = 64,
        patch_um: float = PATCH_UM,
        workers: int = 4,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices (B,), patches (B, S, S, 3)) in order; the next batches read meanwhile.

        Where a cell is exactly S pixels of the level read, at whole-pixel positions (a 5x
        export read at 5x, a 4x pyramid's 5x level), each run of neighbouring cells in a grid
        row is read as one region and cut into patches: the same pixels as patch-by-patch
        reads, a fraction of the calls. Otherwise each cell is read (and resized) on its own.
        """
        l0_xys = np.asarray(l0_xys, dtype=np.int64).reshape(-1, 2)  # (N, 2)
        level = self.level_for_magnification(mag)
        out_px = patch_size_px(mag, patch_um)
        level_xy = self._aligned_level_xy(l0_xys, level, out_px, patch_um)  # (N, 2) or None
        starts = range(0, len(l0_xys), max(1, batch_size))
        pending: deque[tuple[np.ndarray, list[Future]]] = deque()
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

            def submit(start: int) -> None:
                idx = np.arange(start, min(start + batch_size, len(l0_xys)))
                if level_xy is not None:
                    futures = [
                        pool.submit(self._read_row_run, l0_xys[run], level_xy[run], level, out_px)
                        for run in _row_runs(level_xy[idx], out_px, offset=start)
                    ]
                else:
                    futures = [
                        pool.submit(self._read_patch_at, tuple(l0_xys[i]), level, out_px, patch_um)
                        for i in idx
                    ]
                pending.append((idx, futures))

            start_iter = iter(starts)
            try:
                for start in start_iter:  # keep two batches in flight
                    submit(start)
                    if len(pending) >= 2:
                        break
                while pending:
                    idx, futures = pending.popleft()
                    parts = [f.result() for f in futures]
                    batch = np.concatenate(parts) if level_xy is not None else np.stack(parts)
                    next_start = next(start_iter, None)
                    if next_start is not None:
                        submit(next_start)
                    yield idx, batch  # (B, S, S, 3)
            finally:
                for _, futures in pending:
                    for future in futures:
                        future.cancel()

    def _aligned_level_xy(
        self, l0_xys: np.ndarray, level: int, out_px: int, patch_um: float
    ) -> np.ndarray | None:
        """(N, 2) level-pixel positions of the cells when region reads give patch reads' pixels:
        a cell spans exactly ``out_px`` level pixels and every cell starts on a whole pixel."""
        downsample = self.level_downsamples[level]
        if abs(patch_um / self.mpp / downsample - out_px) > 1e-6:
            return None  # cells are resized or fractional at this level
        level_xy = l0_xys / downsample
        whole = np.rint(level_xy)
        if len(l0_xys) and np.abs(level_xy - whole).max() > 1e-6:
            return None
        return whole.astype(np.int64)

    def _read_row_run(
        self, l0_xys: np.ndarray, level_xy: np.ndarray, level: int, out_px: int
    ) -> np.ndarray:
        """Cells of one grid row, left to right, read as one region: (K, S, S, 3)."""
        x0, x1 = int(level_xy[0, 0]), int(level_xy[-1, 0]) + out_px
        region = self.read_region_rgb(
            (int(l0_xys[0, 0]), int(l0_xys[0, 1])), level, (x1 - x0, out_px)
        )  # (S, W, 3)
        return np.stack([region[:, x - x0 : x - x0 + out_px] for x in level_xy[:, 0]])

    def thumbnail(self, max_size: tuple[int, int] = (1024, 1024)) -> Image.Image:
        """An RGB overview fitting in ``max_size`` (each side at most ``THUMBNAIL_MAX_SIDE``)."""
        if not all(0 < side <= THUMBNAIL_MAX_SIDE for side in max_size):
            raise ValueError(
                f"thumbnail size {max_size} is outside 1..{THUMBNAIL_MAX_SIDE} px per side"
            )
        osr = self._handle()
        try:
            return osr.get_thumbnail(max_size).convert("RGB")
        except openslide.OpenSlideError as exc:
            raise self._read_failed("the thumbnail", exc) from exc

    def associated_image(self, name: str) -> Image.Image:
        """An associated image (label, macro, thumbnail) as RGB on white."""
        if name not in self.associated_image_names:
            raise KeyError(
                f"{self.name} has no associated image {name!r}; it has "
                f"{', '.join(self.associated_image_names) or 'none'}"
            )
        osr = self._handle()
        try:
            rgba = osr.associated_images[name]
        except openslide.OpenSlideError as exc:
            raise self._read_failed(f"associated image {name!r}", exc) from exc
        return Image.fromarray(_rgba_on_white(np.asarray(rgba.convert("RGBA"))))

    def check_readable(self) -> None:
        """Decode a small region of the coarsest level; raises CorruptSlideError if it fails."""
        level = self.level_count - 1
        w, h = self.level_dimensions[level]
        self.read_region_rgb((0, 0), level, (min(w, 256), min(h, 256)))

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"Slide({self.name!r}, {self.vendor}, {w}x{h}, {self.mpp:.4g} µm/px "
            f"[{self.mpp_source}], {self.level_count} levels)"
        )


def _row_runs(
    level_xy: np.ndarray, out_px: int, offset: int = 0, max_gap: int = 4, max_cells: int = 64
) -> list[np.ndarray]:
    """Split cells (in row-major grid order) into runs read as one region each: same row,
    ascending x, at most ``max_gap`` empty cells between neighbours, ``max_cells`` long."""
    runs: list[np.ndarray] = []
    start = 0
    for i in range(1, len(level_xy) + 1):
        if i < len(level_xy):
            same_row = level_xy[i, 1] == level_xy[i - 1, 1]
            gap = level_xy[i, 0] - level_xy[i - 1, 0]
            if same_row and 0 < gap <= (max_gap + 1) * out_px and i - start < max_cells:
                continue
        runs.append(np.arange(offset + start, offset + i))
        start = i
    return runs


def _positive_float(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    if number is None or not math.isfinite(number) or number <= 0:
        return None
    return number


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 (straight alpha) -> (H, W, 3) uint8 composited on white."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


# -- opening -----------------------------------------------------------------------------------


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image (a DICOM WSI series may be given as its folder).

    ``mpp`` (µm per level-0 pixel) overrides the file's scale, or supplies one when it has none.
    """
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(f"{path}: no such slide file or folder")
    target = _dicom_file_in(path) if path.is_dir() else path
    osr = _open_openslide(path, target)
    try:
        _refuse_plain_image(path, osr)
        return Slide(path, osr, mpp=mpp)
    except BaseException:
        osr.close()
        raise


def _dicom_file_in(folder: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not files:
        raise UnsupportedSlideError(
            f"{folder}: a folder is read as a DICOM WSI series, but it holds no .dcm files"
        )
    return files[0]


def _open_openslide(path: Path, target: Path) -> openslide.OpenSlide:
    try:
        return openslide.OpenSlide(str(target))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise _unrecognised_file_error(path, target) from exc
    except openslide.OpenSlideError as exc:
        message = str(exc)
        if message.lower().startswith("unsupported"):
            raise UnsupportedSlideError(
                f"{path.name}: unsupported or corrupt slide ({message}); convert it to a "
                "supported whole-slide format (SVS, NDPI, MRXS, SCN, BIF, tiled TIFF, DICOM)"
            ) from exc
        raise CorruptSlideError(
            f"{path.name}: corrupt slide, it cannot be opened ({message}); re-export or "
            "re-upload the file"
        ) from exc


def _unrecognised_file_error(path: Path, target: Path) -> AnalysisError:
    """Say what a file OpenSlide does not recognise is: a plain image, damaged, or unknown."""
    plain_size = _plain_image_size(target)
    if plain_size is not None:
        w, h = plain_size
        return UnsupportedSlideError(
            f"{path.name}: not a whole-slide image (a plain {w}x{h} image with no pyramid or "
            "scale); upload the scanner's slide file instead"
        )
    if target.suffix.lower() in _SLIDE_ONLY_EXTENSIONS:
        return CorruptSlideError(
            f"{path.name}: corrupt slide: the file has a {target.suffix} extension but its "
            "contents are not a readable slide (truncated or damaged?); re-export or re-upload it"
        )
    return UnsupportedSlideError(
        f"{path.name}: unsupported or corrupt slide: no slide reader recognises this file; "
        "convert it to a supported whole-slide format (SVS, NDPI, MRXS, SCN, BIF, tiled TIFF, DICOM)"
    )


def _plain_image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _refuse_plain_image(path: Path, osr: openslide.OpenSlide) -> None:
    vendor = osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "")
    w, h = osr.dimensions
    if vendor in ("", "generic-tiff") and osr.level_count == 1 and max(w, h) < _MIN_GENERIC_SIDE_PX:
        raise UnsupportedSlideError(
            f"{path.name}: not a whole-slide image (a single {w}x{h} image with no pyramid "
            "and no scanner metadata); upload the scanner's slide file instead"
        )


# -- cache -------------------------------------------------------------------------------------


class SlideCache:
    """Thread-safe LRU cache of open slides; evicted or failed handles are closed."""

    def __init__(self, capacity: int = 16) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._slides: OrderedDict[tuple[str, float | None], Slide] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | Path, mpp: float | None = None) -> Slide:
        key = (str(Path(path).resolve()), mpp)
        with self._lock:
            slide = self._slides.get(key)
            if slide is not None and slide.usable:
                self._slides.move_to_end(key)
                return slide
            if slide is not None:  # a read failed: OpenSlide handles do not recover
                del self._slides[key]
                slide.close()
            slide = open_slide(path, mpp=mpp)
            self._slides[key] = slide
            while len(self._slides) > self.capacity:
                _, oldest = self._slides.popitem(last=False)
                oldest.close()
            return slide

    def evict(self, path: str | Path, mpp: float | None = None) -> None:
        key = (str(Path(path).resolve()), mpp)
        with self._lock:
            slide = self._slides.pop(key, None)
        if slide is not None:
            slide.close()

    def clear(self) -> None:
        with self._lock:
            slides = list(self._slides.values())
            self._slides.clear()
        for slide in slides:
            slide.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._slides)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str | Path):
            return False
        resolved = str(Path(path).resolve())
        with self._lock:
            return any(key[0] == resolved for key in self._slides)
