"""The tus 1.0 wire format as LowMag speaks it: versions, header names, metadata, checksums.

The one definition both sides import: the hospital client (``client.sender``) and the portal's
upload endpoint (``portal.uploads.views``). Nothing here needs a request or a connection.
Protocol: https://tus.io/protocols/resumable-upload (core, creation, creation-with-upload,
checksum, termination), plus LowMag's answer headers naming the slide an upload became.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,creation-with-upload,checksum,termination"
CHECKSUM_ALGORITHMS = "sha256"
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
# Not in the HTTP registry: the tus checksum extension defines it.
STATUS_CHECKSUM_MISMATCH = 460

# -- header names (tus 1.0) --
RESUMABLE = "Tus-Resumable"
VERSION = "Tus-Version"
EXTENSION = "Tus-Extension"
CHECKSUM_ALGORITHM = "Tus-Checksum-Algorithm"
MAX_SIZE = "Tus-Max-Size"
UPLOAD_LENGTH = "Upload-Length"
UPLOAD_OFFSET = "Upload-Offset"
UPLOAD_METADATA = "Upload-Metadata"
UPLOAD_CHECKSUM = "Upload-Checksum"
UPLOAD_DEFER_LENGTH = "Upload-Defer-Length"
# -- LowMag's answer to the last chunk: the slide the upload became --
SLIDE_ID = "Upload-Slide-Id"
SLIDE_STATUS = "Upload-Slide-Status"
SLIDE_REASON = "Upload-Slide-Reason"
STATUS_URL = "Upload-Status-Url"
DUPLICATE = "Upload-Duplicate"


class TusError(Exception):
    """A request the protocol says to refuse; carries the HTTP status to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def parse_metadata(header: str) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64(value)`` pairs (value optional)."""
    metadata: dict[str, str] = {}
    for pair in (p.strip() for p in header.split(",")):
        if not pair:
            continue
        key, _, encoded = pair.partition(" ")
        if not key or " " in encoded.strip() or key in metadata:
            raise TusError(400, f"Upload-Metadata: malformed pair {pair[:60]!r}")
        metadata[key] = _decode_value(key, encoded.strip())
    return metadata


def _decode_value(key: str, encoded: str) -> str:
    try:
        return base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise TusError(400, f"Upload-Metadata: {key} is not base64 of UTF-8 text") from exc


def encode_metadata(metadata: dict[str, str]) -> str:
    """The inverse of ``parse_metadata`` (clients, tests)."""
    return ",".join(
        f"{key} {base64.b64encode(value.encode('utf-8')).decode('ascii')}"
        for key, value in metadata.items()
    )


def parse_non_negative(name: str, value: str | None) -> int:
    if value is None or not value.strip().isdigit():
        raise TusError(400, f"{name} must be a non-negative integer")
    return int(value)


def checksum_header(chunk: bytes) -> str:
    """The ``Upload-Checksum`` value for ``chunk``: ``sha256 <base64 digest>``."""
    return "sha256 " + base64.b64encode(hashlib.sha256(chunk).digest()).decode("ascii")


def parse_checksum(header: str | None) -> bytes | None:
    """``Upload-Checksum: sha256 <base64 digest>`` -> the digest bytes (None when absent)."""
    if header is None:
        return None
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm.lower() != "sha256":
        raise TusError(400, f"Upload-Checksum: unsupported algorithm {algorithm!r}; use sha256")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error as exc:
        raise TusError(400, "Upload-Checksum: the digest is not base64") from exc
    if len(digest) != hashlib.sha256().digest_size:
        raise TusError(400, "Upload-Checksum: a sha256 digest is 32 bytes")
    return digest


def checksum_matches(expected: bytes, actual: bytes) -> bool:
    return hmac.compare_digest(expected, actual)
