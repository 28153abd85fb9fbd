"""Django adapter of the tile service: DZI descriptors, slide and overlay tiles, associated
images as async views.

Views are async so that a slow tile never holds the (single) sync thread Django's ASGI
handler uses. Every response passes the same object-level check as the API: a slide outside
the user's cohorts is a 404, whether it exists or not. The tiles themselves, the caches and the
slide handles belong to ``portal.viewer.tileservice``.
"""

from __future__ import annotations

import time

from asgiref.sync import sync_to_async
from django.http import Http404, HttpResponse, HttpResponseNotModified

from portal.core.metrics import observe_tile
from portal.viewer import tileservice as service


def _authorize(request, slide_id: int) -> service.SlideAccess | None:
    """Session -> user -> (user, slide) grant, all in one hop to the request's sync thread."""
    return service.grant_for(request.user, slide_id)


async def _slide_access(request, slide_id: int) -> service.SlideAccess:
    access = await sync_to_async(_authorize)(request, slide_id)
    if access is None:
        raise Http404("no such slide")
    return access


def _immutable(request, body: bytes, content_type: str, etag: str) -> HttpResponse:
    response: HttpResponse
    if request.headers.get("If-None-Match") == etag:
        response = HttpResponseNotModified()
    else:
        response = HttpResponse(body, content_type=content_type)
    response["ETag"] = etag
    response["Cache-Control"] = service.CACHE_CONTROL
    return response


async def _tiler(request, access: service.SlideAccess, prediction_id: int):
    return await service.tiler_for(
        access,
        prediction_id,
        service.parse_threshold(request.GET.get("threshold")),
        service.parse_layer(request.GET.get("layer")),
    )


async def slide_dzi(request, slide_id: int):
    access = await _slide_access(request, slide_id)
    return _immutable(request, *_with_type(service.slide_dzi(access), "application/xml"))


def _with_type(body_etag: tuple[bytes, str], content_type: str) -> tuple[bytes, str, str]:
    return body_etag[0], content_type, body_etag[1]


async def slide_tile(request, slide_id: int, level: int, col: int, row: int):
    start = time.perf_counter()
    access = await _slide_access(request, slide_id)
    try:
        body, etag = await service.slide_tile(access, level, col, row)
    except service.TileReadError as exc:
        return HttpResponse(str(exc), status=502, content_type="text/plain")
    observe_tile(time.perf_counter() - start, "slide")
    return _immutable(request, body, "image/jpeg", etag)


async def heatmap_dzi(request, slide_id: int, prediction_id: int):
    access = await _slide_access(request, slide_id)
    tiler = await _tiler(request, access, prediction_id)
    body, etag = service.heatmap_dzi(tiler, prediction_id)
    return _immutable(request, body, "application/xml", etag)


async def heatmap_tile(request, slide_id: int, prediction_id: int, level: int, col: int, row: int):
    start = time.perf_counter()
    access = await _slide_access(request, slide_id)
    tiler = await _tiler(request, access, prediction_id)
    body, etag = await service.heatmap_tile(tiler, prediction_id, level, col, row)
    observe_tile(time.perf_counter() - start, "heatmap")
    return _immutable(request, body, "image/png", etag)


async def associated_image(request, slide_id: int, name: str):
    if name not in service.ASSOCIATED:
        raise Http404("no such image")
    access = await _slide_access(request, slide_id)
    body, etag = await service.associated_image(access, name)
    return _immutable(request, body, "image/png", etag)
