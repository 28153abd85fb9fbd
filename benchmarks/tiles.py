"""Tile serving under concurrent viewers: slide JPEG tiles and heatmap PNG tiles.

Sets up a throwaway portal (SQLite, files in a temporary ``LOWMAG_DATA_DIR``): a pathologist
whose cohort holds a synthetic 20x slide (16000x16000 px) with a prediction over its patch
grid, and a synthetic 5x slide (8500x8500 px, ~8000 patches) with a prediction. Then, for each
client count (1, 16, 64), it starts the web server (``python -m portal.web``) afresh (empty tile caches), logs in, and drives
keep-alive HTTP/1.1 connections from an asyncio client:

- cold pass: every tile of the slide pyramid's levels up to one below full resolution is
  requested once, lowest levels first (a viewer opening the slide);
- warm pass: random tiles of that same set again (encoded tiles now cached by the server);
- the same two passes for heatmap overlay tiles (rendered on each request from the raster).

Beside it, the in-process floor: ``DeepZoomGenerator.get_tile`` + JPEG encode and
``HeatmapTiler.tile_png`` per tile, and the whole overlay (all tiles of all levels) of the
5x slide, in process and through the server. The load generator runs on the same cores as
the server. Prints a markdown table, writes ``benchmarks/out/tiles.json`` and the
"Tiles" section of ``benchmarks/README.md``.

    python benchmarks/tiles.py                         # about 2-4 minutes on 2 cores
    python benchmarks/tiles.py --clients 16 --warm-requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.files import write_markdown_section  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "out"
README = ROOT / "benchmarks" / "README.md"
SECTION = "## Tiles"
PASSWORD = "tile-bench-password-42"
TILE_SIZE, OVERLAP, JPEG_QUALITY = 254, 1, 80  # as portal.viewer.tiles serves them
ANCHOR = {  # OpenSlide's DeepZoom example server, 16k x 16k slide, loopback (NOTES.md)
    1: {"tiles_per_s": 189, "p99_ms": 10.5},
    16: {"tiles_per_s": 360, "p99_ms": 70},
    64: {"tiles_per_s": 330, "p99_ms": 255},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16000, help="20x slide side in pixels")
    parser.add_argument("--heatmap-size", type=int, default=8500, help="5x slide side (px)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--levels-below-top", type=int, default=1, help="cold set: levels up to top minus this"
    )
    parser.add_argument("--warm-requests", type=int, default=2000, help="per warm pass")
    parser.add_argument("--pass-seconds", type=float, default=30.0, help="cap per pass")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep slides here")
    parser.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    parser.add_argument(
        "--compare", type=Path, default=None, help="an earlier tiles.json to show beside this run"
    )
    parser.add_argument("--setup-db", type=Path, help=argparse.SUPPRESS)  # internal
    return parser.parse_args()


# -- slides and the portal's records --------------------------------------------------------------


@dataclass
class BenchSlide:
    key: str  # "20x" or "5x"
    path: Path  # absolute
    file: str  # relative to SLIDE_DIR
    width: int
    height: int
    mpp: float
    grid: dict  # n_rows, n_cols, l0_patch_size, grid_rc
    scores: list[float]
    slide_id: int = 0
    prediction_id: int = 0


def make_slide(slide_dir: Path, key: str, size: int, mpp: float, seed: int) -> BenchSlide:
    from analysis.slides import open_slide
    from analysis.synth import write_synthetic_slide
    from analysis.tissue import patch_grid

    path = slide_dir / f"bench{key}-{size}" / "slide.svs"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_slide(path, width=size, height=size, seed=seed, mpp=mpp)
    with open_slide(path) as slide:
        grid = patch_grid(slide)
    rng = np.random.default_rng(seed)
    scores = rng.random(len(grid.grid_rc)).astype(np.float32)
    return BenchSlide(
        key=key,
        path=path,
        file=str(path.relative_to(slide_dir)),
        width=size,
        height=size,
        mpp=mpp,
        grid={
            "n_rows": grid.n_rows,
            "n_cols": grid.n_cols,
            "l0_patch_size": grid.l0_patch_size,
            "grid_rc": grid.grid_rc.tolist(),
        },
        scores=[float(s) for s in scores],
    )


def create_records(spec_path: Path) -> None:
    """Runs in a subprocess with the portal's settings: user, cohort, cases, predictions."""
    import django

    django.setup()
    from django.contrib.auth.models import User

    from portal.analyses.models import AnalysisJob, ModelVersion, Prediction
    from portal.cases.models import Case, Cohort, Membership, Slide

    spec = json.loads(spec_path.read_text())
    user = User.objects.create_user("bench", "bench@example.org", PASSWORD)
    cohort = Cohort.objects.create(name="Bench", slug="bench")
    Membership.objects.create(user=user, cohort=cohort, role="pathologist")
    model = ModelVersion.objects.create(
        name="bench", version="1", task="t", classes=["normal", "lesion"], magnification=5,
        bundle_path="/nonexistent", sha256="f" * 64,
    )  # fmt: skip
    made = {}
    for item in spec["slides"]:
        case = Case.objects.create(
            cohort=cohort, patient_id=item["key"], accession_number=item["key"], status="ready"
        )
        slide = Slide.objects.create(
            case=case, original_name="slide.svs", file=item["file"], sha256=item["key"] * 32,
            size_bytes=1, vendor="aperio", mpp=item["mpp"], magnification=10 / item["mpp"],
            width=item["width"], height=item["height"], level_count=3, status="ready",
        )  # fmt: skip
        job = AnalysisJob.objects.create(
            slide=slide, model_version=model, idempotency_key=item["key"], state="succeeded"
        )
        prediction = Prediction.objects.create(
            job=job, slide=slide, model_version=model, probabilities={"normal": 0.4, "lesion": 0.6},
            predicted_class="lesion", confidence=0.6,
            instance_scores=Prediction.pack_scores(np.asarray(item["scores"])), grid=item["grid"],
        )  # fmt: skip
        made[item["key"]] = {"slide_id": slide.pk, "prediction_id": prediction.pk}
    print(json.dumps(made))


