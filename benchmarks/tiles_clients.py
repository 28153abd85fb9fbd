"""Tile latency of LowMag, and of OpenSlide's example DeepZoom server, as several HTTP load
generators see it, side by side in one run.

Writes a synthetic 20x slide (16000 x 16000 px by default), pre-renders its DeepZoom tiles as
the portal does after ingest, starts LowMag (``python -m portal.web`` as deployed; ``--servers
web,daphne`` adds the earlier daphne server), and with ``--peer`` OpenSlide's
``examples/deepzoom/deepzoom_server.py`` (Flask, renders every request) on the same file, all
at once. For each DeepZoom level and client count the servers take turns, and on each server
the load generators take turns:

- ``wrk`` (what ``tile_load.py`` runs): the shuffled list of every tile of the level, cycled
  by a Lua script; its ``--latency`` table and ``done()`` summary are kept, and its latency
  histogram is dumped so that the percentiles can also be read *without* wrk's
  coordinated-omission correction (``stats_correct``, applied before anything is printed);
- ``h2load --h1``: the same shuffled list (``-i``), per-request times from ``--log-file``;
- ``hey`` and ``ab -k``: one tile (they take one URL), per-request times from ``-o csv`` and
  ``-g``.

Every percentile here is computed the same way (nearest rank) from per-request times, except
wrk's own. Each run records the 1-minute load average before and after it and the CPU used by
the server (every process of its session) and by the whole machine. Writes
``benchmarks/out/tiles_clients.json`` and prints two markdown tables: every run, and LowMag
beside the peer.

    python benchmarks/tiles_clients.py --work-dir /tmp/lowmag-tail --duration 5
    PYTHONPATH=/path/to/flask python benchmarks/tiles_clients.py --servers web,daphne \\
        --peer /path/to/openslide-python/examples/deepzoom/deepzoom_server.py --tools h2load,wrk
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.tiles import (  # noqa: E402
    OVERLAP,
    SERVERS,
    TILE_SIZE,
    login,
    make_slide,
    portal_env,
    setup_portal,
    web_server,
)
from benchmarks.tiles_peer import peer_server  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "tiles_clients.json"
LOWMAG_TILE = "/slides/{slide}_files/{level}/{col}_{row}.jpeg"
PEER_TILE = "/slide_files/{level}/{col}_{row}.jpeg"  # deepzoom_server.py's one slide
PEER_COOKIE = "bench=peer"  # the peer needs none; sent so that both get the same header load
TOOLS = ("wrk", "h2load", "hey", "ab")
SHUFFLE_SEED = 1234  # the order tile_load.py uses
WRK_LUA = r"""
local urls = {}
local idx = 0

