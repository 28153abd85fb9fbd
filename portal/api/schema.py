"""The OpenAPI schema's error answers: what each operation can answer besides its success.

``AutoSchema`` (``REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]``) adds to every operation the
answers that the shared machinery gives whatever the view:

- 401 and 403 when the view needs a signed-in user (no credentials; a role or CSRF refusal),
  429 with ``Retry-After`` when it takes a token (the wrong-token throttle),
  503 with ``Retry-After`` everywhere (a database still locked, ``portal.core.middleware``);
- 400 when the operation reads a request body or query parameters it validates;
- 409 on every write (POST, PUT, PATCH, DELETE): the database refuses a duplicate or an orphan
  (``IntegrityError``, a write racing another) or a frozen row, whatever the view checked;
- 404 when it names an object in its path (objects of other cohorts answer 404 too) or pages
  through a list (a page past the last).

What only some operations answer (412, 413, 428, a lockout's 429, a 409 of the view's own
rules) the view declares where it raises it: ``error_responses = {action: {code: why}}`` on a
viewset, or the error codes of ``extend_schema(responses=...)``. Every error answer gets one of
two bodies, the shapes ``portal.api.exceptions`` produces: ``Error`` (``{"detail": "..."}``),
and for 400 ``ValidationError`` (``{field: [messages]}``, or ``{"detail": ...}`` when no one
field is at fault).
"""

from __future__ import annotations

from drf_spectacular import openapi
from drf_spectacular.plumbing import ResolvedComponent
from rest_framework.permissions import AllowAny

from portal.api.authentication import ApiTokenAuthentication

ERROR_SCHEMA = {
    "type": "object",
    "description": "Why the request was refused, in words a person can act on.",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
    "additionalProperties": False,
}
MESSAGES = {"type": "array", "items": {"type": "string"}}
VALIDATION_ERROR_SCHEMA = {
    "type": "object",
    "description": "What is invalid: {field: [messages]} (nested fields: {field: {...}}), "
    'or {"detail": message} when no one field is at fault.',
    "properties": {"detail": {"oneOf": [{"type": "string"}, MESSAGES]}},
    "additionalProperties": {
        "oneOf": [{"type": "string"}, {"type": "array"}, {"type": "object"}],
    },
    "minProperties": 1,
}
RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer", "minimum": 0},
        "description": "Seconds to wait before retrying.",
    }
}

INVALID = "Invalid input: what is wrong, field by field."
NOT_SIGNED_IN = "No valid credentials: sign in, or send 'Authorization: Token <token>'."
FORBIDDEN = (
    "Signed in, but not allowed: your role in the cohort (or admin rights) does not cover this, "
    "or a session request lacks its CSRF token."
)
NOT_FOUND = "No such object among your cohorts' (objects of other cohorts answer 404 too)."
NO_SUCH_PAGE = "No such page: the page number is past the last page."
WRONG_TOKENS = "Too many wrong tokens from this address; retry after Retry-After seconds."
BUSY = "The database is busy with other writes; retry after Retry-After seconds."
CLASH = (
    "The database refused the write: it would duplicate or orphan a record, or change a frozen "
    "one (often a request racing another); reload and try again."
)
GENERIC = {
    400: INVALID,
    401: NOT_SIGNED_IN,
    403: FORBIDDEN,
    404: NOT_FOUND,
    409: "The request conflicts with the object's current state.",
    412: "The object changed since you read it (If-Match); reload it and apply your change again.",
    413: "The upload is larger than allowed.",
    428: "Send the row version you read (If-Match or row_version).",
    429: "Too many attempts; retry after Retry-After seconds.",
    503: BUSY,
}
UNVALIDATED_QUERY = frozenset({"page", "page_size", "search", "ordering", "format"})


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's schema, with each operation's error answers and their shared body."""

    def _get_response_bodies(self, direction: openapi.Direction = "response") -> dict:
        responses = super()._get_response_bodies(direction)
        for code, description in self._error_answers().items():
            answer = responses.setdefault(str(code), {})
            if not answer.get("description"):
                answer["description"] = description
        for status, answer in responses.items():
            if int(status) >= 400:
                self._with_error_body(int(status), answer)
        return dict(sorted(responses.items()))

    def _error_answers(self) -> dict[int, str]:
        """{status code: why} for this operation: the shared machinery's, then the view's own."""
        answers = {503: BUSY}
        if self._needs_sign_in():
            answers |= {401: NOT_SIGNED_IN, 403: FORBIDDEN}
        if ApiTokenAuthentication in self.view.authentication_classes:
            answers[429] = WRONG_TOKENS
        if self._reads_input():
            answers[400] = INVALID
        if self.method not in ("GET", "HEAD", "OPTIONS"):
            answers[409] = CLASH
        if "{" in self.path:
            answers[404] = NOT_FOUND
        elif self._pages():
            answers[404] = NO_SUCH_PAGE
        declared = getattr(self.view, "error_responses", {}).get(self._action_name(), {})
        return answers | declared

    def _with_error_body(self, code: int, answer: dict) -> None:
        name, schema = (
            ("ValidationError", VALIDATION_ERROR_SCHEMA) if code == 400 else ("Error", ERROR_SCHEMA)
        )
        component = ResolvedComponent(
            name=name, type=ResolvedComponent.SCHEMA, object=name, schema=schema
        )
        self.registry.register_on_missing(component)
        answer["content"] = {"application/json": {"schema": component.ref}}
        if not answer.get("description"):
            answer["description"] = GENERIC.get(code, "Refused.")
        if code in (429, 503):
            answer["headers"] = {**answer.get("headers", {}), **RETRY_AFTER}

    def _action_name(self) -> str:
        return getattr(self.view, "action", None) or self.method.lower()

    def _needs_sign_in(self) -> bool:
        return not any(isinstance(p, AllowAny) for p in self.view.get_permissions())

    def _reads_input(self) -> bool:
        if self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None:
            return True
        query = {
            p["name"] for p in self._get_parameters() if p["in"] == "query"
        } - UNVALIDATED_QUERY
        return bool(query)

    def _pages(self) -> bool:
        return self.method == "GET" and self._is_list_view() and self._get_paginator() is not None
