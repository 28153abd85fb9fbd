"""DeepZoom slide tiles, heatmap overlay tiles and associated images.

Views are async so that a slow tile never holds the (single) sync thread Django's ASGI
handler uses; rendering runs in a small thread pool (OpenSlide releases the GIL). Every
response passes the same object-level check as the API: a slide outside the user's
cohorts is a 404, whether it exists or not.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from asgiref.sync import sync_to_async
from django.http import Http404, HttpResponse, HttpResponseNotModified

from analysis.heatmap import DeepZoomGeometry, HeatmapTiler, evidence_display, score_raster
from portal.core.metrics import observe_tile

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 80
CACHE_CONTROL = "private, max-age=31536000, immutable"
ACCESS_TTL_S = 10.0  # how long a granted (user, slide) check is reused by tile requests

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tiles")


class _LRU:
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
                _, old = self._items.popitem(last=False)
                close = getattr(old, "close", None)
                if close:
                    close()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def discard(self, key) -> None:
        with self._lock:
            self._items.pop(key, None)


@dataclass(frozen=True)
class SlideAccess:
    slide_id: int
    path: Path
    sha256: str
    width: int
    height: int


class _OpenDeepZoom:
    def __init__(self, path: Path):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        self.osr = openslide.open_slide(str(path))
        self.dz = DeepZoomGenerator(self.osr, tile_size=TILE_SIZE, overlap=OVERLAP)

    def close(self) -> None:
        self.osr.close()


_deepzoom = _LRU(32)  # open slides, per process
_tile_bytes = _LRU(4096)  # encoded tiles (a few KB each)
_tilers = _LRU(64)  # heatmap tilers by (slide id, prediction id, threshold)
_heatmap_bytes = _LRU(4096)  # encoded heatmap tiles by (tiler object, level, col, row)
_access = _LRU(4096)  # (user id, slide id) -> (SlideAccess, granted at)
_open_lock = threading.Lock()


def visible_slides(user):
    from portal.cases.access import visible
    from portal.cases.models import Slide

    return visible(Slide.objects.select_related("case"), user, "case__cohort")


def _lookup_access(user, slide_id: int) -> SlideAccess | None:
    slide = visible_slides(user).filter(pk=slide_id, status="ready").first()
    if slide is None:
        return None
    return SlideAccess(slide.pk, slide.path, slide.sha256, slide.width, slide.height)


def _authorize(request, slide_id: int) -> SlideAccess | None:
    """Session -> user -> (user, slide) grant, all in one hop to the request's sync thread.

    ``request.user`` is the same check as ``await request.auser()`` (session, user, session
    hash), without a second thread hop for the user and a third for the grant.
    """
    user = request.user
    if not user.is_authenticated:
        return None
    return grant_for(user, slide_id)


def grant_for(user, slide_id: int) -> SlideAccess | None:
    """The (user, slide) check, reused for ``ACCESS_TTL_S`` seconds once granted."""
    access = cached_grant(user.pk, slide_id)
    if access is None:  # looked up afresh: the grant's age counts from here, never refreshed
        access = _lookup_access(user, slide_id)
        if access is not None:
            _access.put((user.pk, slide_id), (access, time.monotonic()))
    return access


def cached_grant(user_pk: int, slide_id: int) -> SlideAccess | None:
    """A still-fresh grant from the cache, or None (no database access)."""
    cached = _access.get((user_pk, slide_id))
    if cached and time.monotonic() - cached[1] < ACCESS_TTL_S:
        return cached[0]
    return None


async def _slide_access(request, slide_id: int) -> SlideAccess:
    access = await sync_to_async(_authorize)(request, slide_id)
    if access is None:
        raise Http404("no such slide")
    return access


def forget_access() -> None:
    """Drop cached permission grants (membership changes, tests)."""
    _access.clear()


def _deepzoom_for(access: SlideAccess) -> _OpenDeepZoom:
    opened = _deepzoom.get(access.path)
    if opened is None:
        with _open_lock:
            opened = _deepzoom.get(access.path)
            if opened is None:
                opened = _OpenDeepZoom(access.path)
                _deepzoom.put(access.path, opened)
    return opened


def _etag(*parts) -> str:
    return '"' + "-".join(str(p) for p in parts) + '"'


def _immutable(request, body: bytes, content_type: str, etag: str) -> HttpResponse:
    if request.headers.get("If-None-Match") == etag:
        response = HttpResponseNotModified()
    else:
        response = HttpResponse(body, content_type=content_type)
    response["ETag"] = etag
    response["Cache-Control"] = CACHE_CONTROL
    return response


def disk_tile_path(slide_path: Path, level: int, col: int, row: int) -> Path:
    """Where a pre-rendered tile lives: ``<slide folder>/dz/<level>/<col>_<row>.jpeg``."""
    folder = slide_path if slide_path.is_dir() else slide_path.parent
    return folder / "dz" / str(level) / f"{col}_{row}.jpeg"


def pretile(slide_path: Path, max_tiles: int = 6000) -> int:
    """Render the coarsest DeepZoom levels (all of them for a 5x slide) into the disk cache.

    Levels are written coarse to fine until ``max_tiles``; a viewer opening the case then
    never waits for a render. Returns the number of tiles written.
    """
    opened = _OpenDeepZoom(slide_path)
    written = 0
    try:
        for level in range(opened.dz.level_count):
            n_cols, n_rows = opened.dz.level_tiles[level]
            if written + n_cols * n_rows > max_tiles:
                break
            for row in range(n_rows):
                for col in range(n_cols):
                    target = disk_tile_path(slide_path, level, col, row)
                    if target.exists():
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    buffer = io.BytesIO()
                    opened.dz.get_tile(level, (col, row)).convert("RGB").save(
                        buffer, format="JPEG", quality=JPEG_QUALITY
                    )
                    partial = target.with_suffix(".part")
                    partial.write_bytes(buffer.getvalue())
                    partial.replace(target)
                    written += 1
    finally:
        opened.close()
    return written


def _render_slide_tile(access: SlideAccess, level: int, col: int, row: int) -> bytes:
    import openslide

    cached = disk_tile_path(access.path, level, col, row)
    if cached.is_file():
        return cached.read_bytes()
    opened = _deepzoom_for(access)
    if not 0 <= level < opened.dz.level_count:
        raise Http404("no such level")
    n_cols, n_rows = opened.dz.level_tiles[level]
    if not (0 <= col < n_cols and 0 <= row < n_rows):
        raise Http404("no such tile")
    try:
        image = opened.dz.get_tile(level, (col, row))
    except openslide.OpenSlideError as exc:
        _deepzoom.put(access.path, _OpenDeepZoom(access.path))  # the handle is unusable now
        raise TileReadError(f"slide {access.slide_id} cannot be read: {exc}") from exc
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class TileReadError(Exception):
    pass


async def slide_dzi(request, slide_id: int):
    access = await _slide_access(request, slide_id)
    geometry = DeepZoomGeometry(access.width, access.height, TILE_SIZE, OVERLAP)
    return _immutable(
        request, geometry.dzi_xml("jpeg").encode(), "application/xml", _etag(access.sha256[:16])
    )


async def slide_tile_bytes(access: SlideAccess, level: int, col: int, row: int) -> bytes:
    """JPEG bytes of one DeepZoom tile (cached). Raises Http404 or TileReadError."""
    key = (access.path, level, col, row)
    body = _tile_bytes.get(key)
    if body is None:
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(_pool, _render_slide_tile, access, level, col, row)
        _tile_bytes.put(key, body)
    return body


def slide_tile_etag(access: SlideAccess, level: int, col: int, row: int) -> str:
    return _etag(access.sha256[:16], level, col, row)


async def slide_tile(request, slide_id: int, level: int, col: int, row: int):
    start = time.perf_counter()
    access = await _slide_access(request, slide_id)
    try:
        body = await slide_tile_bytes(access, level, col, row)
    except TileReadError as exc:
        return HttpResponse(str(exc), status=502, content_type="text/plain")
    observe_tile(time.perf_counter() - start, "slide")
    return _immutable(request, body, "image/jpeg", slide_tile_etag(access, level, col, row))


# attention (where the model looked); class evidence; k-means clusters of the patch embeddings
LAYERS = ("score", "evidence", "clusters")


def _load_tiler(
    access: SlideAccess, prediction_id: int, threshold: float, layer: str = "score"
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


async def _tiler(request, access: SlideAccess, prediction_id: int) -> HeatmapTiler:
    return await tiler_for(
        access,
        prediction_id,
        parse_threshold(request.GET.get("threshold")),
        parse_layer(request.GET.get("layer")),
    )


async def tiler_for(
    access: SlideAccess, prediction_id: int, threshold: float, layer: str = "score"
) -> HeatmapTiler:
    if layer == "clusters":
        threshold = 0.0  # categories are never thresholded
    key = (access.slide_id, prediction_id, threshold, layer)  # checked for this slide
    tiler = _tilers.get(key)
    if tiler is None:
        tiler = await sync_to_async(_load_tiler)(access, prediction_id, threshold, layer)
        if tiler is None:
            raise Http404("no such prediction")
        _tilers.put(key, tiler)
    return tiler


async def heatmap_dzi(request, slide_id: int, prediction_id: int):
    access = await _slide_access(request, slide_id)
    tiler = await _tiler(request, access, prediction_id)
    return _immutable(request, tiler.dzi().encode(), "application/xml", _etag(prediction_id))


async def heatmap_tile_bytes(tiler: HeatmapTiler, level: int, col: int, row: int) -> bytes:
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
    return body


def heatmap_tile_etag(prediction_id: int, tiler: HeatmapTiler, level: int, col: int, row: int):
    kind = "c" if tiler.categorical else "s"
    return _etag(prediction_id, kind, tiler.threshold, level, col, row)


async def heatmap_tile(request, slide_id: int, prediction_id: int, level: int, col: int, row: int):
    start = time.perf_counter()
    access = await _slide_access(request, slide_id)
    tiler = await _tiler(request, access, prediction_id)
    body = await heatmap_tile_bytes(tiler, level, col, row)
    etag = heatmap_tile_etag(prediction_id, tiler, level, col, row)
    observe_tile(time.perf_counter() - start, "heatmap")
    return _immutable(request, body, "image/png", etag)


ASSOCIATED = ("label", "macro", "thumbnail")


async def associated_image(request, slide_id: int, name: str):
    if name not in ASSOCIATED:
        raise Http404("no such image")
    access = await _slide_access(request, slide_id)
    asset_dir = access.path if access.path.is_dir() else access.path.parent
    path = asset_dir / f"{name}.png"
    if not path.is_file():
        raise Http404(f"this slide has no {name} image")
    body = await asyncio.get_running_loop().run_in_executor(_pool, path.read_bytes)
    return _immutable(request, body, "image/png", _etag(access.sha256[:16], name))