init = function(args)
  for line in io.lines(args[1]) do urls[#urls + 1] = line end
end

request = function()
  idx = idx % #urls + 1
  return wrk.format("GET", urls[idx])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSONRESULT {"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean))
  local out = io.open(os.getenv("WRK_HISTOGRAM"), "w")
  for i = 1, #latency do
    local value, count = latency(i)
    out:write(string.format("%d %d\n", value, count))
  end
  out:close()
end
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16000, help="slide side in pixels")
    parser.add_argument("--levels", default="14,13", help="DeepZoom levels, comma-separated")
    parser.add_argument("--conc", default="1,16,64", help="client counts, comma-separated")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run")
    parser.add_argument("--tools", default=",".join(TOOLS), help="load generators, in turn")
    parser.add_argument(
        "--servers",
        default="web",
        help=f"LowMag servers, in turn ({', '.join(SERVERS)}; web = python -m portal.web)",
    )
    parser.add_argument(
        "--peer",
        type=Path,
        default=None,
        help="OpenSlide's examples/deepzoom/deepzoom_server.py, run beside LowMag on the same "
        "slide and driven by the same clients (Flask importable, e.g. PYTHONPATH=...)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the slide here")
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args()


# -- percentiles -----------------------------------------------------------------------------


def nearest_rank_us(sorted_us: np.ndarray, p: float) -> float:
    """The p-th percentile by nearest rank of sorted per-request times (wrk's rule too)."""
    rank = max(1, math.ceil(p / 100 * len(sorted_us)))
    return float(sorted_us[rank - 1])


def summarise(latencies_us: np.ndarray, seconds: float, clients: int) -> dict:
    lat = np.sort(np.asarray(latencies_us, dtype=np.float64))
    return {
        "requests": len(lat),
        "tiles_per_s": round(len(lat) / seconds, 1),
        "mean_ms": round(float(lat.mean()) / 1000, 3),
        "p50_ms": round(nearest_rank_us(lat, 50) / 1000, 3),
        "p99_ms": round(nearest_rank_us(lat, 99) / 1000, 3),
        "p999_ms": round(nearest_rank_us(lat, 99.9) / 1000, 3),
        "max_ms": round(float(lat[-1]) / 1000, 3),
        "over_50ms": int((lat > 50_000).sum()),
        # a closed-loop client has at most one request in flight per connection: <= 1
        "busy_fraction": round(float(lat.sum()) / (seconds * 1e6 * clients), 3),
    }


def wrk_correction(counts: np.ndarray, interval_us: int, sign: int = 1) -> np.ndarray:
    """wrk 4.x ``stats_correct`` on a histogram (index = microseconds).

    For every recorded latency n >= 2 * interval, wrk adds one sample at n - interval,
    n - 2 * interval, ... down to just above interval: the requests a client sending one every
    ``interval`` would have seen waiting behind that stall. ``sign=-1`` undoes it (the
    histogram wrk prints -> the latencies it recorded).
    """
    counts = counts.astype(np.int64).copy()
    lows = range(2 * interval_us, len(counts))
    for n in reversed(lows) if sign < 0 else lows:
        if counts[n]:
            counts[n - interval_us : interval_us : -interval_us] += sign * counts[n]
    return counts


def histogram_percentile_us(counts: np.ndarray, p: float) -> int:
    """wrk's ``stats_percentile``: first value whose cumulative count reaches the rank."""
    rank = round(p / 100 * counts.sum() + 0.5)
    return int(np.searchsorted(np.cumsum(counts), rank))


# -- runs ------------------------------------------------------------------------------------


@dataclass
class Target:
    base: str  # http://127.0.0.1:PORT
    cookie: str
    url_file: Path  # shuffled tile paths of one level, one a line
    paths: list[str]
    level: int


class Usage:
    """Load average and CPU (server, whole machine) across one run."""

    def __init__(self, server_pid: int):
        self.pid = server_pid

    @staticmethod
    def _machine() -> int:
        with open("/proc/stat") as stat:
            v = [int(x) for x in stat.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]

    def _server(self) -> int:
        """CPU ticks of every process of the server's session (workers and children too)."""
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    v = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(v[3]) == self.pid:  # session id: servers start in their own session
                total += int(v[11]) + int(v[12])
        return total

    def __enter__(self):
        self.load0 = os.getloadavg()[0]
        self.t0, self.m0, self.s0 = time.time(), self._machine(), self._server()
        return self

    def __exit__(self, *exc):
        wall, hz = time.time() - self.t0, os.sysconf("SC_CLK_TCK")
        self.result = {
            "load_1min": [round(self.load0, 2), round(os.getloadavg()[0], 2)],
            "server_cores": round((self._server() - self.s0) / hz / wall, 2),
            "machine_cores": round((self._machine() - self.m0) / hz / wall, 2),
        }
        return False


def run_wrk(target: Target, clients: int, duration: int, scratch: Path) -> dict:
    lua, histogram = scratch / "cycle.lua", scratch / "wrk_histogram.txt"
    lua.write_text(WRK_LUA)
    command = [
        "wrk", "-t", "1", "-c", str(clients), "-d", f"{duration}s", "--timeout", "10s",
        "--latency", "-H", f"Cookie: {target.cookie}", "-s", str(lua), target.base,
        "--", str(target.url_file),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=duration + 120,
        env={**os.environ, "WRK_HISTOGRAM": str(histogram)},
    )  # fmt: skip
    found = re.search(r"^JSONRESULT (.*)$", done.stdout, re.M)
    if not found:
        raise RuntimeError(f"wrk gave no summary:\n{done.stdout}\n{done.stderr}")
    reported = json.loads(found.group(1))
    seconds = reported["duration_us"] / 1e6
    rows = np.loadtxt(histogram, dtype=np.int64, ndmin=2)
    printed = np.zeros(int(rows[:, 0].max()) + 1, dtype=np.int64)
    printed[rows[:, 0]] = rows[:, 1]
    interval = reported["duration_us"] // (reported["requests"] // clients)  # as wrk.c does
    recorded = wrk_correction(printed, interval, sign=-1)
    raw_us = np.repeat(np.arange(len(recorded)), recorded)
    p99_us = reported["p99_us"]
    return {
        "tool": "wrk",
        "url": f"{len(target.paths)} tiles, shuffled",
        "errors": reported["errors"],
        "wrk_reported": {
            "requests": reported["requests"],
            "p50_ms": reported["p50_us"] / 1000,
            "p99_ms": p99_us / 1000,
            "max_ms": reported["max_us"] / 1000,
            "mean_ms": round(reported["mean_us"] / 1000, 3),
            "histogram_samples": int(printed.sum()),
            "correction_interval_us": int(interval),
            # >= 1% of the requests took >= p99: the time that needs, over the time there was
            "p99_wait_over_run": round(
                math.ceil(0.01 * reported["requests"]) * p99_us / (seconds * 1e6 * clients), 2
            ),
            "mean_x_requests_over_run": round(
                reported["mean_us"] * reported["requests"] / (seconds * 1e6 * clients), 3
            ),
            "latency_table": _wrk_latency_table(done.stdout),
        },
        **summarise(raw_us, seconds, clients),
    }


def _wrk_latency_table(stdout: str) -> dict:
    table = re.search(r"Latency Distribution\n((?:\s+\d+%\s+\S+\n)+)", stdout)
    if not table:
        return {}
    return dict(re.findall(r"(\d+%)\s+(\S+)", table.group(1)))


def run_h2load(target: Target, clients: int, duration: int, scratch: Path) -> dict:
    log = scratch / "h2load.log"
    log.unlink(missing_ok=True)
    uris = scratch / "h2load_uris.txt"
    uris.write_text("".join(f"{target.base}{path}\n" for path in target.paths))
    command = [
        "h2load", "--h1", "-c", str(clients), "-t", "1", "-D", str(duration),
        "-H", f"cookie: {target.cookie}", "-i", str(uris), f"--log-file={log}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120)
    if done.returncode != 0 or not log.exists():
        raise RuntimeError(f"h2load failed:\n{done.stdout}\n{done.stderr}")
    rows = np.loadtxt(log, dtype=np.int64, ndmin=2)  # start µs since epoch, status, µs
    ok = rows[rows[:, 1] == 200]
    seconds = (ok[:, 0] + ok[:, 2]).max() / 1e6 - ok[:, 0].min() / 1e6
    result = {
        "tool": "h2load",
        "url": f"{len(target.paths)} tiles, shuffled",
        "errors": int((rows[:, 1] != 200).sum()),
        **summarise(ok[:, 2], seconds, clients),
    }
    # what wrk would print for these very requests: its correction applied to them
    interval = int(seconds * 1e6) // (len(ok) // clients)
    counts = wrk_correction(np.bincount(ok[:, 2]), interval)
    result["wrk_rule_p99_ms"] = histogram_percentile_us(counts, 99) / 1000
    return result


def run_hey(target: Target, clients: int, duration: int, scratch: Path) -> dict:
    url = target.base + target.paths[0]
    command = [
        "hey", "-z", f"{duration}s", "-c", str(clients), "-H", f"Cookie: {target.cookie}",
        "-o", "csv", url,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"hey failed:\n{done.stdout}\n{done.stderr}")
    rows = list(csv.DictReader(done.stdout.splitlines()))
    ok = [row for row in rows if row["status-code"] == "200"]
    if ok:  # the offset of the last answer is closer to the run's length than the wall time
        seconds = max(float(r["offset"]) + float(r["response-time"]) for r in ok)
    lat_us = np.array([float(row["response-time"]) * 1e6 for row in ok])
    return {
        "tool": "hey",
        "url": "one tile",
        "errors": len(rows) - len(ok),
        **summarise(lat_us, seconds, clients),
    }


def run_ab(target: Target, clients: int, duration: int, scratch: Path) -> dict:
    table = scratch / "ab.tsv"
    table.unlink(missing_ok=True)
    command = [
        "ab", "-k", "-q", "-c", str(clients), "-t", str(duration), "-n", "100000000",
        "-H", f"Cookie: {target.cookie}", "-g", str(table), target.base + target.paths[0],
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120)
    if done.returncode != 0 or not table.exists():
        raise RuntimeError(f"ab failed:\n{done.stdout}\n{done.stderr}")
    rows = [line.split("\t") for line in table.read_text().splitlines()[1:]]
    # columns: starttime, seconds, ctime, dtime, ttime, wait (the times in whole ms)
    lat_us = np.array([int(r[4]) for r in rows], dtype=np.float64) * 1000
    seconds = float(re.search(r"Time taken for tests:\s+([\d.]+)", done.stdout).group(1))
    failed = int(re.search(r"Failed requests:\s+(\d+)", done.stdout).group(1))
    keep_alive = re.search(r"Keep-Alive requests:\s+(\d+)", done.stdout)
    return {
        "tool": "ab",
        "url": "one tile (ms resolution)",
        "errors": failed,
        "keep_alive_requests": int(keep_alive.group(1)) if keep_alive else 0,
        **summarise(lat_us, seconds, clients),
    }


def warm_up(target: Target) -> None:
    """Every tile of the list once, on one connection: all of them in the server's cache."""
    command = ["h2load", "--h1", "-c", "1", "-n", str(len(target.paths)), "-i", "-"]
    command += ["-H", f"cookie: {target.cookie}"]
    uris = "".join(f"{target.base}{path}\n" for path in target.paths)
    subprocess.run(command, input=uris, capture_output=True, text=True, check=True, timeout=300)


RUNNERS = {"wrk": run_wrk, "h2load": run_h2load, "hey": run_hey, "ab": run_ab}


# -- setup and report ------------------------------------------------------------------------


def shuffled_paths(
    slide_id: int, width: int, height: int, level: int, pattern: str = LOWMAG_TILE
) -> list[str]:
    """Every tile of a DeepZoom level, in tile_load.py's shuffled order."""
    from analysis.heatmap import DeepZoomGeometry

    n_cols, n_rows = DeepZoomGeometry(width, height, TILE_SIZE, OVERLAP).level_tiles[level]
    tiles = [(col, row) for row in range(n_rows) for col in range(n_cols)]
    random.Random(SHUFFLE_SEED).shuffle(tiles)
    return [pattern.format(slide=slide_id, level=level, col=col, row=row) for col, row in tiles]


def prepare(work: Path, size: int):
    slide_dir = work / "data" / "slides"
    slide_dir.mkdir(parents=True, exist_ok=True)
    slide = make_slide(slide_dir, "20x", size, 0.5, seed=11)
    setup_portal(work, [slide])
    subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); import pathlib; "
         "from portal.viewer.tileservice import pretile; "
         f"pretile(pathlib.Path({str(slide.path)!r}), 20000)"],
        env=portal_env(work), cwd=ROOT, check=True,
    )  # fmt: skip
    return slide


