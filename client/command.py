"""``lowmag send``: export a slide at 5x, upload it to a LowMag server, optionally wait for the call.

The token is read from ``LOWMAG_TOKEN`` (preferred: a ``--token`` value shows in process lists).
An interrupted or killed send resumes where the server stopped when the same command runs again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from analysis.errors import AnalysisError
from client.errors import SendError, SlideRefusedError
from client.prepare import PreparedFile, prepare_file
from client.sender import (
    DEFAULT_CHUNK_BYTES,
    SendReport,
    Target,
    TransferOptions,
    TusUploader,
    default_work_dir,
    follow_analysis,
    viewer_url,
)

UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "send",
        help="export a slide at low magnification and upload it to a LowMag server",
        description="Export SLIDE at --mag (5x by default), upload it into a case with tus "
        "(resumable), and with --wait print the AI call once the server has analysed it. "
        "The token comes from LOWMAG_TOKEN (or --token).",
    )
    parser.add_argument(
        "slide", type=Path, help="the slide file (or DICOM folder with --mag native)"
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("LOWMAG_SERVER"),
        help="portal address, e.g. https://lowmag.example.org (default: $LOWMAG_SERVER)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="integration token (default: $LOWMAG_TOKEN, which keeps it out of process lists)",
    )
    parser.add_argument(
        "--case", required=True, help="case id, or its accession number together with --cohort"
    )
    parser.add_argument(
        "--cohort", default=None, help="cohort slug or id (with an accession number)"
    )
    parser.add_argument(
        "--mag",
        type=_magnification,
        default=5.0,
        help="magnification to export at (default 5), or 'native' to send the original file",
    )
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality of the export")
    parser.add_argument(
        "--mpp", type=float, default=None, help="source µm/px when the file lacks it"
    )
    parser.add_argument("--wait", action="store_true", help="wait for the analysis and print it")
    parser.add_argument(
        "--wait-timeout", type=float, default=900.0, help="seconds to wait for the result"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (for an LIS)")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show the progress bar even when stderr is not a terminal (or with --json)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"exports and resume records (default {default_work_dir()})",
    )
    parser.add_argument(
        "--keep-export",
        action="store_true",
        help="keep the export in the work folder after the upload (default: removed once sent)",
    )
    parser.add_argument(
        "--chunk-size",
        type=_byte_size,
        default=DEFAULT_CHUNK_BYTES,
        help="bytes per PATCH, e.g. 4M (default) or 512K",
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        metavar="MBPS",
        help="cap the upload at this many megabits per second",
    )
    parser.add_argument(
        "--retries", type=int, default=6, help="consecutive failures tolerated (default 6)"
    )
    parser.add_argument(
        "--retry-wait", type=float, default=1.0, help="first wait between retries, doubling (s)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="read timeout per request (s)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        report = _send(args)
    except AnalysisError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "kind": exc.__class__.__name__}))
        raise
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        _print_report(report, sys.stdout)
    return 0


def _send(args: argparse.Namespace) -> SendReport:
    t_start = time.perf_counter()
    target = _target(args)
    options = _options(args)
    work_dir = args.work_dir or default_work_dir()
    show_progress = args.progress or (sys.stderr.isatty() and not args.json)
    say = _say if not args.json else (lambda line: None)

    prepared = prepare_file(args.slide, args.mag, work_dir, quality=args.quality, mpp=args.mpp)
    say(_prepared_line(prepared))
    bar = _ProgressBar(sys.stderr) if show_progress else None
    uploader = TusUploader(
        target,
        options,
        state_dir=Path(work_dir) / "uploads",
        on_progress=bar.update if bar else None,
        on_event=bar.event if bar else say,
    )
    try:
        upload = uploader.upload(prepared)
    finally:
        if bar:
            bar.close()
    if not args.keep_export:
        prepared.discard()  # the server has it; an export is re-made identically if needed
    if upload.server_sha256 and upload.server_sha256 != prepared.sha256:
        raise SendError(
            f"the server stored {prepared.upload_name} with SHA-256 {upload.server_sha256}, "
            f"not {prepared.sha256}; send it again"
        )
    report = SendReport(prepared, upload, viewer_url(target, upload.case_id))
    if upload.slide_status == "failed":
        reason = upload.reason or f"slide {upload.slide_id} was refused without a reason"
        raise SlideRefusedError(f"the server refused the slide: {reason}")
    report.timings = {**prepared.timings, "upload_s": upload.upload_s}
    if args.wait:
        t0 = time.perf_counter()
        report.job, report.prediction = follow_analysis(
            target,
            upload.slide_id,
            options=options,
            timeout_s=args.wait_timeout,
            on_job=_job_printer(sys.stderr) if show_progress else None,
            on_event=say,
        )
        report.timings["wait_s"] = time.perf_counter() - t0
    report.timings["total_s"] = time.perf_counter() - t_start
    return report


def _target(args: argparse.Namespace) -> Target:
    token = args.token or os.environ.get("LOWMAG_TOKEN", "")
    if not token.strip():
        raise SendError("no token: set LOWMAG_TOKEN (preferred) or pass --token")
    if not args.server:
        raise SendError("no server: pass --server URL or set LOWMAG_SERVER")
    return Target(server=args.server, token=token.strip(), case=args.case, cohort=args.cohort)


def _options(args: argparse.Namespace) -> TransferOptions:
    try:
        return TransferOptions(
            chunk_bytes=args.chunk_size,
            retries=args.retries,
            retry_wait_s=args.retry_wait,
            timeout_s=args.timeout,
            rate_limit_bps=args.rate_limit * 1e6 if args.rate_limit else None,
        )
    except ValueError as exc:
        raise SendError(f"invalid transfer option: {exc}") from exc


def _magnification(text: str) -> float | None:
    if text.strip().lower() in ("native", "original"):
        return None
    try:
        value = float(text.lower().rstrip("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: give a magnification (5) or 'native'") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError("the magnification must be positive")
    return value


def _byte_size(text: str) -> int:
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = raw[-1] if raw and raw[-1] in UNITS else ""
    try:
        return int(float(raw[: len(raw) - len(unit)]) * UNITS[unit])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size such as 4M or 512K") from exc


# -- output ---------------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _prepared_line(prepared: PreparedFile) -> str:
    source = prepared.source_path.name
    took = sum(prepared.timings.values())
    if prepared.export is None:
        return f"sending the original {source}: {_mb(prepared.bytes)}"
    export = prepared.export
    how = "reused the earlier export" if prepared.reused else f"exported in {took:.1f} s"
    return (
        f"{source} at {prepared.magnification:g}x: {export['width']}x{export['height']} px, "
        f"{_mb(prepared.bytes)} ({prepared.source_bytes / max(prepared.bytes, 1):.1f}x smaller "
        f"than the {_mb(prepared.source_bytes)} original), {how}"
    )


def _print_report(report: SendReport, out: TextIO) -> None:
    upload = report.upload
    rate = upload.bytes_sent * 8 / max(upload.upload_s, 1e-9) / 1e6
    resumed = f", resumed at byte {upload.resumed_from:,}" if upload.resumed_from else ""
    duplicate = " (already on the server: same file)" if upload.duplicate else ""
    print(
        f"sent {_mb(upload.bytes_sent)} in {upload.upload_s:.1f} s ({rate:.1f} Mbit/s{resumed}): "
        f"slide {upload.slide_id} is {upload.slide_status}{duplicate}",
        file=out,
    )
    if report.prediction is not None:
        prediction = report.prediction
        probabilities = ", ".join(
            f"{name} {p:.3f}" for name, p in prediction.get("probabilities", {}).items()
        )
        print(
            f"AI call: {prediction.get('predicted_class')} "
            f"(confidence {prediction.get('confidence', 0):.3f}; {probabilities}) "
            f"by {prediction.get('model', 'the cohort model')}",
            file=out,
        )
    elif report.viewer_url:
        print("analysis queued on the server (use --wait to wait for the result)", file=out)
    if report.viewer_url:
        print(f"viewer: {report.viewer_url}", file=out)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


class _ProgressBar:
    """One self-rewriting stderr line: percent, bytes, rate and time left."""

    WIDTH = 24

    def __init__(self, stream: TextIO, min_interval_s: float = 0.1) -> None:
        self.stream = stream
        self.min_interval_s = min_interval_s
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.first_sent: int | None = None
        self.drawn = False

    def update(self, offset: int, size: int, sent: int) -> None:
        now = time.monotonic()
        if self.first_sent is None:
            self.first_sent, self.start = sent, now
        if offset < size and now - self.last_draw < self.min_interval_s:
            return
        self.last_draw = now
        elapsed = max(now - self.start, 1e-6)
        rate_bytes_s = (sent - self.first_sent) / elapsed
        done = offset / size if size else 1.0
        filled = int(done * self.WIDTH)
        left = (size - offset) / rate_bytes_s if rate_bytes_s > 0 else float("inf")
        eta = f"{left:.0f} s left" if left != float("inf") else "--"
        line = (
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done:4.0%} "
            f"{_mb(offset)}/{_mb(size)} {rate_bytes_s * 8 / 1e6:.1f} Mbit/s {eta}   "
        )
        self.stream.write(line)
        self.stream.flush()
        self.drawn = True

    def event(self, line: str) -> None:
        self.close()
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _job_printer(stream: TextIO):
    last: list[str] = [""]

    def show(job: dict) -> None:
        line = f"analysis: {job.get('state')} {job.get('stage') or ''} {job.get('progress', 0):.0%}"
        if line != last[0]:
            stream.write(f"\r{line:<60}")
            if job.get("state") in ("succeeded", "failed", "cancelled"):
                stream.write("\n")
            stream.flush()
            last[0] = line

    return show