# -- the server -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def portal_env(work: Path) -> dict:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "LOWMAG_DATA_DIR": str(work / "data"),
        "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
        "LOWMAG_TASK_MODE": "sync",
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONPATH": str(ROOT),
        "DEBUG": "false",
    }
    env.pop("REDIS_URL", None)
    return env


def setup_portal(work: Path, slides: list[BenchSlide]) -> None:
    env = portal_env(work)
    (work / "db.sqlite3").unlink(missing_ok=True)
    python = sys.executable
    subprocess.run(
        [python, "manage.py", "migrate", "--noinput", "-v", "0"], env=env, cwd=ROOT, check=True
    )
    spec = work / "records.json"
    spec.write_text(json.dumps({"slides": [s.__dict__ | {"path": str(s.path)} for s in slides]}))
    done = subprocess.run(
        [python, __file__, "--setup-db", str(spec)],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    made = json.loads(done.stdout.strip().splitlines()[-1])
    for slide in slides:
        slide.slide_id = made[slide.key]["slide_id"]
        slide.prediction_id = made[slide.key]["prediction_id"]


SERVERS = ("web", "daphne")  # web: python -m portal.web, as deployed; daphne: the earlier server


def server_command(server: str, port: int) -> list[str]:
    if server == "web":
        return [sys.executable, "-m", "portal.web", "--port", str(port)]
    if server == "daphne":
        return [str(Path(sys.executable).parent / "daphne"), "-b", "127.0.0.1", "-p", str(port),
                "portal.asgi:application"]  # fmt: skip
    raise ValueError(f"unknown server {server!r}: choose from {', '.join(SERVERS)}")


@contextmanager
def web_server(work: Path, server: str = "web"):
    """The portal's web server (``python -m portal.web`` as deployed, or ``daphne`` to compare)
    on a free loopback port; killed on exit."""
    port = _free_port()
    log = open(work / f"{server}.log", "ab")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        server_command(server, port), env=portal_env(work), cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_until_up(port, process)
        yield port, process.pid
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
        log.close()


def _wait_until_up(port: int, server: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the web server did not start; see its log in the work folder")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status < 500:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the web server on port {port} did not answer within {timeout_s} s")


def _cookie(response, name: str) -> str:
    for header, value in response.getheaders():
        if header.lower() == "set-cookie" and value.startswith(f"{name}="):
            return value.split(";", 1)[0]
    raise RuntimeError(f"no {name} cookie in the answer")


def login(port: int) -> str:
    """GET the CSRF cookie, POST /api/v1/auth/login with it; returns the session cookie."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/v1/auth/login")
    first = conn.getresponse()
    first.read()
    csrf = _cookie(first, "csrftoken")
    body = json.dumps({"username": "bench", "password": PASSWORD})
    headers = {
        "Content-Type": "application/json",
        "Cookie": csrf,
        "X-CSRFToken": csrf.split("=", 1)[1],
    }
    conn.request("POST", "/api/v1/auth/login", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"login failed with HTTP {response.status}")
    return _cookie(response, "sessionid")


# -- the load generator ---------------------------------------------------------------------------


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection (GET only; Content-Length or chunked bodies)."""

    def __init__(self, port: int, cookie: str):
        self.port, self.cookie = port, cookie
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, int]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Cookie: {self.cookie}\r\nConnection: keep-alive\r\n\r\n"
        )
        self.writer.write(request.encode())
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        size = await self._read_body(headers)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, size

    async def _read_body(self, headers: dict) -> int:
        if "content-length" in headers:
            return len(await self.reader.readexactly(int(headers["content-length"])))
        if headers.get("transfer-encoding", "").lower() != "chunked":
            return 0
        size = 0
        while (chunk := int((await self.reader.readline()).split(b";")[0], 16)) > 0:
            size += len(await self.reader.readexactly(chunk + 2)) - 2
        await self.reader.readline()
        return size

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class PassResult:
    kind: str
    phase: str
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "kind": self.kind,
            "phase": self.phase,
            "clients": self.clients,
            "requests": len(self.latencies_ms),
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "tiles_per_s": round(len(self.latencies_ms) / max(self.seconds, 1e-9), 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "max_ms": round(float(lat.max()), 2),
            "mean_bytes": round(self.bytes / max(len(self.latencies_ms), 1)),
        }


