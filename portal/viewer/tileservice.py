"""The tile service: slide tiles, heatmap and cluster overlay tiles, associated images.

One service behind two adapters: ``tiles.py`` (Django async views) and ``fastpath.py`` (a lean
ASGI path for tile GETs). Both ask this module who may see a slide and for the bytes of a
tile; neither keeps caches or slide handles of its own.

- Slides are opened through ``analysis.slides.SlideCache`` (DeepZoom geometry from OpenSlide);
  a tile pre-rendered into the slide's folder (``pretile``) is served from disk.
- Rendering runs in a small thread pool (OpenSlide releases the GIL), never in the event loop.
- Who may see a slide is the API's rule (``portal.cases.access.visible``), checked once and
  reused for ``ACCESS_TTL_S`` seconds. A change of membership, a deactivated user or a logout
  in any process bumps a shared version (the default cache: Redis in production, a file
  cache on one machine); every process drops its grants within ``REVOCATION_POLL_S``.
- ``reset_caches()`` empties everything (tests, benchmarks); ``revoke_grants()`` forgets who
  may see what, here and in every other process.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.http import Http404

from analysis.errors import AnalysisError
from analysis.heatmap import DeepZoomGeometry, HeatmapTiler, evidence_display, score_raster
from analysis.slides import SlideCache, open_slide

log = logging.getLogger(__name__)

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 80
CACHE_CONTROL = "private, max-age=31536000, immutable"
ACCESS_TTL_S = 10.0  # how long a granted (user, slide) check or a session is reused
REVOCATION_POLL_S = 0.2  # how often the shared grants version is read
GRANTS_VERSION_KEY = "lowmag:tile-grants-version"
# attention (where the model looked); class evidence; k-means clusters of the patch embeddings
LAYERS = ("score", "evidence", "clusters")
ASSOCIATED = ("label", "macro", "thumbnail")

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tiles")


class _LRU:
    """A small thread-safe LRU map."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def discard(self, key) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass(frozen=True)
class SlideAccess:
    """A slide the requesting user may see, with what tiles need to know about it."""

    slide_id: int
    path: Path
    sha256: str
    width: int
    height: int


slides = SlideCache(32)  # open slides of this process
_tile_bytes = _LRU(4096)  # encoded slide tiles (a few KB each)
_tilers = _LRU(64)  # heatmap tilers by (slide id, prediction id, threshold, layer)
_heatmap_bytes = _LRU(4096)  # encoded overlay tiles by (tiler object, level, col, row)
_grants = _LRU(4096)  # (user id, slide id) -> (SlideAccess, granted at)
_sessions = _LRU(4096)  # session key -> (user | None, resolved at)


# -- who may see what --------------------------------------------------------------------------


class _Revocations:
    """Follows the shared grants version; a change empties this process's grants at once."""

    def __init__(self) -> None:
        self.seen: object = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self.seen = self._read()
                self._thread = threading.Thread(
                    target=self._follow, name="tile-revocations", daemon=True
                )
                self._thread.start()

    @staticmethod
    def _read() -> object:
        from django.core.cache import cache

        try:
            return cache.get(GRANTS_VERSION_KEY)
        except Exception:  # noqa: BLE001 - a cache outage must not stop tiles; logged
            log.warning("tile grants version unreadable", exc_info=True)
            return None

    def check(self) -> None:
        current = self._read()
        if current != self.seen:
            self.seen = current
            _forget_local_grants()

    def _follow(self) -> None:
        while True:
            time.sleep(REVOCATION_POLL_S)
            self.check()


_revocations = _Revocations()


def _forget_local_grants() -> None:
    _grants.clear()
    _sessions.clear()


def revoke_grants() -> None:
    """Forget every cached grant and session, in this process now and in the others within
    ``REVOCATION_POLL_S`` (membership changes, deactivated users, logouts)."""
    from django.core.cache import cache

    try:
        cache.set(GRANTS_VERSION_KEY, time.time_ns(), timeout=None)
    except Exception:  # noqa: BLE001 - still forget locally; logged
        log.warning("tile grants version not shared", exc_info=True)
    _forget_local_grants()


def forget_session(session_key: str | None) -> None:
    if session_key:
        _sessions.discard(session_key)


def reset_caches() -> None:
    """Empty every cache of this process: grants, sessions, tiles, tilers, open slides."""
    for lru in (_grants, _sessions, _tile_bytes, _tilers, _heatmap_bytes):
        lru.clear()
    slides.clear()


