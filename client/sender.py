"""Sending a prepared slide file to a LowMag portal and following its analysis.

- ``TusUploader``: a tus 1.0 client (wire format: ``client.tus``). Chunked PATCHes carry
  ``Upload-Checksum: sha256``; connection errors and server errors are retried with exponential
  backoff after asking the server (HEAD) where it stands. The upload's URL lives in a small JSON
  file keyed by the file's SHA-256, so a run that was killed resumes at the server's offset; an
  upload the server forgot (404/410) starts over.
- ``follow_analysis``: poll the REST API until the slide's analysis job ends; return its prediction.

The file itself comes from ``client.prepare``; every failure raises a ``client.errors.SendError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

from client import tus
from client.errors import (
    AnalysisFailedError,
    CaseNotFoundError,
    SendError,
    ServerUnreachableError,
    TokenRefusedError,
)
from client.prepare import PreparedFile, _read_json, _write_json

UPLOADS_PATH = "api/v1/uploads/"  # relative: a server may live under a path prefix
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
MIN_CHUNK_BYTES = 1024
CONNECT_TIMEOUT_S = 10.0
STATE_VERSION = 1

ProgressCallback = Callable[[int, int, int], None]  # (server offset incl. in-flight, size, sent)
EventCallback = Callable[[str], None]  # one human-readable line (resumed, retrying, ...)


# -- configuration -----------------------------------------------------------------------------


@dataclass
class Target:
    """Where a slide goes: the server, the credentials and the case."""

    server: str  # base URL, e.g. https://lowmag.example.org
    token: str  # raw integration token, sent as "Authorization: Token <token>"
    case: str  # case id, or accession number when ``cohort`` is given
    cohort: str | None = None  # cohort slug or id

    def __post_init__(self) -> None:
        self.server = self.server.strip().rstrip("/")
        if not re.match(r"^https?://[^/]+", self.server):
            raise SendError(
                f"server address {self.server!r} is not an http(s) URL; "
                "pass e.g. --server https://lowmag.example.org"
            )

    def key(self) -> str:
        """Short stable id of (server, case, cohort): one resume record per destination."""
        text = f"{self.server}|{self.case}|{self.cohort or ''}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

    def describe_case(self) -> str:
        return f"case {self.case!r}" + (f" of cohort {self.cohort!r}" if self.cohort else "")


@dataclass
class TransferOptions:
    """How bytes travel: chunking, retries, timeouts and an optional bandwidth cap."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # one PATCH; a lost connection costs at most this
    retries: int = 6  # consecutive failures tolerated before giving up
    retry_wait_s: float = 1.0  # first backoff; doubles on every consecutive failure
    max_retry_wait_s: float = 30.0
    timeout_s: float = 300.0  # read timeout; the last PATCH waits for the server's ingest
    rate_limit_bps: float | None = None  # bits per second on PATCH bodies (None: unlimited)

    def __post_init__(self) -> None:
        if self.chunk_bytes < MIN_CHUNK_BYTES:
            raise ValueError(f"chunk size must be at least {MIN_CHUNK_BYTES} bytes")
        if self.retries < 0 or self.retry_wait_s < 0:
            raise ValueError("retries and retry wait must not be negative")
        if self.rate_limit_bps is not None and self.rate_limit_bps <= 0:
            raise ValueError("the rate limit must be positive")

    def backoff_s(self, failures: int) -> float:
        return min(self.max_retry_wait_s, self.retry_wait_s * 2 ** max(0, failures - 1))


