"""Transfer: what a hospital sends (20x original vs 5x export), how long it takes, and send-to-result.

1. A synthetic 20x slide (``--size`` px square, 0.5 µm/px) and its 5x export: bytes, and the
   time either takes at 10, 50 and 200 Mbit/s computed from the bytes alone.
2. The same uploads measured: a local portal (``manage.py runserver`` on a free port, SQLite and
   files in a temporary ``LOWMAG_DATA_DIR``, tasks in a thread) receives each file through the tus
   client of ``client.sender``, its PATCH bodies throttled by a token bucket to each bandwidth.
   ``wire_s`` is first to last body byte; ``upload_s`` adds the server's ingest of the last chunk.
3. End to end: the real ``lowmag send --wait --json`` (export, upload, analysis with a tiny
   untrained GLTrans bundle on the fallback encoder, prediction) at 200 Mbit/s, for the 5x export
   and for the original (``--mag native``; the server then reads 5x patches out of the 20x file).

Beside the paper's Figure 6 (200 Mbit/s, TCGA-NSCLC frozen sections): transfer 59.13 s at 20x vs
2.79 s at 5x; inference 32.32 s vs about 5 s (GPU).

    python benchmarks/transfer.py                       # 20000x20000: about 4 minutes
    python benchmarks/transfer.py --size 6000 --original-at 200 --readme
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.files import write_markdown_section  # noqa: E402
from analysis.synth import write_synthetic_slide  # noqa: E402
from client.prepare import PreparedFile, prepare_file  # noqa: E402
from client.sender import Target, TransferOptions, TusUploader  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "out"
README = ROOT / "benchmarks" / "README.md"
SECTION = "## Transfer"
PAPER = {"transfer_20x_s": 59.13, "transfer_5x_s": 2.79, "infer_20x_s": 32.32, "infer_5x_s": 5.0}

SETUP_SCRIPT = """
import json
from analysis.bundle import bundle_sha256, load_manifest
from portal.analyses.models import ModelVersion
from portal.api.models import ApiToken
from portal.cases.models import Cohort, Membership
from django.contrib.auth import get_user_model
from tests.bundles import make_tiny_bundle

bundle = make_tiny_bundle(__import__("pathlib").Path({bundle_dir!r}))
m = load_manifest(bundle)
model = ModelVersion.objects.create(name=m.name, version=m.version, task=m.task,
    classes=m.classes, magnification=m.magnification, bundle_path=str(bundle),
    sha256=bundle_sha256(bundle), is_demo=True, active=True)
# One model-less cohort per measured upload: the server never answers "duplicate", so every
# upload includes the same ingest work.
cohorts = [Cohort.objects.create(name=f"Transfer {{i}}", slug=f"transfer-{{i}}")
           for i in range({n_transfer})]
cohorts.append(Cohort.objects.create(name="End to end", slug="e2e", active_model=model))
lis = get_user_model().objects.create_user("lis", password="unused-password-123")
for cohort in cohorts:
    Membership.objects.create(user=lis, cohort=cohort, role="integration")
_, raw = ApiToken.issue(lis, "transfer benchmark")
print(json.dumps({{"token": raw, "cohorts": {{c.slug: c.pk for c in cohorts}}}}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="20x slide side in pixels")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[10, 50, 200], help="Mbit/s")
    parser.add_argument(
        "--original-at",
        type=float,
        nargs="*",
        default=None,
        help="bandwidths at which to measure the 20x original too (default: all)",
    )
    parser.add_argument("--e2e-bandwidth", type=float, default=200.0, help="Mbit/s for step 3")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the slides here")
    parser.add_argument("--readme", action="store_true", help=f"update {SECTION} in {README}")
    return parser.parse_args()


# -- a local portal --------------------------------------------------------------------------------


