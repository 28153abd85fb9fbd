"""Websocket ``/ws/training/<run id>/``: a training run's stage and progress, live (admins)."""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from portal.cases.access import is_admin


@database_sync_to_async
def _snapshot(user, run_id: int) -> dict | None:
    from portal.analyses.models import TrainingRun

    if not is_admin(user):
        return None
    run = TrainingRun.objects.filter(pk=run_id).first()
    if run is None:
        return None
    return {"run": run.pk, "state": run.state, "stage": run.stage, "progress": run.progress}


class TrainingProgressConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        snapshot = None
        if user is not None and user.is_authenticated:
            snapshot = await _snapshot(user, run_id)
        if snapshot is None:
            await self.close(code=4404)
            return
        self.group = f"training.{run_id}"
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "training.snapshot", **snapshot})

    async def disconnect(self, code):
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def training_update(self, event):
        await self.send_json(event)
