"""No password or token can be guessed: wrong ones lock the account (or slow the client)
after a few tries, on every way in, and every failure is audited."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from portal.reviews.models import AuditEvent, Diagnosis
from tests.portal_fixtures import PASSWORD

LIMIT = 10


def _assert_locked_and_audited(username: str, last) -> None:
    assert last.status_code == 429, last.content[:300]
    assert "locked" in last.json()["detail"]
    assert int(last["Retry-After"]) > 0
    failed = AuditEvent.objects.filter(action="auth.login_failed")
    assert failed.count() >= LIMIT - 1
    assert {e.details["username"] for e in failed} == {username}
    assert AuditEvent.objects.filter(action="auth.locked_out").exists()


def test_ten_wrong_api_logins_lock_the_account_and_are_audited(path_a):
    client = APIClient()
    answers = [
        client.post("/api/v1/auth/login", {"username": "path_a", "password": f"guess{i}"})
        for i in range(LIMIT)
    ]
    assert [a.status_code for a in answers[: LIMIT - 1]] == [400] * (LIMIT - 1)
    _assert_locked_and_audited("path_a", answers[-1])
    right = client.post("/api/v1/auth/login", {"username": "path_a", "password": PASSWORD})
    assert right.status_code == 429  # even the right password, until the lock expires


@pytest.mark.parametrize("url", ["/login/", "/admin/login/"])
def test_ten_wrong_page_and_admin_logins_lock_the_account(client, admin_user, url):
    for i in range(LIMIT):
        last = client.post(url, {"username": "admin", "password": f"guess{i}"})
    _assert_locked_and_audited("admin", last)
    assert client.post(url, {"username": "admin", "password": PASSWORD}).status_code == 429


def test_ten_wrong_signing_passwords_lock_the_signer(api_client_for, path_a, case_a):
    draft = Diagnosis.objects.create(case=case_a, author=path_a, call="tumor")
    client = api_client_for(path_a)
    url = f"/api/v1/diagnoses/{draft.pk}/sign/"
    answers = [client.post(url, {"password": f"guess{i}"}, format="json") for i in range(LIMIT)]
    assert answers[0].status_code == 403
    _assert_locked_and_audited("path_a", answers[-1])
    assert client.post(url, {"password": PASSWORD}, format="json").status_code == 429
    draft.refresh_from_db()
    assert draft.status == Diagnosis.DRAFT


def test_wrong_tokens_are_throttled_and_audited(db, integration_token_a):
    client = APIClient()
    codes = []
    for i in range(25):
        client.credentials(HTTP_AUTHORIZATION=f"Token wrong-{i}")
        codes.append(client.get("/api/v1/cases/").status_code)
    assert codes[:20] == [401] * 20
    assert codes[20:] == [429] * 5
    assert AuditEvent.objects.filter(action="auth.token_failed").count() == 20


def test_api_login_needs_the_csrf_token(path_a):
    client = APIClient(enforce_csrf_checks=True)
    body = {"username": "path_a", "password": PASSWORD}
    foreign = client.post("/api/v1/auth/login", body, HTTP_ORIGIN="https://evil.example")
    assert foreign.status_code == 403
    assert "CSRF" in foreign.json()["detail"]
    client.get("/api/v1/auth/login")
    token = client.cookies["csrftoken"].value
    assert client.post("/api/v1/auth/login", body, HTTP_X_CSRFTOKEN=token).status_code == 200
