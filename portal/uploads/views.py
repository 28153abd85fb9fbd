"""tus 1.0 server for slide uploads, plus a JSON status endpoint.

``/api/v1/uploads/``                 OPTIONS (discovery), POST (creation, creation-with-upload)
``/api/v1/uploads/<id>``             HEAD (offset), PATCH (append), DELETE (termination)
``/api/v1/uploads/<id>/status``      GET: the upload and the slide it became (JSON)

Authentication is DRF's configured set (session, token). Only the uploader sees an upload;
the case must belong to a cohort the user is a member of (or the user is an admin).
Everyone else gets 404, so upload and case ids reveal nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.db.models import QuerySet
from django.http import HttpResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from client import tus
from portal.cases.access import INTEGRATION, PATHOLOGIST, visible
from portal.cases.models import Case, Cohort, Slide
from portal.uploads.ingest import on_upload_complete
from portal.uploads.models import Upload

READ_CHUNK_BYTES = 256 * 1024
SLIDE_DETAIL_FIELDS = (
    "id",
    "case_id",
    "original_name",
    "status",
    "failure_reason",
    "sha256",
    "size_bytes",
    "vendor",
    "mpp",
    "magnification",
    "width",
    "height",
    "level_count",
    "tissue_area_mm2",
    "has_label",
    "has_macro",
)


# -- who may upload where ----------------------------------------------------------------------


def uploadable_cases(user) -> QuerySet[Case]:
    """Cases in cohorts where the user is a pathologist or integration member (all for admins)."""
    return visible(
        Case.objects.select_related("cohort"), user, "cohort_id", (PATHOLOGIST, INTEGRATION)
    )


def find_case(user, metadata: dict[str, str]) -> Case | None:
    """``case`` is a case id, or an accession number when ``cohort`` (slug or id) is given."""
    case_ref = metadata.get("case", "").strip()
    cohort_ref = metadata.get("cohort", "").strip()
    cases = uploadable_cases(user)
    if not case_ref:
        return None
    if not cohort_ref:
        case_id = _as_id(case_ref)
        if case_id is None:
            return None
        return cases.filter(pk=case_id).first()
    cohort = Cohort.objects.filter(slug=cohort_ref).first()
    cohort_id = _as_id(cohort_ref)
    if cohort is None and cohort_id is not None:
        cohort = Cohort.objects.filter(pk=cohort_id).first()
    if cohort is None:
        return None
    in_cohort = cases.filter(cohort=cohort)
    case = in_cohort.filter(accession_number=case_ref).first()
    case_id = _as_id(case_ref)
    if case is None and case_id is not None:
        case = in_cohort.filter(pk=case_id).first()
    return case


def _as_id(text: str) -> int | None:
    """A database id, or None for anything else (including numbers too large for one)."""
    if not text.isdigit() or len(text) > 18:
        return None
    return int(text)


# -- the tus views -----------------------------------------------------------------------------

TUS_RESUMABLE = OpenApiParameter(
    tus.RESUMABLE, str, OpenApiParameter.HEADER, required=True, enum=[tus.TUS_VERSION]
)
BINARY_BODY = {tus.OFFSET_CONTENT_TYPE: OpenApiTypes.BINARY}
# Error bodies: portal.api.schema gives every 4xx here the shared {"detail": ...}.
VERSION_REFUSED = OpenApiResponse(description=f"Tus-Resumable is not {tus.TUS_VERSION}.")
CONTENT_TYPE_REFUSED = OpenApiResponse(
    description=f"Content-Type is not {tus.OFFSET_CONTENT_TYPE}."
)


def _header(name: str, description: str, required: bool = False) -> OpenApiParameter:
    return OpenApiParameter(
        name, str, OpenApiParameter.HEADER, required=required, description=description
    )


class TusView(APIView):
    """Shared protocol handling: version check, Tus-Resumable on every answer, errors."""

    renderer_classes = [JSONRenderer]
    parser_classes: list = []  # bodies are read raw, in chunks

    def get_permissions(self):
        if self.request.method == "OPTIONS":
            return [AllowAny()]
        return super().get_permissions()

    def initial(self, request: Request, *args, **kwargs) -> None:
        if request.method != "OPTIONS":
            version = request.headers.get(tus.RESUMABLE)
            if version != tus.TUS_VERSION:
                raise tus.TusError(
                    412, f"Tus-Resumable must be {tus.TUS_VERSION} (got {version or 'nothing'})"
                )
        super().initial(request, *args, **kwargs)

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, tus.TusError):
            return Response({"detail": exc.detail}, status=exc.status)
        return super().handle_exception(exc)

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        response[tus.RESUMABLE] = tus.TUS_VERSION
        if response.status_code == 412:
            response[tus.VERSION] = tus.TUS_VERSION
        return response

    # The tus OPTIONS answer is a bare 204 carrying protocol headers, not a rendered Response.
    def options(self, request: Request, *args, **kwargs) -> HttpResponse:  # type: ignore[override]
        response = HttpResponse(status=204)
        response[tus.VERSION] = tus.TUS_VERSION
        response[tus.EXTENSION] = tus.TUS_EXTENSIONS
        response[tus.CHECKSUM_ALGORITHM] = tus.CHECKSUM_ALGORITHMS
        response[tus.MAX_SIZE] = str(settings.LOWMAG_MAX_UPLOAD_BYTES)
        return response


class UploadCollectionView(TusView):
    """Create uploads (tus creation); OPTIONS tells clients what this server supports."""

    @extend_schema(
        summary="Create an upload (tus creation, creation-with-upload)",
        parameters=[
            TUS_RESUMABLE,
            _header(tus.UPLOAD_LENGTH, "Size of the whole file in bytes.", required=True),
            _header(
                tus.UPLOAD_METADATA,
                "Comma-separated 'key base64(value)' pairs: filename (required), case "
                "(case id, or accession number together with cohort), cohort (slug or id).",
                required=True,
            ),
        ],
        request=BINARY_BODY,
        responses={
            201: OpenApiResponse(description="Created; Location is the upload's URL."),
            400: OpenApiResponse(description="A tus header is missing or malformed."),
            404: OpenApiResponse(description="No such case among the user's cohorts."),
            409: OpenApiResponse(description="The case is signed; slides cannot be added."),
            411: OpenApiResponse(description="A chunked body: send Content-Length."),
            412: VERSION_REFUSED,
            413: OpenApiResponse(description="Upload-Length exceeds Tus-Max-Size."),
            415: CONTENT_TYPE_REFUSED,
        },
    )
    def post(self, request: Request) -> HttpResponse:
        if tus.UPLOAD_DEFER_LENGTH in request.headers:
            raise tus.TusError(400, "Upload-Defer-Length is not supported; send Upload-Length")
        length = tus.parse_non_negative(tus.UPLOAD_LENGTH, request.headers.get(tus.UPLOAD_LENGTH))
        _refuse_too_large(length)
        if length == 0:
            raise tus.TusError(400, "Upload-Length is 0: an empty file is not a slide")
        metadata = tus.parse_metadata(request.headers.get(tus.UPLOAD_METADATA, ""))
        upload = _create_upload(request, metadata, length)
        response = HttpResponse(status=201)
        response["Location"] = request.build_absolute_uri(
            reverse("uploads:upload", kwargs={"upload_id": upload.id})
        )
        if _body_length(request) > 0:  # creation-with-upload
            _check_content_type(request)
            response = _receive(request, upload, start=0, checksum=None, response=response)
        return response


class UploadView(TusView):
    """One upload: HEAD for its offset, PATCH to append, DELETE to abandon it."""

    @extend_schema(exclude=True)
    def head(self, request: Request, upload_id) -> HttpResponse:
        upload = _own_upload(request, upload_id)
        response = HttpResponse(status=200)
        response[tus.UPLOAD_OFFSET] = str(upload.offset)
        response[tus.UPLOAD_LENGTH] = str(upload.length)
        response[tus.UPLOAD_METADATA] = tus.encode_metadata(upload.metadata)
        response["Cache-Control"] = "no-store"
        return response

    @extend_schema(
        summary="Append bytes at Upload-Offset (tus core, checksum)",
        parameters=[
            TUS_RESUMABLE,
            _header(tus.UPLOAD_OFFSET, "Must equal the server's offset (HEAD).", required=True),
            _header(tus.UPLOAD_CHECKSUM, "Optional 'sha256 <base64 digest>' of this chunk."),
        ],
        request=BINARY_BODY,
        responses={
            204: OpenApiResponse(
                description="Stored; Upload-Offset is the new offset. The last chunk's answer "
                "adds Upload-Slide-Id, Upload-Slide-Status, Upload-Status-Url, and "
                "Upload-Slide-Reason (failed) or Upload-Duplicate (already a slide)."
            ),
            400: OpenApiResponse(description="A tus header is missing or malformed."),
            404: OpenApiResponse(description="No such upload of yours."),
            409: OpenApiResponse(description="Upload-Offset does not match."),
            410: OpenApiResponse(description="The upload's data is gone; start a new upload."),
            411: OpenApiResponse(description="A chunked body: send Content-Length."),
            412: VERSION_REFUSED,
            413: OpenApiResponse(description="The body would exceed Upload-Length."),
            415: CONTENT_TYPE_REFUSED,
            423: OpenApiResponse(description="Another request is writing to this upload; retry."),
            460: OpenApiResponse(description="Checksum mismatch; the chunk was discarded."),
        },
    )
    def patch(self, request: Request, upload_id) -> HttpResponse:
        _check_content_type(request)
        start = tus.parse_non_negative(tus.UPLOAD_OFFSET, request.headers.get(tus.UPLOAD_OFFSET))
        checksum = tus.parse_checksum(request.headers.get(tus.UPLOAD_CHECKSUM))
        upload = _own_upload(request, upload_id)
        return _receive(request, upload, start, checksum, HttpResponse(status=204))

    @extend_schema(
        summary="Abandon an unfinished upload (tus termination)",
        parameters=[TUS_RESUMABLE],
        responses={
            204: None,
            404: OpenApiResponse(description="No such upload of yours."),
            409: OpenApiResponse(description="The upload is complete; it cannot be abandoned."),
            412: VERSION_REFUSED,
        },
    )
    def delete(self, request: Request, upload_id) -> HttpResponse:
        upload = _own_upload(request, upload_id)
        if upload.completed:
            raise tus.TusError(
                409, "the upload is complete; its slide is managed through the cases API"
            )
        with _locked_data(upload):
            upload.data_path.unlink(missing_ok=True)
            upload.delete()
        return HttpResponse(status=204)


class UploadStatusView(APIView):
    """Where an upload stands and, once complete, the slide it became (and why it failed)."""

    renderer_classes = [JSONRenderer]

    @extend_schema(summary="Upload progress and the resulting slide", responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, upload_id) -> Response:
        upload = Upload.objects.filter(pk=upload_id, user=_signed_in(request)).first()
        if upload is None or not uploadable_cases(request.user).filter(pk=upload.case_id).exists():
            return Response({"detail": "No such upload."}, status=404)
        return Response(upload_status(upload))


def upload_status(upload: Upload) -> dict:
    slide = upload.slide
    return {
        "id": str(upload.id),
        "filename": upload.filename,
        "case": upload.case_id,
        "length": upload.length,
        "offset": upload.offset,
        "completed": upload.completed,
        "duplicate": upload.duplicate,
        "sha256": upload.sha256 or None,
        "created_at": upload.created_at.isoformat(),
        "slide": {f: getattr(slide, f) for f in SLIDE_DETAIL_FIELDS} if slide else None,
    }


# -- request pieces ----------------------------------------------------------------------------


def _refuse_too_large(length: int) -> None:
    limit = int(settings.LOWMAG_MAX_UPLOAD_BYTES)
    if length > limit:
        raise tus.TusError(413, f"Upload-Length {length} exceeds the limit of {limit} bytes")


def _signed_in(request: Request) -> User:
    """The request's user; the permission classes have already turned anonymous requests away."""
    user = request.user
    if isinstance(user, AnonymousUser):
        raise exceptions.NotAuthenticated()
    return user


