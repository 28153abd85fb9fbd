"""Prometheus metrics at ``/metrics`` (text exposition format 0.0.4, written by hand).

- ``lowmag_analysis_jobs{state}``: analysis jobs by state, read from the database;
- ``lowmag_analysis_job_duration_seconds{state}``: histogram of finished jobs' run time
  (``started_at`` -> ``finished_at``), aggregated by the database at scrape time;
- ``lowmag_tile_seconds{kind}``: tile render latency in this process, fed by
  :func:`observe_tile` (each web process keeps its own; Prometheus sums over targets);
- ``lowmag_gpu_present{worker}`` and ``lowmag_gpu_memory_bytes{worker,kind}``: the GPU memory
  of each analysis worker process (allocated, reserved, peak, total; 0 and absent on a CPU
  worker), published by the worker after each job (:func:`publish_worker_memory`) through
  Redis (or this process when there is no Redis); ``lowmag_gpu_workers`` counts them.

Access: ``Authorization: Bearer $METRICS_TOKEN`` when ``METRICS_TOKEN`` is set, otherwise
loopback clients only.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TILE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
JOB_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
LOOPBACK_ADDRS = frozenset({"127.0.0.1", "::1"})


class Histogram:
    """A thread-safe cumulative histogram with one label (Prometheus semantics)."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._series: dict[str, tuple[list[int], float, int]] = {}

    def observe(self, value: float, label: str) -> None:
        with self._lock:
            counts, total, n = self._series.get(label) or ([0] * len(self.buckets), 0.0, 0)
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    counts[i] += 1
            self._series[label] = (counts, total + value, n + 1)

    def snapshot(self) -> dict[str, tuple[list[int], float, int]]:
        with self._lock:
            return {k: (list(c), s, n) for k, (c, s, n) in self._series.items()}

    def reset(self) -> None:
        with self._lock:
            self._series.clear()


_tile_latency = Histogram(TILE_BUCKETS_S)


def observe_tile(seconds: float, kind: str = "slide") -> None:
    """Record one tile response time; ``kind`` is e.g. ``slide``, ``heatmap``, ``associated``."""
    if seconds >= 0 and math.isfinite(seconds):
        _tile_latency.observe(float(seconds), kind)


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _escape(label_value: str) -> str:
    return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def histogram_lines(
    name: str,
    help_text: str,
    label: str,
    buckets: Sequence[float],
    series: dict[str, tuple[list[int], float, int]],
) -> list[str]:
    """Exposition lines for a histogram whose bucket counts are already cumulative."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for label_value in sorted(series):
        counts, total, n = series[label_value]
        lv = f'{label}="{_escape(label_value)}"'
        for upper, count in zip(buckets, counts, strict=True):
            lines.append(f'{name}_bucket{{{lv},le="{_fmt(upper)}"}} {count}')
        lines.append(f'{name}_bucket{{{lv},le="+Inf"}} {n}')
        lines.append(f"{name}_sum{{{lv}}} {total!r}")
        lines.append(f"{name}_count{{{lv}}} {n}")
    return lines


def job_state_counts() -> dict[str, int]:
    from portal.analyses.models import AnalysisJob

    counts = dict.fromkeys(AnalysisJob.State.values, 0)
    for row in AnalysisJob.objects.order_by().values("state").annotate(n=Count("id")):
        counts[row["state"]] = row["n"]
    return counts


def job_duration_series() -> dict[str, tuple[list[int], float, int]]:
    """Per final state: cumulative bucket counts, total seconds, count (one SQL query)."""
    from portal.analyses.models import AnalysisJob

    duration = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    per_bucket = {
        f"le_{i}": Count("id", filter=Q(duration__lte=timedelta(seconds=upper)))
        for i, upper in enumerate(JOB_BUCKETS_S)
    }
    rows = (
        AnalysisJob.objects.order_by()
        .filter(started_at__isnull=False, finished_at__isnull=False)
        .annotate(duration=duration)
        .values("state")
        .annotate(n=Count("id"), total=Sum("duration"), **per_bucket)
    )
    series = {}
    for row in rows:
        counts = [row[f"le_{i}"] for i in range(len(JOB_BUCKETS_S))]
        total = row["total"].total_seconds() if row["total"] is not None else 0.0
        series[row["state"]] = (counts, total, row["n"])
    return series


def _gauge_lines(name: str, help_text: str, label: str, values: dict[str, int]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines += [f'{name}{{{label}="{_escape(k)}"}} {v}' for k, v in sorted(values.items())]
    return lines


def _database_lines() -> Iterable[str]:
    try:
        states = job_state_counts()
        durations = job_duration_series()
    except Exception as exc:  # noqa: BLE001 - a scrape reports the failure, never a 500
        log.warning("metrics: database query failed: %s", exc)
        return ["# TYPE lowmag_database_up gauge", "lowmag_database_up 0"]
    lines = ["# TYPE lowmag_database_up gauge", "lowmag_database_up 1"]
    lines += _gauge_lines("lowmag_analysis_jobs", "Analysis jobs by state.", "state", states)
    lines += histogram_lines(
        "lowmag_analysis_job_duration_seconds",
        "Run time of finished analysis jobs (started to finished).",
        "state",
        JOB_BUCKETS_S,
        durations,
    )
    return lines


GPU_REDIS_KEY = "lowmag:metrics:gpu"
GPU_STALE_S = 900  # a worker silent for this long is left out (it restarted or went away)
GPU_KINDS = ("allocated", "reserved", "peak", "total")
_local_gpu: dict[str, str] = {}  # worker -> JSON, when there is no Redis (thread/sync tasks)


def _redis():
    url = getattr(settings, "REDIS_URL", "")
    if not url:
        return None
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def publish_worker_memory(worker: str | None = None) -> None:
    """Record this process's GPU memory (zeros and absent on a CPU) for ``/metrics``."""
    from analysis.devices import accelerator_memory

    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    payload = json.dumps({**accelerator_memory(), "at": time.time()})
    try:
        client = _redis()
        if client is None:
            _local_gpu[worker] = payload
        else:
            client.hset(GPU_REDIS_KEY, worker, payload)
    except Exception as exc:  # noqa: BLE001 - metrics never fail a job
        log.warning("metrics: could not publish GPU memory: %s", exc)


