"""tus 1.0 uploads: discovery, creation, offsets, checksums, termination, resuming, access."""

from __future__ import annotations

import base64
import hashlib
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from client.tus import encode_metadata
from portal.cases.models import Case, Membership, Slide
from portal.uploads.models import Upload
from tests.conftest import shared_slide

TUS = {"HTTP_TUS_RESUMABLE": "1.0.0"}
OFFSET_TYPE = "application/offset+octet-stream"
CHUNK = 256 * 1024
CMU = "cmu-1-small-region.svs"


# -- fixtures and helpers (also used by test_ingest.py) -----------------------------------------


@pytest.fixture(autouse=True)
def _own_storage(storage):
    """Every test here stores slides and uploads in its own temporary folder."""


def create_upload(client: APIClient, case: Case, name: str, length: int, **headers) -> str:
    """POST a creation request; returns the upload's path."""
    metadata = encode_metadata({"filename": name, "case": str(case.pk)})
    response = client.post(
        "/api/v1/uploads/",
        HTTP_UPLOAD_LENGTH=str(length),
        HTTP_UPLOAD_METADATA=metadata,
        **TUS,
        **headers,
    )
    assert response.status_code == 201, response.content
    return urlsplit(response["Location"]).path


def patch(client: APIClient, path: str, offset: int, body: bytes, **headers):
    return client.generic(
        "PATCH",
        path,
        data=body,
        content_type=OFFSET_TYPE,
        HTTP_UPLOAD_OFFSET=str(offset),
        **TUS,
        **headers,
    )


def tus_upload(client: APIClient, case: Case, data: bytes, name: str, chunk: int = CHUNK):
    """Send ``data`` in chunks; returns (upload path, the last PATCH response)."""
    path = create_upload(client, case, name, len(data))
    response = None
    for start in range(0, len(data), chunk):
        response = patch(client, path, start, data[start : start + chunk])
        assert response.status_code == 204, response.content
    return path, response


def head_offset(client: APIClient, path: str) -> int:
    response = client.head(path, **TUS)
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    return int(response["Upload-Offset"])


class DroppedPayload:
    """A request body whose client vanishes after ``sent`` bytes (EOF, then a reset)."""

    def __init__(self, data: bytes, sent: int) -> None:
        self._data = data[:sent]
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if self._pos >= len(self._data):
            raise ConnectionResetError("client went away")
        size = len(self._data) - self._pos if size < 0 else size
        out = self._data[self._pos : self._pos + size]
        self._pos += len(out)
        return out

    def readline(self, size: int = -1) -> bytes:
        return self.read(size)


# -- discovery and protocol errors -------------------------------------------------------------