def _create_upload(request: Request, metadata: dict[str, str], length: int) -> Upload:
    filename = (metadata.get("filename") or metadata.get("name") or "").strip()
    if not filename:
        raise tus.TusError(400, "Upload-Metadata must name the file: filename <base64>")
    case = find_case(request.user, metadata)
    if case is None:
        raise tus.TusError(404, "No such case (metadata 'case': id, or accession + 'cohort').")
    if case.is_signed:
        raise tus.TusError(409, f"case {case.accession_number} is signed; slides cannot be added")
    upload = Upload.objects.create(
        user=_signed_in(request), case=case, filename=filename, length=length, metadata=metadata
    )
    upload.data_path.parent.mkdir(parents=True, exist_ok=True)
    upload.data_path.touch()
    return upload


def _own_upload(request: Request, upload_id) -> Upload:
    upload = Upload.objects.filter(pk=upload_id, user=_signed_in(request)).first()
    if upload is None or not uploadable_cases(request.user).filter(pk=upload.case_id).exists():
        raise tus.TusError(404, "No such upload.")
    return upload


def _check_content_type(request: Request) -> None:
    content_type = request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if content_type != tus.OFFSET_CONTENT_TYPE:
        raise tus.TusError(415, f"Content-Type must be {tus.OFFSET_CONTENT_TYPE}")