def default_work_dir() -> Path:
    """``$XDG_CACHE_HOME/lowmag/send`` (``~/.cache/lowmag/send``): exports and resume records."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowmag" / "send"


# -- HTTP ---------------------------------------------------------------------------------------


class _Api:
    """One session with the server: token auth, timeouts, retries with backoff, clear errors."""

    def __init__(self, target: Target, options: TransferOptions, on_event: EventCallback) -> None:
        self.target = target
        self.options = options
        self.on_event = on_event
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {target.token}"
        self.session.headers["User-Agent"] = "lowmag-send"

    def url(self, path_or_url: str) -> str:
        return urljoin(self.target.server + "/", path_or_url)

    def once(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request; connection problems raise ``requests.RequestException``."""
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, self.options.timeout_s))
        response = self.session.request(method, url, allow_redirects=False, **kwargs)
        if 300 <= response.status_code < 400:
            where = response.headers.get("Location", "elsewhere")
            raise SendError(
                f"{self.target.server} redirects to {where}; use that address as --server"
            )
        if response.status_code in (401, 403):
            raise _token_refused(self.target.server, response)
        return response

    def request(self, method: str, url: str, what: str, **kwargs: Any) -> requests.Response:
        """``once`` with retries on connection errors and 5xx/423/429 answers."""
        failures = 0
        while True:
            try:
                response = self.once(method, url, **kwargs)
                if not _retryable(response.status_code):
                    return response
                problem = f"answered {response.status_code} ({_detail(response)})"
            except requests.RequestException as exc:
                problem = _connection_problem(exc)
            failures += 1
            self.wait_or_give_up(failures, what, problem)

    def wait_or_give_up(self, failures: int, what: str, problem: str) -> None:
        if failures > self.options.retries:
            attempts = f"{failures} attempt{'s' if failures > 1 else ''}"
            if problem.startswith("answered"):
                raise SendError(
                    f"{self.target.server} {problem} to {what} after {attempts}; "
                    "try again later or ask the server's administrator"
                )
            raise ServerUnreachableError(
                f"cannot reach {self.target.server} to {what}: {problem} after {attempts}; "
                "check the address, the network and that the server is running"
            )
        wait = self.options.backoff_s(failures)
        self.on_event(f"{what}: {problem}; retrying in {wait:.1f} s")
        time.sleep(wait)

    def get_json(self, path_or_url: str, what: str, **params: Any) -> Any:
        response = self.request("GET", self.url(path_or_url), what, params=params or None)
        if response.status_code != 200:
            raise SendError(
                f"{self.target.server} answered {response.status_code} to {what}: "
                f"{_detail(response)}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise SendError(
                f"{self.target.server} answered {what} with something other than JSON; "
                "check that --server is a LowMag portal"
            ) from exc


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 423, 429)


def _detail(response: requests.Response) -> str:
    if "html" in response.headers.get("Content-Type", ""):
        return response.reason or "an HTML page"  # an error page: its markup helps nobody
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())
        return text[:200] or response.reason or "no details"
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return json.dumps(body)[:200]


def _token_refused(server: str, response: requests.Response) -> TokenRefusedError:
    if response.status_code == 401:
        return TokenRefusedError(
            f"{server} refused the token (401: {_detail(response)}); check LOWMAG_TOKEN "
            "(or --token) holds a valid integration token for this server"
        )
    return TokenRefusedError(
        f"{server} does not allow this token to do that (403: {_detail(response)}); "
        "ask an admin for the integration role in the case's cohort"
    )


def _connection_problem(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "no answer (timed out)"
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    if match:
        return match.group(1).strip().lower()
    if isinstance(exc, requests.ConnectionError):
        return "the connection failed or was dropped"
    return exc.__class__.__name__


# -- tus upload --------------------------------------------------------------------------------


class TokenBucket:
    """Caps a byte stream at ``rate_bps`` bits per second (bursts up to ``burst_bytes``)."""

    def __init__(self, rate_bps: float, burst_bytes: int = 16 * 1024) -> None:
        self.rate_bytes_s = rate_bps / 8.0
        self.burst_bytes = float(burst_bytes)
        self.tokens = self.burst_bytes
        self.last = time.monotonic()

    def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst_bytes, self.tokens + (now - self.last) * self.rate_bytes_s)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            time.sleep(-self.tokens / self.rate_bytes_s)


