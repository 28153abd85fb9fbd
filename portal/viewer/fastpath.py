"""ASGI adapter of the tile service: a lean path for slide and heatmap tile GETs.

A viewer asks for hundreds of tiles a minute; through Django's full middleware chain a cached
tile costs ~3 ms of CPU, mostly thread hops. Tile GETs are answered here instead, with the same
checks: the session cookie is resolved to a user exactly as Django does
(``django.contrib.auth.get_user``: session expiry, the user's backend, active flag, session
hash), then the same (user, slide) grant as ``tiles.py``; both live in
``portal.viewer.tileservice`` and are reused for ``ACCESS_TTL_S`` seconds, so a warm tile
needs no database and no thread hop. Every other request goes to Django.

When a session or grant is due again, a viewer has dozens of tile requests in flight with
the same cookie. They share one lookup (``_shared``): before, each made its own, one after
another on the single database thread, and the last tile of the burst waited 0.2-0.3 s.
"""

from __future__ import annotations

import asyncio
import re
import time
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import Http404

from portal.core.metrics import observe_tile
from portal.viewer import tileservice as service

SLIDE_TILE = re.compile(r"^/slides/(\d+)_files/(\d+)/(\d+)_(\d+)\.jpeg$")
HEATMAP_TILE = re.compile(r"^/slides/(\d+)/heatmap/(\d+)_files/(\d+)/(\d+)_(\d+)\.png$")
COMMON_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"vary", b"Cookie"),
]


def _session_key(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookie = SimpleCookie()
            try:
                cookie.load(value.decode("latin-1"))
            except Exception:  # noqa: BLE001 - a malformed cookie is no session
                return None
            morsel = cookie.get(settings.SESSION_COOKIE_NAME)
            return morsel.value if morsel else None
    return None


_in_flight: dict[tuple, asyncio.Future] = {}  # lookups running now, by (kind, key)


async def _shared(key: tuple, lookup, *args):
    """``lookup(*args)`` in the database thread, once for all requests asking for ``key`` at the
    same time. Shielded: a client that goes away does not cancel the others' answer."""
    loop = asyncio.get_running_loop()
    future = _in_flight.get(key)
    if future is None or future.get_loop() is not loop:
        future = asyncio.ensure_future(sync_to_async(lookup)(*args))
        _in_flight[key] = future
        future.add_done_callback(lambda done: _forget(key, done))
    return await asyncio.shield(future)


def _forget(key: tuple, done: asyncio.Future) -> None:
    if _in_flight.get(key) is done:
        del _in_flight[key]


def _resolve_session(session_key: str):
    from django.db import close_old_connections

    close_old_connections()
    return service.session_user(session_key)


def _grant(user, slide_id: int):
    from django.db import close_old_connections

    close_old_connections()
    return service.grant_for(user, slide_id)


async def _access_for(scope, slide_id: int):
    session_key = _session_key(scope)
    if not session_key:
        return None
    known, user = service.cached_session_user(session_key)
    if not known:
        user = await _shared(("session", session_key), _resolve_session, session_key)
    if user is None:
        return None
    access = service.cached_grant(user.pk, slide_id)
    if access is None:
        access = await _shared(("grant", user.pk, slide_id), _grant, user, slide_id)
    return access


async def _respond(send, status: int, body: bytes, headers: list, head_only: bool) -> None:
    headers = [*headers, *COMMON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else body})


async def _not_found(send, head_only: bool) -> None:
    await _respond(send, 404, b"Not Found", [(b"content-type", b"text/plain")], head_only)


def _if_none_match(scope) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == b"if-none-match":
            return value
    return None


async def _immutable(scope, send, body: bytes, content_type: bytes, etag: str) -> None:
    head_only = scope["method"] == "HEAD"
    headers = [
        (b"etag", etag.encode()),
        (b"cache-control", service.CACHE_CONTROL.encode()),
    ]
    if _if_none_match(scope) == etag.encode():
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    await _respond(send, 200, body, [(b"content-type", content_type), *headers], head_only)


async def _slide_tile(scope, send, slide_id: int, level: int, col: int, row: int) -> None:
    start = time.perf_counter()
    head_only = scope["method"] == "HEAD"
    access = await _access_for(scope, slide_id)
    if access is None:
        return await _not_found(send, head_only)
    try:
        body, etag = await service.slide_tile(access, level, col, row)
    except Http404:
        return await _not_found(send, head_only)
    except service.TileReadError as exc:
        return await _respond(
            send, 502, str(exc).encode(), [(b"content-type", b"text/plain")], head_only
        )
    observe_tile(time.perf_counter() - start, "slide")
    await _immutable(scope, send, body, b"image/jpeg", etag)


async def _heatmap_tile(scope, send, ids: tuple[int, ...]) -> None:
    start = time.perf_counter()
    slide_id, prediction_id, level, col, row = ids
    head_only = scope["method"] == "HEAD"
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    try:
        threshold = service.parse_threshold((query.get("threshold") or ["0"])[-1])
        layer = service.parse_layer((query.get("layer") or ["score"])[-1])
        access = await _access_for(scope, slide_id)
        if access is None:
            raise Http404("no such slide")
        tiler = await service.tiler_for(access, prediction_id, threshold, layer)
        body, etag = await service.heatmap_tile(tiler, prediction_id, level, col, row)
    except Http404:
        return await _not_found(send, head_only)
    observe_tile(time.perf_counter() - start, "heatmap")
    await _immutable(scope, send, body, b"image/png", etag)


class TileFastPath:
    """ASGI middleware: answers tile GET/HEADs itself, passes everything else to ``app``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"]
            if match := SLIDE_TILE.match(path):
                return await _slide_tile(scope, send, *(int(g) for g in match.groups()))
            if match := HEATMAP_TILE.match(path):
                return await _heatmap_tile(scope, send, tuple(int(g) for g in match.groups()))
        return await self.app(scope, receive, send)