@dataclass
class LivePortal:
    url: str
    token: str
    cohorts: dict[str, int]  # slug -> id: "transfer-<i>" (no model), "e2e" (tiny model active)

    def new_case(self, cohort: str, accession: str) -> int:
        response = requests.post(
            f"{self.url}/api/v1/cases/",
            json={
                "cohort": self.cohorts[cohort],
                "patient_id": accession,
                "accession_number": accession,
            },
            headers={"Authorization": f"Token {self.token}"},
            timeout=30,
        )
        response.raise_for_status()
        return int(response.json()["id"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_portal(data_dir: Path, n_transfer: int = 1):
    env = {
        **os.environ,
        "LOWMAG_DATA_DIR": str(data_dir),
        "LOWMAG_TASK_MODE": "thread",
        "LOWMAG_TORCH_THREADS": "2",
        "OMP_WAIT_POLICY": "PASSIVE",
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "LOG_LEVEL": "WARNING",
    }
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], env=env, cwd=ROOT, check=True)
    script = SETUP_SCRIPT.format(bundle_dir=str(data_dir / "bundle"), n_transfer=n_transfer)
    setup = subprocess.run(
        [*manage, "shell", "-c", script],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    made = json.loads(setup.stdout.strip().splitlines()[-1])
    port = _free_port()
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [*manage, "runserver", f"127.0.0.1:{port}", "--noreload"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, server)
        yield LivePortal(url, made["token"], made["cohorts"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the portal did not start; see server.log in the work folder")
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code < 500:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the portal at {url} did not answer within {timeout_s} s")


# -- measurements ----------------------------------------------------------------------------------


def computed_rows(files: dict[str, PreparedFile], bandwidths: list[float]) -> list[dict]:
    return [
        {"file": name, "bytes": f.bytes, "mbps": bw, "computed_s": f.bytes * 8 / (bw * 1e6)}
        for name, f in files.items()
        for bw in bandwidths
    ]


def measure_upload(
    portal: LivePortal, prepared: PreparedFile, mbps: float | None, run: int, work: Path
) -> dict:
    """One tus upload into a new case of its own model-less cohort, throttled to ``mbps``."""
    tag, cohort = f"T-{run}", f"transfer-{run}"
    portal.new_case(cohort, tag)
    first_last: list[float] = []

    def on_progress(offset: int, size: int, sent: int) -> None:
        now = time.perf_counter()
        if sent and not first_last:
            first_last.append(now)
        if sent == size:
            first_last.append(now)

    uploader = TusUploader(
        Target(portal.url, portal.token, tag, cohort),
        TransferOptions(rate_limit_bps=mbps * 1e6 if mbps else None),
        state_dir=work / "uploads" / tag,
        on_progress=on_progress,
    )
    outcome = uploader.upload(prepared)
    # Throttled, the bucket paces the body: first to last byte is the transfer time. Uncapped,
    # the socket buffers swallow the body at once, so only the whole upload means anything.
    if mbps and len(first_last) >= 2:
        wire_s: float | None = first_last[-1] - first_last[0]
    else:
        wire_s = None
    return {
        "bytes_sent": outcome.bytes_sent,
        "wire_s": wire_s,
        "upload_s": outcome.upload_s,
        "achieved_mbps": outcome.bytes_sent * 8 / (wire_s or outcome.upload_s) / 1e6,
        "slide_status": outcome.slide_status,
    }


def end_to_end(
    portal: LivePortal, slide: Path, mag: str, mbps: float, tag: str, work: Path
) -> dict:
    """The real command, in its own process: ``lowmag send --wait --json``."""
    portal.new_case("e2e", tag)
    args = [sys.executable, "-m", "analysis.cli", "send", str(slide), "--server", portal.url]
    args += ["--case", tag, "--cohort", "e2e", "--mag", mag, "--wait", "--json"]
    args += ["--work-dir", str(work / f"send-{tag}"), "--rate-limit", f"{mbps:g}"]
    env = {**os.environ, "LOWMAG_TOKEN": portal.token, "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall_s = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"lowmag send failed: {done.stderr.strip()}")
    report = json.loads(done.stdout)
    job_timings = (report.get("job") or {}).get("timings") or {}
    return {
        "mag": mag,
        "mbps": mbps,
        "bytes_sent": report["bytes_sent"],
        "export_s": report["timings"].get("export_s", 0.0),
        "hash_s": report["timings"].get("hash_s", 0.0),
        "upload_s": report["timings"]["upload_s"],
        "wait_s": report["timings"]["wait_s"],
        "server_analysis_s": job_timings.get("total"),
        "command_total_s": report["timings"]["total_s"],
        "wall_s": wall_s,
        "predicted_class": (report.get("prediction") or {}).get("predicted_class"),
    }


# -- report ----------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    files = result["files"]
    lines = [
        f"Synthetic 20x slide {result['size']}x{result['size']} px "
        f"({result['size'] ** 2 / 1e9:.2f} gigapixels; the paper's 20x WSIs average 0.503): "
        f"original {files['20x']['bytes'] / 1e6:.1f} MB, 5x export "
        f"{files['5x']['bytes'] / 1e6:.2f} MB ({files['20x']['bytes'] / files['5x']['bytes']:.1f}x "
        f"smaller), export took {files['5x']['export_s']:.1f} s.",
        "",
        "| file | MB | Mbit/s | computed s | measured s | upload + ingest s | achieved Mbit/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    measured = {(m["file"], m["mbps"]): m for m in result["measured"]}
    for row in result["computed"]:
        m = measured.get((row["file"], row["mbps"]))
        cells = (
            [f"{m['wire_s']:.2f}", f"{m['upload_s']:.2f}", f"{m['achieved_mbps']:.1f}"]
            if m
            else ["-", "-", "-"]
        )
        lines.append(
            f"| {row['file']} | {row['bytes'] / 1e6:.2f} | {row['mbps']:g} | "
            f"{row['computed_s']:.2f} | " + " | ".join(cells) + " |"
        )
    for m in result["measured"]:
        if m["mbps"] is None:
            lines.append(
                f"| {m['file']} | {m['bytes_sent'] / 1e6:.2f} | loopback, no cap | - | - | "
                f"{m['upload_s']:.2f} | {m['achieved_mbps']:.1f} (incl. ingest) |"
            )
    paper = result["paper"]
    lines.append(
        f"| paper 20x / 5x | - | 200 | - | {paper['transfer_20x_s']} / {paper['transfer_5x_s']} | - | - |"
    )
    if result.get("e2e"):
        lines += [
            "",
            "End to end, `lowmag send --wait` (one process; export, upload, server analysis with a "
            "tiny untrained bundle on 2 shared CPU cores, prediction):",
            "",
            "| sent | Mbit/s | MB sent | export s | upload s | wait for result s | server analysis s | total s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in result["e2e"]:
            analysis = f"{e['server_analysis_s']:.1f}" if e["server_analysis_s"] else "-"
            export = f"{e['export_s']:.1f}" if e["mag"] != "native" else "-"
            sent = "5x export" if e["mag"] != "native" else "20x original"
            lines.append(
                f"| {sent} | {e['mbps']:g} | {e['bytes_sent'] / 1e6:.2f} | {export} | "
                f"{e['upload_s']:.1f} | {e['wait_s']:.1f} | {analysis} | {e['command_total_s']:.1f} |"
            )
        lines.append(
            f"| paper 20x / 5x | 200 | - | - | {paper['transfer_20x_s']} / {paper['transfer_5x_s']} | "
            f"{paper['infer_20x_s']} / ~{paper['infer_5x_s']:g} (GPU) | - | - |"
        )
    return "\n".join(lines)


def update_readme(table: str, command: str) -> None:
    body = (
        f"{SECTION}\n\n`{command}` (`benchmarks/transfer.py`; JSON in `benchmarks/out/transfer.json`).\n\n"
        "- *computed s*: bytes x 8 / bandwidth.\n"
        "- *measured s*: first to last PATCH body byte through the real tus client "
        "(`client.sender`, 4 MiB chunks with SHA-256 checksums) to a local portal "
        "(`manage.py runserver`, SQLite) on loopback, the bodies throttled by a token bucket.\n"
        "- *upload + ingest s*: creation request to the answer to the last chunk, which includes "
        "the server hashing the file and ingesting the slide (scale, tissue mask, thumbnail). "
        "Each upload goes to its own cohort, so none is answered as a duplicate.\n"
        "- End to end: both rows run the same 5x model on the server (from the 20x original it "
        "reads 5x patches out of the 20x file), so *server analysis* differs only by reading; "
        "the paper's 32.32 s vs ~5 s compares a 20x model with a 5x model on a GPU. Single runs on "
        "2 CPU cores shared with other work: analysis times vary by up to 2x from run to run.\n\n"
        + table
        + "\n"
    )
    write_markdown_section(README, SECTION, body)


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    original_at = args.bandwidths if args.original_at is None else args.original_at
    with tempfile.TemporaryDirectory(prefix="lowmag-transfer-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        slide = work / f"synthetic-{args.size}-20x.svs"
        if not slide.exists():
            t0 = time.perf_counter()
            write_synthetic_slide(slide, width=args.size, height=args.size, seed=args.seed, label=1)
            print(f"wrote {slide} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        send_dir = Path(tempfile.mkdtemp(prefix="send-", dir=work))  # a fresh export, timed
        files = {
            "5x": prepare_file(slide, 5.0, send_dir),
            "20x": prepare_file(slide, None, send_dir),
        }
        result = {
            "benchmark": "transfer",
            "size": args.size,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "files": {
                name: {
                    "bytes": f.bytes,
                    "sha256": f.sha256,
                    "export_s": f.timings.get("export_s", 0.0),
                }
                for name, f in files.items()
            },
            "computed": computed_rows(files, args.bandwidths),
            "measured": [],
            "e2e": [],
            "paper": PAPER,
        }
        runs = [("5x", bw) for bw in args.bandwidths] + [("20x", bw) for bw in original_at]
        runs += [("5x", None), ("20x", None)]
        portal_dir = Path(tempfile.mkdtemp(prefix="portal-", dir=work))
        with live_portal(portal_dir, n_transfer=len(runs)) as portal:
            for i, (name, mbps) in enumerate(runs):
                print(f"upload {name} at {mbps or 'unlimited'} Mbit/s ...", file=sys.stderr)
                row = measure_upload(portal, files[name], mbps, i, work)
                result["measured"].append({"file": name, "mbps": mbps, **row})
            if not args.skip_e2e:
                warm_up = work / "warm-up-20x.svs"
                write_synthetic_slide(warm_up, width=1500, height=1500, seed=99)
                print("warm-up: the server loads the model once ...", file=sys.stderr)
                end_to_end(portal, warm_up, "5", 1000.0, "W-0", work)
                for i, mag in enumerate(("5", "native")):
                    print(f"lowmag send --mag {mag} --wait ...", file=sys.stderr)
                    result["e2e"].append(
                        end_to_end(portal, slide, mag, args.e2e_bandwidth, f"E-{i}", work)
                    )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "transfer.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    print(table)
    if args.readme:
        update_readme(table, "python " + " ".join(["benchmarks/transfer.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