class _ChunkBody:
    """A PATCH body the HTTP library reads block by block: counted, throttled, reported."""

    def __init__(
        self, data: bytes, on_read: Callable[[int], None], bucket: TokenBucket | None
    ) -> None:
        self.view = memoryview(data)
        self.position = 0
        self.on_read = on_read
        self.bucket = bucket

    def __len__(self) -> int:
        return len(self.view)

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size is None or size < 0 else self.position + size
        block = self.view[self.position : end].tobytes()
        if block and self.bucket is not None:
            self.bucket.take(len(block))
        self.position += len(block)
        if block:
            self.on_read(len(block))
        return block

    def __iter__(self) -> Iterator[bytes]:
        while block := self.read(64 * 1024):
            yield block


@dataclass
class UploadOutcome:
    """What the server said once the last byte was in, and what it took to get there."""

    upload_url: str
    status_url: str
    slide_id: int
    slide_status: str  # ready | failed (ingest refused it)
    reason: str  # the server's reason when failed
    duplicate: bool  # the file already was a ready slide of the cohort: that slide is answered
    case_id: int | None
    server_sha256: str | None
    bytes_sent: int  # PATCH body bytes handed to the network in this run, retries included
    resumed_from: int  # the server's offset when this run started sending (0: a new upload)
    retries: int
    chunks: int
    upload_s: float


