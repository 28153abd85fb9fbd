"""Webhooks: HMAC-signed deliveries to a real local receiver, retries with backoff, the API."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.management import call_command
from django.utils import timezone

from portal.integrations.models import Webhook, WebhookDelivery
from portal.integrations.webhooks import MAX_ATTEMPTS, deliver_due, emit, verify

WEBHOOKS = "/api/v1/integrations/webhooks/"


@pytest.fixture(autouse=True)
def _local_receivers_allowed(settings):
    """The test receivers listen on loopback, which only an admin's allow-list permits."""
    settings.LOWMAG_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST and answers ``status``."""

    def __init__(self, port: int = 0, status: int = 200) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"nope" if status >= 300 else b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_hook(owner, cohort, url: str, events=("diagnosis.signed",), active=True) -> Webhook:
    return Webhook.objects.create(
        owner=owner, cohort=cohort, url=url, events=list(events), active=active
    )


def assert_signed(hook: Webhook, headers: dict, body: bytes) -> None:
    timestamp = headers["X-LowMag-Timestamp"]
    expected = hmac.new(
        hook.secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    assert headers["X-LowMag-Signature"] == f"sha256={expected}"
    assert verify(hook.secret, timestamp, body, headers["X-LowMag-Signature"])
    assert not verify(hook.secret, timestamp, body + b" ", headers["X-LowMag-Signature"])


# -- delivery ----------------------------------------------------------------------------------


def test_receiver_gets_a_signed_delivery(
    integration_a, cohort_a, django_capture_on_commit_callbacks
):
    with Receiver() as receiver:
        hook = make_hook(integration_a, cohort_a, receiver.url)
        with django_capture_on_commit_callbacks(execute=True):
            (delivery,) = emit("diagnosis.signed", cohort_a, {"case": 7, "call": "tumor"})
    assert len(receiver.received) == 1
    headers, body = receiver.received[0]
    assert_signed(hook, headers, body)
    assert headers["X-LowMag-Event"] == "diagnosis.signed"
    assert headers["X-LowMag-Delivery"] == str(delivery.pk)
    envelope = json.loads(body)
    assert envelope["data"] == {"case": 7, "call": "tumor"}
    assert (envelope["event"], envelope["cohort"], envelope["id"]) == (
        "diagnosis.signed",
        "cohort-a",
        delivery.pk,
    )
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 1, 200)


def test_deliveries_wait_while_the_receiver_is_down_and_arrive_once_it_is_back(
    integration_a, cohort_a, django_capture_on_commit_callbacks
):
    port = free_port()
    hook = make_hook(integration_a, cohort_a, f"http://127.0.0.1:{port}/hook")
    t0 = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        (delivery,) = emit("diagnosis.signed", cohort_a, {"case": 1})
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert delivery.last_error == "could not deliver (ConnectionRefusedError)"
    assert deliver_due(now=t0 + timedelta(seconds=30)) == {}  # backoff: not due yet
    assert deliver_due(now=t0 + timedelta(minutes=5)) == {"pending": 1}
    delivery.refresh_from_db()
    assert delivery.attempts == 2
    assert delivery.next_attempt_at == t0 + timedelta(minutes=5) + timedelta(minutes=2)
    with Receiver(port=port) as receiver:
        assert deliver_due(now=t0 + timedelta(hours=1)) == {"delivered": 1}
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("delivered", 3, "")
    assert len(receiver.received) == 1
    assert_signed(hook, *receiver.received[0])


def test_delivery_fails_for_good_after_the_last_attempt(integration_a, cohort_a):
    with Receiver(status=500) as receiver:
        make_hook(integration_a, cohort_a, receiver.url)
        (delivery,) = emit("diagnosis.signed", cohort_a, {"case": 1})  # not committed: not sent
        now = timezone.now()
        for _ in range(MAX_ATTEMPTS):
            now += timedelta(hours=7)
            deliver_due(now=now)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("failed", MAX_ATTEMPTS)
    assert (delivery.last_status_code, delivery.last_error) == (500, "HTTP 500")  # no body
    assert len(receiver.received) == MAX_ATTEMPTS
    assert deliver_due(now=now + timedelta(days=1)) == {}


def test_emit_reaches_only_active_subscribed_webhooks_of_entitled_owners(
    integration_a, path_a, admin_user, cohort_a, cohort_b
):
    url = "http://127.0.0.1:9/hook"
    wanted = make_hook(integration_a, cohort_a, url)
    make_hook(admin_user, cohort_a, url, events=["prediction.ready"])
    make_hook(integration_a, cohort_a, url, active=False)
    make_hook(integration_a, cohort_b, url)  # no longer a member of cohort B
    make_hook(path_a, cohort_a, url)  # pathologists do not receive integration events
    make_hook(admin_user, cohort_b, url)  # another cohort
    deliveries = emit("diagnosis.signed", cohort_a, {"case": 1})
    assert [d.webhook for d in deliveries] == [wanted]


def test_unknown_event_is_refused(cohort_a):
    with pytest.raises(ValueError, match="unknown webhook event"):
        emit("slide.exploded", cohort_a, {})


def test_deliver_webhooks_command_sends_what_is_due(integration_a, cohort_a):
    with Receiver() as receiver:
        make_hook(integration_a, cohort_a, receiver.url, events=["prediction.ready"])
        emit("prediction.ready", cohort_a, {"slide": 3})
        out = _run_command()
    assert out.strip() == "1 delivered"
    assert len(receiver.received) == 1
    assert WebhookDelivery.objects.get().status == "delivered"


def _run_command() -> str:
    from io import StringIO

    buffer = StringIO()
    call_command("deliver_webhooks", stdout=buffer)
    return buffer.getvalue()


# -- API ---------------------------------------------------------------------------------------


def test_creation_shows_the_secret_once(
    api_client_for, integration_a, integration_token_a, cohort_a
):
    client = api_client_for(integration_a, token=integration_token_a)
    response = client.post(
        WEBHOOKS,
        {
            "cohort": cohort_a.pk,
            "url": "https://lis.example.org/hook",
            "events": ["diagnosis.signed"],
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    secret = response.json()["secret"]
    assert secret.startswith("whsec_") and Webhook.objects.get().secret == secret
    listed = client.get(WEBHOOKS).json()["results"]
    assert [h["url"] for h in listed] == ["https://lis.example.org/hook"]
    assert "secret" not in listed[0]
    assert "secret" not in client.get(f"{WEBHOOKS}{listed[0]['id']}/").json()


@pytest.mark.parametrize("url", ["ftp://lis.example.org/hook", "file:///etc/passwd"])
def test_only_http_urls_are_accepted(api_client_for, integration_a, cohort_a, url):
    response = api_client_for(integration_a).post(
        WEBHOOKS, {"cohort": cohort_a.pk, "url": url, "events": ["diagnosis.signed"]}, format="json"
    )
    assert response.status_code == 400
    assert "url" in response.json()


def test_unknown_events_are_refused_by_the_api(api_client_for, integration_a, cohort_a):
    response = api_client_for(integration_a).post(
        WEBHOOKS,
        {"cohort": cohort_a.pk, "url": "https://x.example.org/", "events": ["case.deleted"]},
        format="json",
    )
    assert response.status_code == 400
    assert "events" in response.json()


def test_pathologists_cannot_create_webhooks(api_client_for, path_a, cohort_a):
    response = api_client_for(path_a).post(
        WEBHOOKS,
        {"cohort": cohort_a.pk, "url": "https://x.example.org/", "events": ["diagnosis.signed"]},
        format="json",
    )
    assert response.status_code == 400
    assert "cohort" in response.json()
    assert not Webhook.objects.exists()


def test_other_users_cannot_see_or_delete_a_webhook(
    api_client_for, integration_a, admin_user, path_b, cohort_a
):
    hook = make_hook(integration_a, cohort_a, "https://x.example.org/")
    for user in (admin_user, path_b):
        client = api_client_for(user)
        assert client.get(f"{WEBHOOKS}{hook.pk}/").status_code == 404
        assert client.get(f"{WEBHOOKS}{hook.pk}/deliveries/").status_code == 404
        assert client.delete(f"{WEBHOOKS}{hook.pk}/").status_code == 404
        assert client.get(WEBHOOKS).json()["results"] == []
    assert api_client_for(None).get(WEBHOOKS).status_code == 401
    assert Webhook.objects.filter(pk=hook.pk).exists()


def test_owner_reads_the_delivery_log_and_deletes_the_webhook(
    api_client_for, integration_a, cohort_a
):
    hook = make_hook(integration_a, cohort_a, "http://127.0.0.1:9/hook")
    emit("diagnosis.signed", cohort_a, {"case": 1})
    client = api_client_for(integration_a)
    log = client.get(f"{WEBHOOKS}{hook.pk}/deliveries/").json()["results"]
    assert [(d["event"], d["status"], d["attempts"]) for d in log] == [
        ("diagnosis.signed", "pending", 0)
    ]
    assert client.delete(f"{WEBHOOKS}{hook.pk}/").status_code == 204
    assert not WebhookDelivery.objects.exists()


# -- where webhooks may go ---------------------------------------------------------------------

INTERNAL_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://10.0.0.1/hook",
    "http://localhost:5432/",
    "http://127.0.0.1:6379/",
    "http://[::1]/hook",
    "http://0.0.0.0/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://192.168.1.10/hook",
]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_internal_addresses_are_refused_at_registration(
    settings, api_client_for, integration_a, cohort_a, url
):
    settings.LOWMAG_WEBHOOK_ALLOWED_HOSTS = []
    response = api_client_for(integration_a).post(
        WEBHOOKS, {"cohort": cohort_a.pk, "url": url, "events": ["diagnosis.signed"]}, format="json"
    )
    assert response.status_code == 400
    assert "url" in response.json()
    assert not Webhook.objects.exists()


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_a_stored_internal_address_is_refused_at_delivery_without_retrying(
    settings, integration_a, cohort_a, url
):
    settings.LOWMAG_WEBHOOK_ALLOWED_HOSTS = []
    make_hook(integration_a, cohort_a, url)
    emit("diagnosis.signed", cohort_a, {"case": 1})
    assert deliver_due() == {"failed": 1}
    delivery = WebhookDelivery.objects.get()
    assert delivery.last_error.startswith("refused: ")
    assert delivery.attempts == 1


def test_an_admin_allow_list_permits_a_named_internal_receiver(
    settings, api_client_for, integration_a, cohort_a
):
    settings.LOWMAG_WEBHOOK_ALLOWED_HOSTS = ["10.20.0.0/16"]
    client = api_client_for(integration_a)
    body = {"cohort": cohort_a.pk, "events": ["diagnosis.signed"]}
    assert client.post(WEBHOOKS, {**body, "url": "http://10.20.3.4/h"}).status_code == 201
    assert client.post(WEBHOOKS, {**body, "url": "http://10.21.3.4/h"}).status_code == 400


class TricklingReceiver:
    """Answers a status line, then one header byte every 0.2 s for ``seconds``."""

    def __init__(self, seconds: float = 20.0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.seconds = seconds
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn) -> None:
        with conn:
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(int(self.seconds / 0.2)):
                    if self.stop.wait(0.2):
                        return
                    conn.sendall(b"a")
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_trickling_receiver_does_not_hold_the_amend_request(
    settings, api_client_for, integration_a, path_a, case_a, django_capture_on_commit_callbacks
):
    import time

    from portal.reviews import signing
    from portal.reviews.models import Diagnosis
    from tests.portal_fixtures import PASSWORD

    settings.LOWMAG_TASK_MODE = "celery"  # deliveries go to the cpu queue (no worker here)
    receiver = TricklingReceiver()
    try:
        make_hook(integration_a, case_a.cohort, receiver.url, events=["diagnosis.amended"])
        draft = Diagnosis.objects.create(case=case_a, author=path_a, call="tumor")
        signing.sign(draft, path_a)
        started = time.monotonic()
        with django_capture_on_commit_callbacks(execute=True):
            response = api_client_for(path_a).post(
                f"/api/v1/diagnoses/{draft.pk}/amend/",
                {"password": PASSWORD, "reason": "re-read"},
                format="json",
            )
        elapsed = time.monotonic() - started
    finally:
        receiver.close()
    assert response.status_code == 201
    assert elapsed < 1.0
    assert WebhookDelivery.objects.get().status == "pending"  # in the outbox


def test_a_delivery_gives_up_after_the_total_time_limit(monkeypatch, integration_a, cohort_a):
    import time

    from portal.integrations import webhooks

    monkeypatch.setattr(webhooks, "TOTAL_TIMEOUT_S", 1.0)
    receiver = TricklingReceiver()
    try:
        make_hook(integration_a, cohort_a, receiver.url)
        emit("diagnosis.signed", cohort_a, {"case": 1})
        started = time.monotonic()
        assert deliver_due() == {"pending": 1}
        elapsed = time.monotonic() - started
    finally:
        receiver.close()
    assert elapsed < 3.0
    assert WebhookDelivery.objects.get().last_error == "no answer within 1 s"
