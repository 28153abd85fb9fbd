"""Websockets: job progress and worklist updates, authenticated by the session cookie."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from portal.asgi import application
from tests.portal_fixtures import make_prediction

pytestmark = pytest.mark.django_db(transaction=True)


def _headers(client, user) -> list[tuple[bytes, bytes]]:
    from django.test import Client

    client = Client()  # one session per user
    client.force_login(user)
    session = client.cookies["sessionid"].value
    return [(b"cookie", f"sessionid={session}".encode()), (b"origin", b"http://testserver")]


async def _connect(path: str, headers):
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    return communicator, connected


def test_job_progress_reaches_a_member_of_the_cohort(client, path_a, slide_a, model_version):
    from portal.analyses import progress

    job = make_prediction(slide_a, model_version).job
    headers = _headers(client, path_a)

    async def scenario():
        communicator, connected = await _connect(f"/ws/jobs/{job.pk}/", headers)
        assert connected
        snapshot = await communicator.receive_json_from(timeout=5)
        assert snapshot["type"] == "job.snapshot" and snapshot["state"] == "succeeded"
        await communicator.send_json_to({"ignored": True})
        from asgiref.sync import sync_to_async

        await sync_to_async(progress.job_update)(job.pk, {"stage": "features", "progress": 0.5})
        update = await communicator.receive_json_from(timeout=5)
        assert update["stage"] == "features" and update["progress"] == 0.5
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_job_progress_is_refused_to_another_cohort_and_to_anonymous(
    client, path_b, slide_a, model_version
):
    job = make_prediction(slide_a, model_version).job
    headers = _headers(client, path_b)

    async def scenario():
        _, connected = await _connect(f"/ws/jobs/{job.pk}/", headers)
        assert not connected
        _, connected = await _connect(f"/ws/jobs/{job.pk}/", [(b"origin", b"http://testserver")])
        assert not connected

    async_to_sync(scenario)()


def test_worklist_updates_reach_only_the_cohorts_members(client, path_a, path_b, case_a):
    from asgiref.sync import sync_to_async

    from portal.analyses import progress

    headers_a = _headers(client, path_a)
    headers_b = _headers(client, path_b)

    async def scenario():
        member, connected_a = await _connect("/ws/worklist/", headers_a)
        outsider, connected_b = await _connect("/ws/worklist/", headers_b)
        assert connected_a and connected_b
        assert (await member.receive_json_from(timeout=5))["cohorts"] == 1
        await outsider.receive_json_from(timeout=5)
        await sync_to_async(progress.worklist_update)(case_a)
        update = await member.receive_json_from(timeout=5)
        assert update == {"type": "worklist.update", "case": case_a.pk, "status": case_a.status}
        assert await outsider.receive_nothing(timeout=0.5)
        await member.disconnect()
        await outsider.disconnect()

    async_to_sync(scenario)()


def test_a_foreign_origin_cannot_open_a_websocket(client, path_a, case_a):
    headers = [h for h in _headers(client, path_a) if h[0] != b"origin"]
    headers.append((b"origin", b"http://evil.example"))

    async def scenario():
        _, connected = await _connect("/ws/worklist/", headers)
        assert not connected

    async_to_sync(scenario)()