async def drive(port: int, cookie: str, paths: list[str], clients: int, cap_s: float, result):
    """Each of ``clients`` connections takes the next path until all are done (or the cap)."""
    cursor = iter(paths)
    deadline = time.perf_counter() + cap_s

    async def one_client() -> None:
        client = KeepAliveClient(port, cookie)
        try:
            for path in cursor:
                if time.perf_counter() > deadline:
                    break
                start = time.perf_counter()
                status, size = await client.get(path)
                result.latencies_ms.append((time.perf_counter() - start) * 1000)
                result.bytes += size
                result.errors += status != 200
        finally:
            await client.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    result.seconds = time.perf_counter() - start
    return result


def run_pass(port, cookie, kind, phase, paths, clients, cap_s) -> dict:
    result = PassResult(kind, phase, clients)
    asyncio.run(drive(port, cookie, paths, clients, cap_s, result))
    summary = result.summary()
    print(
        f"  {kind:8s} {phase:5s} c={clients:<3d} n={summary['requests']:<5d} "
        f"{summary['tiles_per_s']:7.1f}/s p50 {summary['p50_ms']:7.2f} ms "
        f"p99 {summary['p99_ms']:7.2f} ms errors {summary['errors']}",
        flush=True,
    )
    return summary


# -- tile sets ------------------------------------------------------------------------------------