def _body_length(request: Request) -> int:
    raw = request.META.get("CONTENT_LENGTH") or ""
    if not raw.strip():
        if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            raise tus.TusError(411, "send Content-Length; chunked request bodies are not accepted")
        return 0
    return tus.parse_non_negative("Content-Length", raw)


@contextmanager
def _locked_data(upload: Upload) -> Iterator[BinaryIO]:
    """The partial file, opened for writing and locked against a concurrent PATCH."""
    try:
        fh = open(upload.data_path, "r+b")
    except FileNotFoundError as exc:
        raise tus.TusError(410, "the upload's data is gone; start a new upload") from exc
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise tus.TusError(423, "another request is writing to this upload; retry") from exc
        yield fh
    finally:
        fh.close()


def _receive(
    request: Request, upload: Upload, start: int, checksum: bytes | None, response: HttpResponse
) -> HttpResponse:
    """Append the request body at ``start``; complete the upload when the last byte is in."""
    body_length = _body_length(request)
    if upload.completed:
        _check_offset(upload, start, body_length)
        return _with_offset(response, upload)
    with _locked_data(upload) as fh:
        upload.refresh_from_db()
        _check_offset(upload, start, body_length)
        received = _append(request, fh, start, body_length, checksum)
        upload.offset = start + received
        upload.save(update_fields=["offset", "updated_at"])
        if upload.offset == upload.length:
            on_upload_complete(upload)
    return _with_offset(response, upload)