class TusUploader:
    """Uploads one prepared file to a case with tus 1.0, resuming an earlier attempt if any."""

    def __init__(
        self,
        target: Target,
        options: TransferOptions | None = None,
        *,
        state_dir: str | Path,
        on_progress: ProgressCallback | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        self.target = target
        self.options = options or TransferOptions()
        self.state_dir = Path(state_dir)
        self.on_progress = on_progress or (lambda offset, size, sent: None)
        self.on_event = on_event or (lambda line: None)
        self.api = _Api(target, self.options, self.on_event)
        self.bucket = (
            TokenBucket(self.options.rate_limit_bps) if self.options.rate_limit_bps else None
        )
        self.bytes_sent = 0
        self.retries = 0
        self.chunks = 0

    def state_path(self, prepared: PreparedFile) -> Path:
        return self.state_dir / f"{prepared.sha256}-{self.target.key()}.json"

    def upload(self, prepared: PreparedFile) -> UploadOutcome:
        t0 = time.perf_counter()
        state_path = self.state_path(prepared)
        url, offset = self._resume_or_create(prepared, state_path)
        resumed_from = offset
        last = self._send_from(prepared, state_path, url, offset)
        outcome = self._outcome(url, last, resumed_from, time.perf_counter() - t0)
        state_path.unlink(missing_ok=True)  # complete: nothing left to resume
        return outcome

    # -- starting ------------------------------------------------------------------------------

    def _resume_or_create(self, prepared: PreparedFile, state_path: Path) -> tuple[str, int]:
        state = _read_json(state_path)
        if state is not None and self._state_matches(state, prepared):
            offset = self._server_offset(state["upload_url"], prepared.bytes)
            if offset is not None:
                if offset > 0:
                    self.on_event(
                        f"resuming the upload at byte {offset:,} of {prepared.bytes:,} "
                        f"(the server kept {offset / prepared.bytes:.0%})"
                    )
                return state["upload_url"], offset
            self.on_event("the server no longer knows the earlier upload; starting over")
        return self._create(prepared, state_path), 0

    def _state_matches(self, state: dict, prepared: PreparedFile) -> bool:
        return (
            state.get("version") == STATE_VERSION
            and state.get("sha256") == prepared.sha256
            and state.get("size") == prepared.bytes
            and state.get("server") == self.target.server
            and state.get("case") == self.target.case
            and state.get("cohort") == self.target.cohort
            and isinstance(state.get("upload_url"), str)
        )

    def _server_offset(self, url: str, size: int) -> int | None:
        """The server's offset for ``url``; None when it forgot the upload (or it changed)."""
        response = self.api.request(
            "HEAD", url, "ask the server for the upload's offset", headers=_tus()
        )
        if response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            raise SendError(
                f"{self.target.server} answered {response.status_code} to HEAD {url}; "
                "try again later"
            )
        try:
            offset = int(response.headers[tus.UPLOAD_OFFSET])
            length = int(response.headers.get(tus.UPLOAD_LENGTH, size))
        except (KeyError, ValueError) as exc:
            raise SendError(f"{url}: the answer to HEAD has no valid Upload-Offset") from exc
        return offset if length == size and 0 <= offset <= size else None

    def _create(self, prepared: PreparedFile, state_path: Path) -> str:
        metadata = {"filename": prepared.upload_name, "case": self.target.case}
        if self.target.cohort:
            metadata["cohort"] = self.target.cohort
        response = self.api.request(
            "POST",
            self.api.url(UPLOADS_PATH),
            "create the upload",
            headers=_tus(
                {
                    tus.UPLOAD_LENGTH: str(prepared.bytes),
                    tus.UPLOAD_METADATA: tus.encode_metadata(metadata),
                }
            ),
        )
        if response.status_code != 201:
            raise self._creation_refused(response, prepared)
        url = self.api.url(response.headers.get("Location", ""))
        if url.rstrip("/") == self.api.url(UPLOADS_PATH).rstrip("/"):
            raise SendError(f"{self.target.server} created the upload but sent no Location")
        self._save_state(state_path, prepared, url, 0)
        return url

    def _creation_refused(self, response: requests.Response, prepared: PreparedFile) -> SendError:
        status, detail = response.status_code, _detail(response)
        if status == 404 and _is_json(response):
            return CaseNotFoundError(
                f"{self.target.server} has no {self.target.describe_case()} that this token may "
                f"upload to ({detail}); check the accession number and --cohort"
            )
        if status in (404, 405):
            return SendError(
                f"{self.target.server} has no LowMag upload endpoint at /{UPLOADS_PATH} "
                f"({status}); check --server"
            )
        if status == 413:
            return SendError(
                f"{prepared.path.name}: the server refuses a file this large ({detail})"
            )
        return SendError(f"{self.target.server} refused to create the upload ({status}: {detail})")

    def _save_state(self, state_path: Path, prepared: PreparedFile, url: str, offset: int) -> None:
        _write_json(
            state_path,
            {
                "version": STATE_VERSION,
                "upload_url": url,
                "server": self.target.server,
                "case": self.target.case,
                "cohort": self.target.cohort,
                "sha256": prepared.sha256,
                "size": prepared.bytes,
                "file": str(prepared.path),
                "offset": offset,
                "updated_at": time.time(),
            },
        )

    # -- sending -------------------------------------------------------------------------------

    def _send_from(
        self, prepared: PreparedFile, state_path: Path, url: str, offset: int
    ) -> requests.Response:
        """PATCH chunk after chunk from ``offset``; returns the answer to the last byte."""
        failures = 0
        self.on_progress(offset, prepared.bytes, self.bytes_sent)
        with open(prepared.path, "rb") as fh:
            while True:
                # At the end (this run or an earlier one sent everything) an empty PATCH
                # answers with the slide the upload became.
                fh.seek(offset)
                chunk = fh.read(self.options.chunk_bytes) if offset < prepared.bytes else b""
                try:
                    response = self._patch(url, offset, chunk, prepared.bytes)
                    problem = self._problem(response)
                except requests.RequestException as exc:
                    problem = _connection_problem(exc)
                if problem is None:
                    failures = 0
                    offset = int(response.headers[tus.UPLOAD_OFFSET])
                    self._save_state(state_path, prepared, url, offset)
                    if offset == prepared.bytes and response.headers.get(tus.SLIDE_ID):
                        return response
                    if not chunk:
                        raise SendError(
                            f"{self.target.server} received the whole file but named no slide "
                            f"for it; see {url}/status"
                        )
                    continue
                failures += 1
                self.retries += 1
                self.api.wait_or_give_up(failures, "send the slide", problem)
                url, offset = self._resync(url, prepared, state_path)

    def _patch(self, url: str, offset: int, chunk: bytes, size: int) -> requests.Response:
        start = offset

        def on_read(n: int) -> None:
            nonlocal offset
            offset += n
            self.bytes_sent += n
            self.on_progress(offset, size, self.bytes_sent)

        headers = _tus(
            {
                tus.UPLOAD_OFFSET: str(start),
                "Content-Type": tus.OFFSET_CONTENT_TYPE,
                "Content-Length": str(len(chunk)),
                tus.UPLOAD_CHECKSUM: tus.checksum_header(chunk),
            }
        )
        self.chunks += 1
        # An empty body goes as b"": requests would send an empty stream chunked.
        body = _ChunkBody(chunk, on_read, self.bucket) if chunk else b""
        return self.api.once("PATCH", url, data=body, headers=headers)

    def _problem(self, response: requests.Response) -> str | None:
        """None when the chunk was stored; a retryable problem; or raises for a final refusal."""
        status = response.status_code
        if status == 204 and tus.UPLOAD_OFFSET in response.headers:
            return None
        if status in (409, 460) or _retryable(status):
            return f"answered {status} ({_detail(response)})"
        if status in (404, 410):
            return "the server forgot the upload"
        raise SendError(
            f"{self.target.server} refused a chunk of the upload ({status}: {_detail(response)})"
        )

    def _resync(self, url: str, prepared: PreparedFile, state_path: Path) -> tuple[str, int]:
        """(upload URL, the server's offset) after a failure; a forgotten upload starts over."""
        offset = self._server_offset(url, prepared.bytes)
        if offset is None:
            self.on_event("the server forgot the upload while it was being sent; starting over")
            return self._create(prepared, state_path), 0
        self._save_state(state_path, prepared, url, offset)
        return url, offset

    # -- the end -------------------------------------------------------------------------------

    def _outcome(
        self, url: str, last: requests.Response, resumed_from: int, seconds: float
    ) -> UploadOutcome:
        headers = last.headers
        status_url = self.api.url(headers.get(tus.STATUS_URL) or f"{url}/status")
        status = self._settled_status(status_url, headers.get(tus.SLIDE_STATUS, ""))
        slide = status.get("slide") or {}
        return UploadOutcome(
            upload_url=url,
            status_url=status_url,
            slide_id=int(headers[tus.SLIDE_ID]),
            slide_status=str(slide.get("status") or headers.get(tus.SLIDE_STATUS, "")),
            reason=str(slide.get("failure_reason") or headers.get(tus.SLIDE_REASON, "")),
            duplicate=headers.get(tus.DUPLICATE, "").lower() == "true",
            case_id=status.get("case"),
            server_sha256=status.get("sha256"),
            bytes_sent=self.bytes_sent,
            resumed_from=resumed_from,
            retries=self.retries,
            chunks=self.chunks,
            upload_s=seconds,
        )

    def _settled_status(self, status_url: str, slide_status: str, timeout_s: float = 600) -> dict:
        """The upload's status JSON once its slide is no longer ``ingesting``."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.api.get_json(status_url, "read the upload's status")
            slide_status = (status.get("slide") or {}).get("status", slide_status)
            if slide_status != "ingesting" or time.monotonic() > deadline:
                return status
            time.sleep(1.0)


def _tus(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {tus.RESUMABLE: tus.TUS_VERSION, **(extra or {})}


def _is_json(response: requests.Response) -> bool:
    return "json" in response.headers.get("Content-Type", "")


# -- following the analysis ----------------------------------------------------------------------

JobCallback = Callable[[dict], None]  # the job as the API shows it (state, stage, progress)


def follow_analysis(
    target: Target,
    slide_id: int,
    *,
    options: TransferOptions | None = None,
    timeout_s: float = 900.0,
    on_job: JobCallback | None = None,
    on_event: EventCallback | None = None,
) -> tuple[dict, dict]:
    """Poll the slide's analysis job until it ends; returns (job, prediction) as the API shows them.

    Raises AnalysisFailedError when the job fails or is cancelled, when the cohort has no active
    model (no job will ever come), or when nothing is ready after ``timeout_s``.
    """
    api = _Api(target, options or TransferOptions(), on_event or (lambda line: None))
    deadline = time.monotonic() + timeout_s
    poll_s = 0.25
    checked_model = False
    while True:
        job = _latest_job(api, slide_id)
        if job is None and not checked_model:
            _require_active_model(api, slide_id)
            checked_model = True
        if job is not None:
            (on_job or (lambda j: None))(job)
            if job.get("state") == "succeeded":
                return job, _prediction(api, slide_id)
            if job.get("state") in ("failed", "cancelled"):
                raise AnalysisFailedError(
                    f"the analysis of slide {slide_id} {job['state']}: "
                    f"{job.get('error') or 'no reason given'}; the slide is stored, ask an "
                    "admin to re-run it"
                )
        if time.monotonic() > deadline:
            state = job.get("state", "not started") if job else "not started"
            raise AnalysisFailedError(
                f"no result for slide {slide_id} after {timeout_s:.0f} s (job {state}); "
                "the slide is stored and the analysis continues on the server"
            )
        time.sleep(poll_s)
        poll_s = min(2.0, poll_s * 1.5)


def _latest_job(api: _Api, slide_id: int) -> dict | None:
    page = api.get_json("api/v1/jobs/", "read the analysis job", slide=slide_id)
    results = page.get("results", page) if isinstance(page, dict) else page
    return results[0] if results else None


def _prediction(api: _Api, slide_id: int) -> dict:
    page = api.get_json("api/v1/predictions/", "read the prediction", slide=slide_id)
    results = page.get("results", page) if isinstance(page, dict) else page
    if not results:
        raise AnalysisFailedError(
            f"the analysis of slide {slide_id} succeeded but the server shows no prediction"
        )
    return results[0]


def _require_active_model(api: _Api, slide_id: int) -> None:
    slide = api.get_json(f"api/v1/slides/{slide_id}/", "read the slide")
    cohort = api.get_json(f"api/v1/cohorts/{slide['cohort']}/", "read the cohort")
    if cohort.get("active_model") is None:
        raise AnalysisFailedError(
            f"cohort {cohort.get('slug') or cohort.get('id')} has no active model, so slide "
            f"{slide_id} will not be analysed; the slide is stored: ask an admin to activate a "
            "model for the cohort"
        )


# -- the whole send ------------------------------------------------------------------------------


@dataclass
class SendReport:
    """Everything ``lowmag send --json`` prints."""

    prepared: PreparedFile
    upload: UploadOutcome
    viewer_url: str | None
    job: dict | None = None
    prediction: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        prepared, upload = self.prepared, self.upload
        return {
            "slide_id": upload.slide_id,
            "status": (self.job or {}).get("state") or upload.slide_status,
            "slide_status": upload.slide_status,
            "duplicate": upload.duplicate,
            "case_id": upload.case_id,
            "viewer_url": self.viewer_url,
            "source": {"path": str(prepared.source_path), "bytes": prepared.source_bytes},
            "file": {
                "path": str(prepared.path),
                "name": prepared.upload_name,
                "bytes": prepared.bytes,
                "sha256": prepared.sha256,
                "magnification": prepared.magnification or "native",
                "reused": prepared.reused,
                "kept": prepared.path.exists(),
            },
            "export": prepared.export,
            "upload": {k: v for k, v in asdict(upload).items() if k != "upload_s"},
            "bytes_sent": upload.bytes_sent,
            "resumed_from": upload.resumed_from,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "job": self.job,
            "prediction": self.prediction,
        }


def viewer_url(target: Target, case_id: int | None) -> str | None:
    return f"{target.server}/cases/{case_id}/" if case_id is not None else None