def cold_tiles(width: int, height: int, levels_below_top: int) -> list[tuple[int, int, int]]:
    """(level, col, row) of every tile up to ``top - levels_below_top``, lowest levels first."""
    from analysis.heatmap import DeepZoomGeometry

    geometry = DeepZoomGeometry(width, height, TILE_SIZE, OVERLAP)
    last = geometry.level_count - 1 - levels_below_top
    return all_tiles(geometry, last)


def all_tiles(geometry, last_level: int) -> list[tuple[int, int, int]]:
    return [
        (level, col, row)
        for level in range(last_level + 1)
        for row in range(geometry.level_tiles[level][1])
        for col in range(geometry.level_tiles[level][0])
    ]


def slide_paths(slide: BenchSlide, tiles) -> list[str]:
    return [f"/slides/{slide.slide_id}_files/{lv}/{c}_{r}.jpeg" for lv, c, r in tiles]


def heatmap_paths(slide: BenchSlide, tiles) -> list[str]:
    base = f"/slides/{slide.slide_id}/heatmap/{slide.prediction_id}_files"
    return [f"{base}/{lv}/{c}_{r}.png" for lv, c, r in tiles]


# -- the in-process floor -------------------------------------------------------------------------


def _stats_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {
        "tiles": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "total_s": round(float(ms.sum() / 1000), 3),
    }