def _lookup_access(user, slide_id: int) -> SlideAccess | None:
    from portal.cases.access import visible
    from portal.cases.models import Slide

    slide = (
        visible(Slide.objects.select_related("case"), user, "case__cohort")
        .filter(pk=slide_id, status="ready")
        .first()
    )
    if slide is None:
        return None
    return SlideAccess(slide.pk, slide.path, slide.sha256, slide.width, slide.height)


def cached_grant(user_pk: int, slide_id: int) -> SlideAccess | None:
    """A still-fresh grant from this process's cache, or None (no database access)."""
    _revocations.start()
    cached = _grants.get((user_pk, slide_id))
    if cached and time.monotonic() - cached[1] < ACCESS_TTL_S:
        return cached[0]
    return None


def grant_for(user, slide_id: int) -> SlideAccess | None:
    """The (user, slide) check (database on a miss), reused for ``ACCESS_TTL_S`` seconds."""
    if not user.is_authenticated:
        return None
    access = cached_grant(user.pk, slide_id)
    if access is None:  # looked up afresh: the grant's age counts from here, never refreshed
        access = _lookup_access(user, slide_id)
        if access is not None:
            _grants.put((user.pk, slide_id), (access, time.monotonic()))
    return access


def cached_session_user(session_key: str):
    """(known, user or None) for a session resolved less than ``ACCESS_TTL_S`` ago."""
    _revocations.start()
    cached = _sessions.get(session_key)
    if cached is None or time.monotonic() - cached[1] >= ACCESS_TTL_S:
        return False, None
    return True, cached[0]


def session_user(session_key: str):
    """The active user of a session, resolved as Django does (``get_user``), or None."""
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import get_user

    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)

    class _Request:  # get_user() needs only request.session
        session = store

    user = get_user(_Request())
    if not user.is_authenticated or not user.is_active:
        user = None
    _sessions.put(session_key, (user, time.monotonic()))
    return user


# -- slide tiles -------------------------------------------------------------------------------


class TileReadError(Exception):
    """The slide file cannot be read (damaged, or an undecodable encoding)."""


def etag(*parts) -> str:
    return '"' + "-".join(str(p) for p in parts) + '"'


def slide_dzi(access: SlideAccess) -> tuple[bytes, str]:
    geometry = DeepZoomGeometry(access.width, access.height, TILE_SIZE, OVERLAP)
    return geometry.dzi_xml("jpeg").encode(), etag(access.sha256[:16])


def disk_tile_path(slide_path: Path, level: int, col: int, row: int) -> Path:
    """Where a pre-rendered tile lives: ``<slide folder>/dz/<level>/<col>_<row>.jpeg``."""
    folder = slide_path if slide_path.is_dir() else slide_path.parent
    return folder / "dz" / str(level) / f"{col}_{row}.jpeg"


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def pretile(slide_path: Path, max_tiles: int = 6000) -> int:
    """Render the coarsest DeepZoom levels (all of them for a 5x slide) into the slide's folder.

    Levels are written coarse to fine until ``max_tiles``; a viewer opening the case then
    never waits for a render. Returns the number of tiles written.
    """
    written = 0
    with open_slide(slide_path) as image:
        for level, (n_cols, n_rows) in enumerate(image.deepzoom_level_tiles(TILE_SIZE, OVERLAP)):
            if written + n_cols * n_rows > max_tiles:
                break
            for row in range(n_rows):
                for col in range(n_cols):
                    target = disk_tile_path(slide_path, level, col, row)
                    if target.exists():
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    partial = target.with_suffix(".part")
                    partial.write_bytes(
                        _jpeg(image.deepzoom_tile(level, (col, row), TILE_SIZE, OVERLAP))
                    )
                    partial.replace(target)
                    written += 1
    return written


def _render_slide_tile(access: SlideAccess, level: int, col: int, row: int) -> bytes:
    on_disk = disk_tile_path(access.path, level, col, row)
    if on_disk.is_file():
        return on_disk.read_bytes()
    try:
        image = slides.get(access.path).deepzoom_tile(level, (col, row), TILE_SIZE, OVERLAP)
    except ValueError as exc:
        raise Http404("no such tile") from exc
    except AnalysisError as exc:  # the cache reopens a failed handle on the next request
        raise TileReadError(f"slide {access.slide_id} cannot be read: {exc}") from exc
    return _jpeg(image)


async def slide_tile(access: SlideAccess, level: int, col: int, row: int) -> tuple[bytes, str]:
    """(JPEG bytes, ETag) of one DeepZoom tile. Raises Http404 or TileReadError."""
    key = (access.path, level, col, row)
    body = _tile_bytes.get(key)
    if body is None:
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(_pool, _render_slide_tile, access, level, col, row)
        _tile_bytes.put(key, body)
    return body, etag(access.sha256[:16], level, col, row)