def _check_offset(upload: Upload, start: int, body_length: int) -> None:
    if start != upload.offset:
        raise tus.TusError(409, f"Upload-Offset {start} does not match the offset {upload.offset}")
    if start + body_length > upload.length:
        raise tus.TusError(413, f"the body would exceed Upload-Length {upload.length}")


def _append(
    request: Request, fh: BinaryIO, start: int, body_length: int, checksum: bytes | None
) -> int:
    """Write what arrives; a dropped connection keeps the bytes already written (no checksum)."""
    fh.seek(start)
    fh.truncate()
    digest = hashlib.sha256() if checksum is not None else None
    received = 0
    while received < body_length:
        try:
            chunk = request.read(min(READ_CHUNK_BYTES, body_length - received))
        except OSError:  # the client went away mid-body
            break
        if not chunk:
            break
        fh.write(chunk)
        if digest is not None:
            digest.update(chunk)
        received += len(chunk)
    fh.flush()
    os.fsync(fh.fileno())
    if digest is not None and not _verified(digest, checksum, received, body_length):
        fh.truncate(start)
        raise tus.TusError(
            tus.STATUS_CHECKSUM_MISMATCH, "Upload-Checksum does not match the chunk; resend it"
        )
    return received


def _verified(digest, checksum: bytes | None, received: int, body_length: int) -> bool:
    return (
        checksum is not None
        and received == body_length
        and tus.checksum_matches(checksum, digest.digest())
    )


def _with_offset(response: HttpResponse, upload: Upload) -> HttpResponse:
    response[tus.UPLOAD_OFFSET] = str(upload.offset)
    if upload.completed and upload.slide is not None:
        _add_slide_headers(response, upload, upload.slide)
    return response


def _add_slide_headers(response: HttpResponse, upload: Upload, slide: Slide) -> None:
    response[tus.SLIDE_ID] = str(slide.pk)
    response[tus.SLIDE_STATUS] = slide.status
    response[tus.STATUS_URL] = reverse("uploads:status", kwargs={"upload_id": upload.id})
    if upload.duplicate:
        response[tus.DUPLICATE] = "true"
    if slide.failure_reason:
        response[tus.SLIDE_REASON] = _header_text(slide.failure_reason)


def _header_text(text: str, limit: int = 1000) -> str:
    plain = " ".join(text.replace("µ", "u").split())
    return plain.encode("ascii", "replace").decode("ascii")[:limit]
