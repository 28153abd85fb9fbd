"""A training run's stage and progress reach admins over a websocket, live."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator

from portal.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


def _headers(user) -> list[tuple[bytes, bytes]]:
    from django.test import Client

    client = Client()
    client.force_login(user)
    session = client.cookies["sessionid"].value
    return [(b"cookie", f"sessionid={session}".encode()), (b"origin", b"http://testserver")]


def test_training_progress_reaches_admins_only(admin_user, path_a, cohort_a):
    from django.utils import timezone

    from portal.analyses.models import TrainingRun
    from portal.analyses.training import _Progress, run_training

    today = timezone.localdate()
    run = TrainingRun.objects.create(
        cohort=cohort_a, signed_from=today, signed_to=today, created_by=admin_user
    )

    async def scenario():
        refused = WebsocketCommunicator(
            application, f"/ws/training/{run.pk}/", headers=_headers(path_a)
        )
        connected, _ = await refused.connect(timeout=5)
        assert not connected
        communicator = WebsocketCommunicator(
            application, f"/ws/training/{run.pk}/", headers=_headers(admin_user)
        )
        connected, _ = await communicator.connect(timeout=5)
        assert connected
        snapshot = await communicator.receive_json_from(timeout=5)
        assert snapshot["type"] == "training.snapshot" and snapshot["state"] == "queued"
        await sync_to_async(_Progress(run))("features", 0.0)
        update = await communicator.receive_json_from(timeout=5)
        assert (update["stage"], update["progress"]) == ("features", 0.0)
        # the cohort has no signed cases: the run fails and says so, live
        assert await sync_to_async(run_training)(run.pk) == "failed"
        final = await communicator.receive_json_from(timeout=5)
        assert final["state"] == "failed" and "no usable signed cases" in final["error"]
        await communicator.disconnect()

    async_to_sync(scenario)()