def test_options_advertises_version_extensions_checksum_and_max_size(client, settings):
    settings.LOWMAG_MAX_UPLOAD_BYTES = 12345
    response = client.options("/api/v1/uploads/")
    assert response.status_code == 204
    assert response["Tus-Version"] == "1.0.0"
    assert set(response["Tus-Extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "checksum",
        "termination",
    }
    assert response["Tus-Checksum-Algorithm"] == "sha256"
    assert response["Tus-Max-Size"] == "12345"
    assert response["Tus-Resumable"] == "1.0.0"


@pytest.mark.django_db
def test_anonymous_creation_is_refused_with_401(client):
    response = client.post(
        "/api/v1/uploads/",
        HTTP_UPLOAD_LENGTH="10",
        HTTP_UPLOAD_METADATA=encode_metadata({"filename": "a.svs", "case": "1"}),
        **TUS,
    )
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert response["Tus-Resumable"] == "1.0.0"
    assert not Upload.objects.exists()


def test_wrong_tus_version_gets_412_with_supported_versions(lis_client, case_a):
    response = lis_client.post(
        "/api/v1/uploads/",
        HTTP_UPLOAD_LENGTH="10",
        HTTP_UPLOAD_METADATA=encode_metadata({"filename": "a.svs", "case": str(case_a.pk)}),
        HTTP_TUS_RESUMABLE="0.2.2",
    )
    assert response.status_code == 412
    assert response["Tus-Version"] == "1.0.0"
    assert not Upload.objects.exists()


def test_upload_length_over_the_limit_gets_413_before_anything_is_stored(
    lis_client, case_a, settings, storage
):
    settings.LOWMAG_MAX_UPLOAD_BYTES = 1000
    response = lis_client.post(
        "/api/v1/uploads/",
        data=b"x" * 100,
        content_type=OFFSET_TYPE,
        HTTP_UPLOAD_LENGTH="1001",
        HTTP_UPLOAD_METADATA=encode_metadata({"filename": "a.svs", "case": str(case_a.pk)}),
        **TUS,
    )
    assert response.status_code == 413
    assert not Upload.objects.exists()
    assert not any(storage.rglob("*.part"))


def test_creation_finds_the_case_by_accession_number_and_cohort_slug(lis_client, case_a):
    metadata = encode_metadata({"filename": "a.svs", "case": "A-001", "cohort": "cohort-a"})
    response = lis_client.post(
        "/api/v1/uploads/", HTTP_UPLOAD_LENGTH="10", HTTP_UPLOAD_METADATA=metadata, **TUS
    )
    assert response.status_code == 201
    assert Upload.objects.get().case == case_a


def test_creation_for_a_case_outside_the_users_cohorts_is_404(api_client_for, path_b, case_a):
    metadata = encode_metadata({"filename": "a.svs", "case": str(case_a.pk)})
    response = api_client_for(path_b).post(
        "/api/v1/uploads/", HTTP_UPLOAD_LENGTH="10", HTTP_UPLOAD_METADATA=metadata, **TUS
    )
    assert response.status_code == 404
    assert not Upload.objects.exists()


@pytest.mark.parametrize("case_ref", ["99999999999999999999999", "A-001", "-1"])
def test_creation_with_an_unknown_case_reference_is_404(lis_client, case_a, case_ref):
    metadata = encode_metadata({"filename": "a.svs", "case": case_ref})
    response = lis_client.post(
        "/api/v1/uploads/", HTTP_UPLOAD_LENGTH="10", HTTP_UPLOAD_METADATA=metadata, **TUS
    )
    assert response.status_code == 404


def test_creation_without_a_filename_is_400(lis_client, case_a):
    response = lis_client.post(
        "/api/v1/uploads/",
        HTTP_UPLOAD_LENGTH="10",
        HTTP_UPLOAD_METADATA=encode_metadata({"case": str(case_a.pk)}),
        **TUS,
    )
    assert response.status_code == 400
    assert "filename" in response.json()["detail"]


def test_patch_at_the_wrong_offset_gets_409_and_changes_nothing(lis_client, case_a):
    path = create_upload(lis_client, case_a, "a.svs", 100)
    assert patch(lis_client, path, 0, b"a" * 40).status_code == 204
    response = patch(lis_client, path, 10, b"b" * 40)
    assert response.status_code == 409
    assert head_offset(lis_client, path) == 40


def test_patch_needs_the_offset_content_type(lis_client, case_a):
    path = create_upload(lis_client, case_a, "a.svs", 100)
    response = lis_client.generic(
        "PATCH",
        path,
        data=b"abc",
        content_type="application/octet-stream",
        HTTP_UPLOAD_OFFSET="0",
        **TUS,
    )
    assert response.status_code == 415


def test_checksum_mismatch_gets_460_and_the_chunk_is_discarded(lis_client, case_a):
    path = create_upload(lis_client, case_a, "a.svs", 100)
    body = b"c" * 50
    wrong = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
    response = patch(lis_client, path, 0, body, HTTP_UPLOAD_CHECKSUM=f"sha256 {wrong}")
    assert response.status_code == 460
    assert head_offset(lis_client, path) == 0
    right = base64.b64encode(hashlib.sha256(body).digest()).decode()
    response = patch(lis_client, path, 0, body, HTTP_UPLOAD_CHECKSUM=f"sha256 {right}")
    assert response.status_code == 204
    assert response["Upload-Offset"] == "50"


def test_unsupported_checksum_algorithm_is_400(lis_client, case_a):
    path = create_upload(lis_client, case_a, "a.svs", 100)
    response = patch(lis_client, path, 0, b"x", HTTP_UPLOAD_CHECKSUM="md5 AAAA")
    assert response.status_code == 400


def test_body_past_upload_length_is_refused(lis_client, case_a):
    path = create_upload(lis_client, case_a, "a.svs", 10)
    assert patch(lis_client, path, 0, b"x" * 11).status_code == 413
    assert head_offset(lis_client, path) == 0


def test_another_user_cannot_head_patch_delete_or_read_status(lis_client, case_a, cohort_a):
    path = create_upload(lis_client, case_a, "a.svs", 100)
    colleague = get_user_model().objects.create_user("path-skin", password="x" * 12)
    Membership.objects.create(user=colleague, cohort=cohort_a, role=Membership.PATHOLOGIST)
    other = APIClient()
    other.force_authenticate(colleague)
    assert other.head(path, **TUS).status_code == 404
    assert patch(other, path, 0, b"x" * 10).status_code == 404
    assert other.delete(path, **TUS).status_code == 404
    assert other.get(f"{path}/status").status_code == 404
    assert head_offset(lis_client, path) == 0


def test_anonymous_head_is_refused(client, lis_client, case_a):
    path = create_upload(lis_client, case_a, "a.svs", 100)
    assert client.head(path, **TUS).status_code in (401, 403)


def test_termination_removes_the_partial_file(lis_client, case_a, storage):
    path = create_upload(lis_client, case_a, "a.svs", 100)
    patch(lis_client, path, 0, b"x" * 30)
    assert len(list(storage.rglob("*.part"))) == 1
    response = lis_client.delete(path, **TUS)
    assert response.status_code == 204
    assert not any(storage.rglob("*.part"))
    assert lis_client.head(path, **TUS).status_code == 404


def test_creation_with_upload_stores_the_first_bytes(lis_client, case_a):
    metadata = encode_metadata({"filename": "a.svs", "case": str(case_a.pk)})
    response = lis_client.post(
        "/api/v1/uploads/",
        data=b"y" * 25,
        content_type=OFFSET_TYPE,
        HTTP_UPLOAD_LENGTH="100",
        HTTP_UPLOAD_METADATA=metadata,
        **TUS,
    )
    assert response.status_code == 201
    assert response["Upload-Offset"] == "25"
    assert head_offset(lis_client, urlsplit(response["Location"]).path) == 25


# -- a real slide, resumed ---------------------------------------------------------------------


def test_dropped_patch_resumes_from_the_server_offset_to_a_ready_slide(
    lis_client, case_a, settings
):
    data = shared_slide(CMU).read_bytes()
    path = create_upload(lis_client, case_a, CMU, len(data))
    assert patch(lis_client, path, 0, data[:CHUNK]).status_code == 204
    # The second chunk's connection drops after 100,000 of its 262,144 bytes.
    response = lis_client.generic(
        "PATCH",
        path,
        content_type=OFFSET_TYPE,
        HTTP_UPLOAD_OFFSET=str(CHUNK),
        CONTENT_LENGTH=str(CHUNK),
        **{"wsgi.input": DroppedPayload(data[CHUNK : 2 * CHUNK], 100_000)},
        **TUS,
    )
    assert response.status_code == 204
    offset = head_offset(lis_client, path)
    assert offset == CHUNK + 100_000
    last = None
    for start in range(offset, len(data), CHUNK):
        last = patch(lis_client, path, start, data[start : start + CHUNK])
        assert last.status_code == 204
    assert last["Upload-Offset"] == str(len(data))
    assert last["Upload-Slide-Status"] == "ready"
    slide = Slide.objects.get(pk=int(last["Upload-Slide-Id"]))
    assert slide.sha256 == hashlib.sha256(data).hexdigest()
    assert slide.path == Path(settings.SLIDE_DIR) / str(slide.pk) / CMU
    assert slide.path.read_bytes() == data
    status = lis_client.get(last["Upload-Status-Url"]).json()
    assert status["completed"] and status["sha256"] == slide.sha256
    assert status["slide"]["status"] == "ready"


def test_same_file_twice_answers_with_the_existing_slide(lis_client, case_a, storage):
    data = shared_slide(CMU).read_bytes()
    _, first = tus_upload(lis_client, case_a, data, CMU, chunk=len(data))
    slides_after_first = Slide.objects.count()
    path, second = tus_upload(lis_client, case_a, data, "copy.svs", chunk=len(data))
    assert second["Upload-Duplicate"] == "true"
    assert second["Upload-Slide-Id"] == first["Upload-Slide-Id"]
    assert Slide.objects.count() == slides_after_first
    assert len(list(storage.rglob("*.svs"))) == 1
    assert lis_client.get(f"{path}/status").json()["duplicate"] is True


@pytest.mark.django_db(transaction=True)
def test_live_server_resumes_after_the_socket_closes_mid_body(
    live_server, case_a, integration_token_a
):
    data = shared_slide(CMU).read_bytes()
    auth = {"Authorization": f"Token {integration_token_a}", "Tus-Resumable": "1.0.0"}
    metadata = encode_metadata({"filename": CMU, "case": "A-001", "cohort": "cohort-a"})
    created = requests.post(
        f"{live_server.url}/api/v1/uploads/",
        headers={
            **auth,
            "Upload-Length": str(len(data)),
            "Upload-Metadata": metadata,
        },
        timeout=10,
    )
    assert created.status_code == 201
    url = created.headers["Location"]
    sent = 150_000
    _send_and_drop(url, auth, data[:CHUNK], sent)
    offset = _wait_for_offset(url, auth, sent)
    assert offset == sent
    last = None
    while offset < len(data):
        body = data[offset : offset + CHUNK]
        last = requests.patch(
            url,
            data=body,
            headers={**auth, "Upload-Offset": str(offset), "Content-Type": OFFSET_TYPE},
            timeout=30,
        )
        assert last.status_code == 204, last.text
        offset = int(last.headers["Upload-Offset"])
    assert last.headers["Upload-Slide-Status"] == "ready"
    slide = Slide.objects.get(pk=int(last.headers["Upload-Slide-Id"]))
    assert slide.sha256 == hashlib.sha256(data).hexdigest()
    assert slide.path.read_bytes() == data


def _send_and_drop(url: str, auth: dict, chunk: bytes, sent: int) -> None:
    """Announce a whole chunk, send ``sent`` bytes of it, and close the socket."""
    parts = urlsplit(url)
    head = [
        f"PATCH {parts.path} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"Content-Type: {OFFSET_TYPE}",
        f"Content-Length: {len(chunk)}",
        "Upload-Offset: 0",
        *(f"{k}: {v}" for k, v in auth.items()),
        "",
        "",
    ]
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall("\r\n".join(head).encode("ascii") + chunk[:sent])
        time.sleep(0.2)


def _wait_for_offset(url: str, auth: dict, expected: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    offset = -1
    while time.monotonic() < deadline:
        response = requests.head(url, headers=auth, timeout=10)
        offset = int(response.headers["Upload-Offset"])
        if offset >= expected:
            break
        time.sleep(0.1)
    return offset