def floor_slide(path: Path, tiles) -> dict:
    """get_tile + JPEG encode per tile: one thread (latency), then two threads (throughput)."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    def render(dz, tile) -> bytes:
        level, col, row = tile
        buffer = io.BytesIO()
        dz.get_tile(level, (col, row)).convert("RGB").save(
            buffer, format="JPEG", quality=JPEG_QUALITY
        )
        return buffer.getvalue()

    with openslide.open_slide(str(path)) as osr:
        dz = DeepZoomGenerator(osr, tile_size=TILE_SIZE, overlap=OVERLAP)
        seconds = []
        for tile in tiles:
            start = time.perf_counter()
            render(dz, tile)
            seconds.append(time.perf_counter() - start)
        out = {"one_thread": _stats_ms(seconds)}
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda t: render(dz, t), tiles))
        wall = time.perf_counter() - start
    out["two_threads_tiles_per_s"] = round(len(tiles) / wall, 1)
    out["one_thread_tiles_per_s"] = round(len(tiles) / out["one_thread"]["total_s"], 1)
    return out


def heatmap_tiler(slide: BenchSlide):
    from analysis.heatmap import DeepZoomGeometry, HeatmapTiler, score_raster

    grid = slide.grid
    raster = score_raster(
        np.asarray(grid["grid_rc"], dtype=np.int64).reshape(-1, 2),
        np.asarray(slide.scores, dtype=np.float16).astype(np.float32),
        grid["n_rows"],
        grid["n_cols"],
    )
    geometry = DeepZoomGeometry(slide.width, slide.height, TILE_SIZE, OVERLAP)
    return HeatmapTiler(raster, grid["l0_patch_size"], geometry)


def floor_heatmap(slide: BenchSlide, tiles) -> dict:
    start = time.perf_counter()
    tiler = heatmap_tiler(slide)
    build_s = time.perf_counter() - start
    seconds = []
    for level, col, row in tiles:
        start = time.perf_counter()
        tiler.tile_png(level, (col, row))
        seconds.append(time.perf_counter() - start)
    stats = _stats_ms(seconds)
    stats["tiler_build_s"] = round(build_s, 4)
    stats["tiles_per_s"] = round(len(tiles) / stats["total_s"], 1)
    return stats


# -- report ---------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    lines = [
        "| tiles | pass | clients | requests | tiles/s | p50 ms | p99 ms | max ms | "
        "OpenSlide example server (tiles/s, p99 ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["passes"]:
        anchor = ANCHOR.get(row["clients"]) if row["kind"] == "slide" else None
        ref = f"{anchor['tiles_per_s']}, {anchor['p99_ms']}" if anchor else ""
        lines.append(
            f"| {row['kind']} | {row['phase']} | {row['clients']} | {row['requests']}"
            f"{' (' + str(row['errors']) + ' errors)' if row['errors'] else ''} | "
            f"{row['tiles_per_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
            f"{row['max_ms']:.0f} | {ref} |"
        )
    floor = result["floor"]
    s1 = floor["slide"]["one_thread"]
    h1 = floor["heatmap"]
    lines += [
        "",
        "| in-process floor (one thread unless said) | tiles | p50 ms | p99 ms | tiles/s |",
        "|---|---|---|---|---|",
        f"| slide: get_tile + JPEG q{JPEG_QUALITY} | {s1['tiles']} | {s1['p50_ms']:.2f} | "
        f"{s1['p99_ms']:.2f} | {floor['slide']['one_thread_tiles_per_s']:.0f} "
        f"(2 threads: {floor['slide']['two_threads_tiles_per_s']:.0f}) |",
        f"| heatmap: HeatmapTiler.tile_png | {h1['tiles']} | {h1['p50_ms']:.2f} | "
        f"{h1['p99_ms']:.2f} | {h1['tiles_per_s']:.0f} |",
    ]
    if result.get("before"):
        lines += ["", *compare_table(result["before"], result)]
    overlay = result["overlay_5x"]
    lines += [
        "",
        f"Whole heatmap overlay of the 5x slide ({overlay['width']}x{overlay['height']} px, "
        f"{overlay['patches']} patches, {overlay['tiles']} tiles over {overlay['levels']} levels):"
        f" in process {overlay['in_process_s']:.2f} s (tile_png p50 "
        f"{overlay['in_process']['p50_ms']:.2f} ms, p99 {overlay['in_process']['p99_ms']:.2f} ms);"
        f" through the server at {overlay['server']['clients']} clients "
        f"{overlay['server']['seconds']:.2f} s (p99 {overlay['server']['p99_ms']:.1f} ms).",
    ]
    return "\n".join(lines)


def compare_table(before: dict, after: dict) -> list[str]:
    """tiles/s and p99 of an earlier run (``--compare``) beside this one."""
    earlier = {(r["kind"], r["phase"], r["clients"]): r for r in before["passes"]}
    lines = [
        f"Before -> after ({before.get('label', 'earlier run')}; load {before['load']['before']}"
        f" -> {after['load']['before']}):",
        "",
        "| tiles | pass | clients | tiles/s before -> after | p50 ms before -> after | "
        "p99 ms before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for row in after["passes"]:
        old = earlier.get((row["kind"], row["phase"], row["clients"]))
        if old:
            lines.append(
                f"| {row['kind']} | {row['phase']} | {row['clients']} | "
                f"{old['tiles_per_s']:.0f} -> {row['tiles_per_s']:.0f} | "
                f"{old['p50_ms']:.1f} -> {row['p50_ms']:.1f} | "
                f"{old['p99_ms']:.1f} -> {row['p99_ms']:.1f} |"
            )
    return lines


def update_readme(table: str, command: str, result: dict) -> None:
    load = result["load"]
    body = (
        f"{SECTION}\n\n`{command}` (`benchmarks/tiles.py`; JSON in `benchmarks/out/tiles.json`)."
        f" Slide: synthetic 20x, {result['slide']['width']}x{result['slide']['height']} px,"
        f" {result['slide']['patches']} patches; cold set = every tile of DeepZoom levels"
        f" 0..{result['cold_last_level']} ({result['cold_tiles']} tiles), one fresh web server"
        " process per client count (empty tile caches), session-cookie auth, keep-alive HTTP/1.1"
        " from an asyncio client that shares the machine's cores with the server. Warm = random"
        " tiles of the same set, already encoded and cached. The OpenSlide example server column"
        " is the anchor from `NOTES.md` (it renders every request: compare with the cold rows)."
        f" Load average during the run: {load['before']} before, {load['after']} after"
        f" ({result['machine']['cpus']} cores).\n\n" + table + "\n"
    )
    write_markdown_section(README, SECTION, body)


# -- main -----------------------------------------------------------------------------------------


def measure_server(work: Path, slide20, slide5, tiles, args) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    overlay: dict = {}
    rng = random.Random(0)
    for clients in args.clients:
        print(f"web server, {clients} client(s):", flush=True)
        with web_server(work) as (port, _pid):
            cookie = login(port)
            for kind, to_paths in (("slide", slide_paths), ("heatmap", heatmap_paths)):
                paths = to_paths(slide20, tiles)
                rows.append(run_pass(port, cookie, kind, "cold", paths, clients, args.pass_seconds))
                warm = [rng.choice(paths) for _ in range(args.warm_requests)]
                rows.append(run_pass(port, cookie, kind, "warm", warm, clients, args.pass_seconds))
            if clients == 16 or (not overlay and clients == args.clients[-1]):
                from analysis.heatmap import DeepZoomGeometry

                geometry = DeepZoomGeometry(slide5.width, slide5.height, TILE_SIZE, OVERLAP)
                every = all_tiles(geometry, geometry.level_count - 1)
                paths = heatmap_paths(slide5, every)
                overlay = run_pass(port, cookie, "overlay5x", "cold", paths, clients, 120)
    return rows, overlay


def main() -> None:
    args = parse_args()
    if args.setup_db:
        create_records(args.setup_db)
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lowmag-tiles-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        slide_dir = work / "data" / "slides"
        slide_dir.mkdir(parents=True, exist_ok=True)
        print("writing synthetic slides ...", flush=True)
        slide20 = make_slide(slide_dir, "20x", args.size, 0.5, seed=11)
        slide5 = make_slide(slide_dir, "5x", args.heatmap_size, 2.0, seed=12)
        setup_portal(work, [slide20, slide5])
        tiles = cold_tiles(slide20.width, slide20.height, args.levels_below_top)
        print(f"cold set: {len(tiles)} tiles; in-process floor ...", flush=True)
        floor = {
            "slide": floor_slide(slide20.path, tiles),
            "heatmap": floor_heatmap(slide20, tiles),
        }
        from analysis.heatmap import DeepZoomGeometry

        geometry5 = DeepZoomGeometry(slide5.width, slide5.height, TILE_SIZE, OVERLAP)
        every5 = all_tiles(geometry5, geometry5.level_count - 1)
        in_process5 = floor_heatmap(slide5, every5)
        rows, overlay_server = measure_server(work, slide20, slide5, tiles, args)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "load": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "slide": {"width": slide20.width, "height": slide20.height, "patches": len(slide20.scores)},
        "cold_last_level": tiles[-1][0],
        "cold_tiles": len(tiles),
        "passes": rows,
        "floor": floor,
        "overlay_5x": {
            "width": slide5.width,
            "height": slide5.height,
            "patches": len(slide5.scores),
            "levels": geometry5.level_count,
            "tiles": len(every5),
            "in_process_s": in_process5["total_s"] + in_process5["tiler_build_s"],
            "in_process": in_process5,
            "server": overlay_server,
        },
        "anchor_openslide_example_server": ANCHOR,
    }
    if args.compare:
        result["before"] = json.loads(args.compare.read_text())
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "tiles.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if not args.no_readme:
        command = "python benchmarks/tiles.py " + " ".join(sys.argv[1:])
        update_readme(table, command.strip(), result)


if __name__ == "__main__":
    main()
