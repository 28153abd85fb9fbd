"""Errors as JSON with a message a client can act on; never a traceback."""

from __future__ import annotations

import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, IntegrityError
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from portal.core.middleware import busy_response, is_database_busy
from portal.reviews import signing
from portal.reviews.models import ImmutableRowError

log = logging.getLogger(__name__)


class PreconditionFailed(APIException):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    default_detail = "The object changed since you read it; reload it and apply your change again."
    default_code = "precondition_failed"


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the current state of the object."
    default_code = "conflict"


DIAGNOSIS_RULES = {  # the status code of each refusal of portal.reviews.signing
    signing.DiagnosisConflict: status.HTTP_409_CONFLICT,
    signing.NotAllowed: status.HTTP_403_FORBIDDEN,
    signing.StaleRowVersion: status.HTTP_412_PRECONDITION_FAILED,
    signing.RowVersionRequired: status.HTTP_428_PRECONDITION_REQUIRED,
    signing.InvalidInput: status.HTTP_400_BAD_REQUEST,
}


def exception_handler(exc, context):
    """DRF's handler, plus domain and model-level refusals mapped to 4xx instead of 500."""
    if isinstance(exc, signing.DiagnosisRuleError):
        if isinstance(exc, signing.InvalidInput):
            return Response({exc.field: str(exc)}, status=status.HTTP_400_BAD_REQUEST)
        return Response({"detail": str(exc)}, status=DIAGNOSIS_RULES[type(exc)])
    if isinstance(exc, ImmutableRowError):
        return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
    if isinstance(exc, IntegrityError):
        log.info("integrity error on %s: %s", context["request"].path, exc)
        return Response(
            {"detail": "This would duplicate or orphan an existing record."},
            status=status.HTTP_409_CONFLICT,
        )
    if is_database_busy(exc):
        log.warning("database busy on %s: %s", context["request"].path, exc)
        return busy_response()
    if isinstance(exc, DataError):
        return Response(
            {"detail": "A value is out of range for its field."},
            status=status.HTTP_400_BAD_REQUEST,
        )
    if isinstance(exc, DjangoValidationError):
        return Response({"detail": exc.messages}, status=status.HTTP_400_BAD_REQUEST)
    return drf_exception_handler(exc, context)
