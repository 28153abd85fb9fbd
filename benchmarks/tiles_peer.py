"""LowMag's tiles beside OpenSlide's example DeepZoom server, same slide, one run.

Writes a synthetic 20x slide (16000 x 16000 px by default), pre-renders its DeepZoom tiles as
the portal does after ingest, starts LowMag (``python -m portal.web``, as deployed) and OpenSlide's
``examples/deepzoom/deepzoom_server.py`` (Flask; give the script with ``--peer``; Flask must
be importable, e.g. ``PYTHONPATH=/path/to/flask``) on loopback ports, then drives both with
``tile_load.py`` (wrk) at each concurrency, the servers taking turns cell by cell. Writes
``benchmarks/out/tiles_peer.json`` and prints a markdown table.

    python benchmarks/tiles_peer.py --peer /tmp/deepzoom_server.py \\
        --tile-load /work/shared/tools/tile_load.py --conc 16,64 --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.tiles import (  # noqa: E402
    _free_port,
    login,
    make_slide,
    portal_env,
    setup_portal,
    web_server,
)

OUT = ROOT / "benchmarks" / "out" / "tiles_peer.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, required=True, help="deepzoom_server.py")
    parser.add_argument("--tile-load", type=Path, required=True, help="tile_load.py")
    parser.add_argument("--size", type=int, default=16000, help="slide side in pixels")
    parser.add_argument("--conc", default="16,64")
    parser.add_argument("--duration", type=int, default=5, help="seconds per cell")
    parser.add_argument("--levels", default="14,13", help="DeepZoom levels to cycle through")
    parser.add_argument("--work-dir", type=Path, default=None)
    return parser.parse_args()


@contextmanager
def peer_server(script: Path, slide: Path, work: Path):
    port = _free_port()
    log = open(work / "peer.log", "ab")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, str(script), "-l", "127.0.0.1", "-p", str(port), str(slide)],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError("the peer server did not start; see peer.log")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/slide.dzi", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield port, server.pid
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=15)
        log.close()


def load(args, label: str, base: str, dzi: str, pattern: str, pid: int, cookie: str = "") -> dict:
    out = Path(tempfile.mktemp(suffix=".json"))
    command = [
        sys.executable, str(args.tile_load), "--base", base, "--dzi", dzi, "--pattern", pattern,
        "--conc", args.conc, "--duration", str(args.duration), "--repeats", "1",
        "--warmup", "1", "--label", label, "--server-pid", str(pid), "--out", str(out),
    ]  # fmt: skip
    for level in args.levels.split(","):
        command += ["--level", level]
    if cookie:
        command += ["--cookie", cookie]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def cells(result) -> list[dict]:
    found = result if isinstance(result, list) else result.get("cells", result.get("results", []))
    return found if isinstance(found, list) else [found]


def main() -> None:
    args = parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lowmag-peer-"))
    slide_dir = work / "data" / "slides"
    slide_dir.mkdir(parents=True, exist_ok=True)
    try:
        slide = make_slide(slide_dir, "20x", args.size, 0.5, seed=11)
        setup_portal(work, [slide])
        env = portal_env(work)
        subprocess.run(
            [sys.executable, "-c", "import django; django.setup(); "
             "from portal.viewer.tileservice import pretile; import sys; "
             f"print(pretile(__import__('pathlib').Path({str(slide.path)!r}), 20000))"],
            env=env, cwd=ROOT, check=True,
        )  # fmt: skip
        load_before = os.getloadavg()
        with web_server(work) as (port, pid), peer_server(args.peer, slide.path, work) as peer:
            cookie = login(port)
            lowmag = load(
                args, "lowmag", f"http://127.0.0.1:{port}", f"/slides/{slide.slide_id}.dzi",
                f"/slides/{slide.slide_id}_files/{{level}}/{{col}}_{{row}}.jpeg", pid, cookie,
            )  # fmt: skip
            openslide_example = load(
                args, "deepzoom_server", f"http://127.0.0.1:{peer[0]}", "/slide.dzi",
                "/slide_files/{level}/{col}_{row}.jpeg", peer[1],
            )  # fmt: skip
        result = {
            "slide": {"width": slide.width, "height": slide.height},
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "lowmag": lowmag,
            "deepzoom_server": openslide_example,
        }
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1)[:4000])


if __name__ == "__main__":
    main()
