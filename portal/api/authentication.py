"""``Authorization: Token <raw>`` for integrations; the raw token is hashed and looked up."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from portal.api.models import ApiToken, hash_token
from portal.reviews import audit

# last_used_at is written at most this often per token, so reads stay reads.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Token"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed(
                "Malformed Authorization header: expected 'Token <token>'."
            )
        try:
            raw = header[1].decode("ascii")
        except UnicodeDecodeError as exc:
            raise exceptions.AuthenticationFailed("The token contains invalid characters.") from exc
        return self.authenticate_or_throttle(request, raw)

    def authenticate_or_throttle(self, request, raw: str):
        try:
            return self._authenticate_raw(raw)
        except exceptions.AuthenticationFailed:
            self._count_wrong_token(request)
            raise

    @staticmethod
    def _count_wrong_token(request) -> None:
        from portal.core.throttle import WrongTokenThrottle

        throttle = WrongTokenThrottle()
        # No view exists yet while authenticating; WrongTokenThrottle never reads it.
        if not throttle.allow_request(request, None):  # type: ignore[arg-type]
            raise exceptions.Throttled(
                throttle.wait(), "Too many wrong tokens from this address; wait and retry."
            )
        audit.record(None, "auth.token_failed", request=request)

    def _authenticate_raw(self, raw: str):
        token = ApiToken.objects.select_related("user").filter(key_hash=hash_token(raw)).first()
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        if token.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This token has been revoked.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("The token's user account is disabled.")
        now = timezone.now()
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def authenticate_header(self, request) -> str:
        return self.keyword


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "portal.api.authentication.ApiTokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": 'Integration token, sent as "Token <token>".',
        }