def worker_memory() -> dict[str, dict]:
    """Worker -> its last published GPU memory, leaving out stale workers."""
    client = _redis()
    raw = dict(_local_gpu) if client is None else client.hgetall(GPU_REDIS_KEY)
    now, out = time.time(), {}
    for worker, payload in raw.items():
        name = worker.decode() if isinstance(worker, bytes) else str(worker)
        try:
            entry = json.loads(payload)
        except (TypeError, ValueError):
            continue
        if now - float(entry.get("at", 0)) <= GPU_STALE_S:
            out[name] = entry
    return out


def _gpu_lines() -> list[str]:
    try:
        workers = worker_memory()
    except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
        log.warning("metrics: GPU memory unavailable: %s", exc)
        workers = {}
    lines = [
        "# HELP lowmag_gpu_workers Analysis worker processes that reported their GPU memory.",
        "# TYPE lowmag_gpu_workers gauge",
        f"lowmag_gpu_workers {len(workers)}",
        "# HELP lowmag_gpu_present 1 when the worker process runs its models on a GPU.",
        "# TYPE lowmag_gpu_present gauge",
    ]
    for worker in sorted(workers):
        present = 1 if workers[worker].get("present") else 0
        lines.append(f'lowmag_gpu_present{{worker="{_escape(worker)}"}} {present}')
    lines += [
        "# HELP lowmag_gpu_memory_bytes GPU memory of each analysis worker process.",
        "# TYPE lowmag_gpu_memory_bytes gauge",
    ]
    for worker in sorted(workers):
        for kind in GPU_KINDS:
            value = int(workers[worker].get(f"{kind}_bytes", 0) or 0)
            lines.append(
                f'lowmag_gpu_memory_bytes{{worker="{_escape(worker)}",kind="{kind}"}} {value}'
            )
    return lines


def render_metrics() -> str:
    lines = list(_database_lines())
    lines += histogram_lines(
        "lowmag_tile_seconds",
        "Tile response time in this web process.",
        "kind",
        TILE_BUCKETS_S,
        _tile_latency.snapshot(),
    )
    lines += _gpu_lines()
    return "\n".join(lines) + "\n"


def is_authorised(request: HttpRequest) -> bool:
    token = getattr(settings, "METRICS_TOKEN", "")
    if not token:
        return request.META.get("REMOTE_ADDR") in LOOPBACK_ADDRS
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    if not is_authorised(request):
        response = HttpResponse(
            "metrics need a bearer token\n", status=401, content_type=CONTENT_TYPE
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(render_metrics(), content_type=CONTENT_TYPE)