def region_rgb(
    access: SlideAccess, l0_xy: tuple[int, int], l0_size: int, out_px: int, max_read_px: int
):
    """A square region resized to ``out_px``: (RGB array, side read) or (None, side) when the
    read at the best pyramid level would exceed ``max_read_px``."""
    image = slides.get(access.path)
    level = image.best_level_for_downsample(l0_size / out_px)
    side = max(1, round(l0_size / image.level_downsamples[level]))
    if side > max_read_px:
        return None, side
    return image.read_region_rgb(l0_xy, level, (side, side)), side


# -- heatmap and cluster tiles -----------------------------------------------------------------


def parse_threshold(raw: str | None) -> float:
    try:
        threshold = round(float(raw or "0"), 2)
    except ValueError as exc:
        raise Http404("threshold must be a number") from exc
    if not 0.0 <= threshold <= 1.0:
        raise Http404("threshold must lie in [0, 1]")
    return threshold


def parse_layer(raw: str | None) -> str:
    layer = raw or "score"
    if layer not in LAYERS:
        raise Http404(f"layer must be one of {', '.join(LAYERS)}")
    return layer


def _load_tiler(
    access: SlideAccess, prediction_id: int, threshold: float, layer: str
) -> HeatmapTiler | None:
    from portal.analyses.models import Prediction

    prediction = Prediction.objects.filter(pk=prediction_id, slide_id=access.slide_id).first()
    if prediction is None or "grid_rc" not in prediction.grid:
        return None
    if layer == "evidence":
        values = evidence_display(prediction.evidence())
    else:
        values = prediction.scores() if layer == "score" else prediction.cluster_ids()
    grid_rc = np.asarray(prediction.grid["grid_rc"], dtype=np.int64).reshape(-1, 2)
    if len(values) != len(grid_rc):
        return None  # e.g. a prediction made before cluster maps existed
    grid = prediction.grid
    raster = score_raster(
        grid_rc, values.astype(np.float32), int(grid["n_rows"]), int(grid["n_cols"])
    )
    geometry = DeepZoomGeometry(access.width, access.height, TILE_SIZE, OVERLAP)
    return HeatmapTiler(
        raster,
        float(grid["l0_patch_size"]),
        geometry,
        threshold=threshold,
        categorical=layer == "clusters",
    )


async def tiler_for(
    access: SlideAccess, prediction_id: int, threshold: float, layer: str = "score"
) -> HeatmapTiler:
    """The overlay tiler of a prediction on this (already authorised) slide; Http404 if none."""
    from asgiref.sync import sync_to_async

    if layer == "clusters":
        threshold = 0.0  # categories are never thresholded
    key = (access.slide_id, prediction_id, threshold, layer)
    tiler = _tilers.get(key)
    if tiler is None:
        tiler = await sync_to_async(_load_tiler)(access, prediction_id, threshold, layer)
        if tiler is None:
            raise Http404("no such prediction")
        _tilers.put(key, tiler)
    return tiler


def heatmap_dzi(tiler: HeatmapTiler, prediction_id: int) -> tuple[bytes, str]:
    return tiler.dzi().encode(), etag(prediction_id)


async def heatmap_tile(
    tiler: HeatmapTiler, prediction_id: int, level: int, col: int, row: int
) -> tuple[bytes, str]:
    """(palette PNG bytes, ETag) of one overlay tile; Http404 outside the pyramid."""
    key = (tiler, level, col, row)  # a reloaded tiler starts afresh
    body = _heatmap_bytes.get(key)
    if body is None:
        try:
            body = await asyncio.get_running_loop().run_in_executor(
                _pool, tiler.tile_png, level, (col, row)
            )
        except ValueError as exc:
            raise Http404(str(exc)) from exc
        _heatmap_bytes.put(key, body)
    kind = "c" if tiler.categorical else "s"
    return body, etag(prediction_id, kind, tiler.threshold, level, col, row)


# -- associated images -------------------------------------------------------------------------


async def associated_image(access: SlideAccess, name: str) -> tuple[bytes, str]:
    if name not in ASSOCIATED:
        raise Http404("no such image")
    asset_dir = access.path if access.path.is_dir() else access.path.parent
    path = asset_dir / f"{name}.png"
    if not path.is_file():
        raise Http404(f"this slide has no {name} image")
    body = await asyncio.get_running_loop().run_in_executor(_pool, path.read_bytes)
    return body, etag(access.sha256[:16], name)
