"""The portal's web server as deployed: ``python -m portal.web``.

One place for how HTTP and websockets are served, used by the containers, the Kubernetes
manifests, ``deploy/run-local-prod.sh``, ``make demo``, the browser tests and the tile
benchmarks. It runs ``portal.asgi:application`` under uvicorn with its C parser (httptools)
on the libuv event loop (uvloop), websockets through ``websockets`` (its sans-I/O protocol).

Why not daphne: a cached tile cost the process 0.25-0.65 ms of CPU under daphne (Twisted's
HTTP parsing and per-request objects) and 0.07-0.13 ms under uvicorn, so one daphne process
served 1,000-4,100 tiles/s and 64 viewers' tiles queued behind each other to a p99 of 45-92 ms;
uvicorn serves the same application at 7,600-14,100 tiles/s with a p99 of 12-29 ms
(``benchmarks/tiles_clients.py --servers web,daphne``; ``benchmarks/README.md``, "Tiles").

    python -m portal.web                                # 127.0.0.1:8000, one process
    python -m portal.web --host 0.0.0.0 --port 8000 --proxy-headers   # behind nginx

Settings (environment, overridden by the options): ``LOWMAG_WEB_HOST``, ``LOWMAG_WEB_PORT``,
``LOWMAG_WEB_WORKERS`` (processes sharing the port; default 1: scale containers instead), and
``LOWMAG_FORWARDED_ALLOW_IPS``: the proxies whose ``X-Forwarded-For``/``-Proto`` are believed
with ``--proxy-headers`` (default ``127.0.0.1``; ``*`` only where nothing but the proxy can
reach this port). Without ``--proxy-headers`` those headers are ignored, so a client cannot
pose as another address.
"""

from __future__ import annotations

import argparse
import os
import sys

APP = "portal.asgi:application"
GRACEFUL_SHUTDOWN_S = 10  # open websockets get a close frame; then the process exits
# An idle keep-alive connection is kept this long: longer than nginx keeps its idle upstream
# connections (deploy/nginx.conf, 60 s), so nginx, not the server, closes them.
KEEPALIVE_S = 75
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a whole number, not {raw!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m portal.web", description="Serve the LowMag portal (HTTP + websockets)."
    )
    parser.add_argument("--host", default=os.environ.get("LOWMAG_WEB_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=_env_int("LOWMAG_WEB_PORT", 8000))
    parser.add_argument(
        "--workers",
        type=int,
        default=_env_int("LOWMAG_WEB_WORKERS", 1),
        help="processes sharing the port (default 1)",
    )
    parser.add_argument(
        "--proxy-headers",
        action="store_true",
        help="believe X-Forwarded-For/-Proto from LOWMAG_FORWARDED_ALLOW_IPS (behind nginx)",
    )
    parser.add_argument(
        "--keepalive",
        type=int,
        default=_env_int("LOWMAG_WEB_KEEPALIVE_S", KEEPALIVE_S),
        help=f"seconds an idle connection is kept (default {KEEPALIVE_S})",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOWMAG_WEB_LOG_LEVEL", "info").lower(),
        help=f"one of {', '.join(LOG_LEVELS)} (default info)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1-65535, not {args.port}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, not {args.workers}")
    if args.log_level not in LOG_LEVELS:
        parser.error(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {args.log_level!r}")
    if args.keepalive < 1:
        parser.error(f"--keepalive must be at least 1 second, not {args.keepalive}")
    return args


def server_options(args: argparse.Namespace) -> dict:
    """uvicorn.run's keyword arguments for these options."""
    return {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "loop": "uvloop",
        "http": "httptools",
        "ws": "websockets-sansio",
        "lifespan": "off",  # Django and Channels have no lifespan events
        "access_log": False,  # nginx keeps the access log; per-request lines cost CPU here
        "server_header": False,
        "proxy_headers": args.proxy_headers,
        "forwarded_allow_ips": os.environ.get("LOWMAG_FORWARDED_ALLOW_IPS", "127.0.0.1"),
        "timeout_keep_alive": args.keepalive,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "log_level": args.log_level,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        sys.exit(f"the web server needs uvicorn[standard] ({exc}); run `make setup`")
    uvicorn.run(APP, **server_options(args))


if __name__ == "__main__":
    main()