def markdown(runs: list[dict]) -> str:
    lines = [
        "| level | clients | server | tool | requests | tiles/s | p50 ms | p99 ms | p99.9 ms | max ms |"
        " >50 ms | wrk as printed: p50, p99 ms | load 1-min | server, machine cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        printed = run.get("wrk_reported")
        shown = f"{printed['p50_ms']:.1f}, **{printed['p99_ms']:.1f}**" if printed else ""
        if "wrk_rule_p99_ms" in run:
            shown = f"(wrk's rule on these: p99 {run['wrk_rule_p99_ms']:.1f})"
        lines.append(
            f"| {run['level']} | {run['clients']} | {run['server']} | {run['tool']} | "
            f"{run['requests']} | "
            f"{run['tiles_per_s']:.0f} | {run['p50_ms']:.2f} | **{run['p99_ms']:.2f}** | "
            f"{run['p999_ms']:.1f} | {run['max_ms']:.1f} | {run['over_50ms']} | {shown} | "
            f"{run['load_1min'][0]} -> {run['load_1min'][1]} | "
            f"{run['server_cores']}, {run['machine_cores']} |"
        )
    return "\n".join(lines)


def side_by_side(runs: list[dict]) -> str:
    """LowMag (each server) beside the peer: same level, clients and tool, one run."""
    peer = {(r["level"], r["clients"], r["tool"]): r for r in runs if r["server"] == "peer"}
    if not peer:
        return ""
    lines = [
        "| level | clients | tool | LowMag server | LowMag: tiles/s, p50, p99 ms |"
        " deepzoom_server: tiles/s, p50, p99 ms | throughput ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        other = peer.get((run["level"], run["clients"], run["tool"]))
        if run["server"] == "peer" or other is None:
            continue
        lines.append(
            f"| {run['level']} | {run['clients']} | {run['tool']} | {run['server']} | "
            f"{run['tiles_per_s']:.0f}, {run['p50_ms']:.2f}, **{run['p99_ms']:.2f}** | "
            f"{other['tiles_per_s']:.0f}, {other['p50_ms']:.2f}, {other['p99_ms']:.2f} | "
            f"{run['tiles_per_s'] / max(other['tiles_per_s'], 1e-9):.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in RUNNERS]
    if unknown:
        sys.exit(f"unknown tool(s) {', '.join(unknown)}: choose from {', '.join(TOOLS)}")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        sys.exit(f"not on PATH: {', '.join(missing)} (apt-get install wrk nghttp2-client hey "
                 "apache2-utils), or leave them out with --tools")  # fmt: skip
    servers = [x for x in args.servers.split(",") if x]
    if not servers or set(servers) - set(SERVERS):
        sys.exit(f"--servers: choose from {', '.join(SERVERS)}")
    if args.peer is not None and not args.peer.is_file():
        sys.exit(f"--peer {args.peer}: no such file (examples/deepzoom/deepzoom_server.py)")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lowmag-clients-"))
    scratch = Path(tempfile.mkdtemp(prefix="tile-clients-"))
    runs: list[dict] = []
    try:
        slide = prepare(work, args.size)
        with ExitStack() as stack:
            # every server up at once, idle while another is driven: the cells interleave
            # (level, clients, then server by server), so a drift in the machine's load
            # falls on all of them alike
            bases: dict[str, tuple[str, str, str, int]] = {}
            for server in servers:
                port, pid = stack.enter_context(web_server(work, server))
                bases[server] = (f"http://127.0.0.1:{port}", login(port), LOWMAG_TILE, pid)
            if args.peer is not None:
                port, pid = stack.enter_context(peer_server(args.peer, slide.path, work))
                bases["peer"] = (f"http://127.0.0.1:{port}", PEER_COOKIE, PEER_TILE, pid)
            for level in (int(x) for x in args.levels.split(",")):
                targets = {}
                for name, (base, cookie, pattern, pid) in bases.items():
                    paths = shuffled_paths(
                        slide.slide_id, slide.width, slide.height, level, pattern
                    )
                    url_file = scratch / f"urls_{name}_{level}.txt"
                    url_file.write_text("\n".join(paths) + "\n")
                    targets[name] = (Target(base, cookie, url_file, paths, level), pid)
                    warm_up(targets[name][0])
                for clients in (int(x) for x in args.conc.split(",")):
                    for name, (target, pid) in targets.items():
                        for tool in tools:
                            time.sleep(1)
                            with Usage(pid) as usage:
                                run = RUNNERS[tool](target, clients, args.duration, scratch)
                            run.update(level=level, clients=clients, server=name, **usage.result)
                            runs.append(run)
                            print(
                                f"level {level} c={clients:<3d} {name:7s} {tool:7s} "
                                f"n={run['requests']:<6d} p50 {run['p50_ms']:6.2f} "
                                f"p99 {run['p99_ms']:7.2f} max {run['max_ms']:7.1f} ms  "
                                f"load {run['load_1min']}",
                                flush=True,
                            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"duration_s": args.duration, "cpus": os.cpu_count(), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(runs))
    print()
    print(side_by_side(runs))


if __name__ == "__main__":
    main()
