"""Integration tokens: hashed at rest, shown once, revocable; forged ones are refused."""

from __future__ import annotations

import hashlib
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from portal.api.models import ApiToken

pytestmark = pytest.mark.django_db


def _all_token_columns() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiToken._meta.db_table}")
        return [str(value) for row in cursor.fetchall() for value in row]


def test_a_token_is_stored_only_as_its_hash(integration_token_a):
    token = ApiToken.objects.get()
    assert token.key_hash == hashlib.sha256(integration_token_a.encode()).hexdigest()
    assert integration_token_a.startswith(token.prefix)
    assert not any(integration_token_a in value for value in _all_token_columns())


def test_a_valid_token_authenticates_and_records_its_use(api_client_for, integration_token_a):
    response = api_client_for(token=integration_token_a).get("/api/v1/auth/me")
    assert response.status_code == 200
    assert response.json()["username"] == "lis_a"
    assert ApiToken.objects.get().last_used_at is not None


def test_a_revoked_token_is_refused(api_client_for, integration_token_a):
    ApiToken.objects.get().revoke()
    response = api_client_for(token=integration_token_a).get("/api/v1/cases/")
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


@pytest.mark.parametrize(
    "header",
    ["Token lm_forged-token-value", "Token ", "Token a b", "Token \u00e9t\u00e9"],
)
def test_a_forged_or_malformed_token_is_refused(client, integration_token_a, header):
    response = client.get("/api/v1/cases/", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401


def test_a_token_of_a_disabled_user_is_refused(api_client_for, integration_a, integration_token_a):
    integration_a.is_active = False
    integration_a.save()
    assert api_client_for(token=integration_token_a).get("/api/v1/cases/").status_code == 401


def test_admin_creates_a_token_that_is_shown_once_then_revokes_it(
    api_client_for, admin_user, integration_a
):
    admin = api_client_for(admin_user)
    created = admin.post("/api/v1/tokens/", {"user": integration_a.pk, "name": "LIS"})
    assert created.status_code == 201
    raw = created.json()["token"]
    assert api_client_for(token=raw).get("/api/v1/cases/").status_code == 200
    listed = admin.get(f"/api/v1/tokens/{created.json()['id']}/").json()
    assert "token" not in listed and listed["prefix"] == raw[:11]
    assert admin.post(f"/api/v1/tokens/{listed['id']}/revoke/").json()["revoked_at"]
    assert api_client_for(token=raw).get("/api/v1/cases/").status_code == 401


def test_create_token_command_prints_a_working_token(api_client_for, integration_a):
    out, err = StringIO(), StringIO()
    call_command("create_token", "lis_a", "--name", "LIS", stdout=out, stderr=err)
    raw = out.getvalue().strip()
    assert "shown only now" in err.getvalue()
    assert api_client_for(token=raw).get("/api/v1/auth/me").json()["username"] == "lis_a"


def test_create_token_for_an_unknown_user_fails_clearly(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no user named"):
        call_command("create_token", "nobody")
