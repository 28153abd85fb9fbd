"""Websockets: an analysis job's progress and a pathologist's worklist, authenticated by session."""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from portal.cases.access import visible


@database_sync_to_async
def _job_visible(user, job_id: int) -> dict | None:
    from portal.analyses.models import AnalysisJob

    job = visible(AnalysisJob.objects.all(), user, "slide__case__cohort").filter(pk=job_id).first()
    if job is None:
        return None
    return {"job": job.pk, "state": job.state, "stage": job.stage, "progress": job.progress}


@database_sync_to_async
def _cohort_ids(user) -> list[int]:
    from portal.cases.models import Cohort

    return list(visible(Cohort.objects.all(), user, "pk").values_list("pk", flat=True))


class JobProgressConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        job_id = int(self.scope["url_route"]["kwargs"]["job_id"])
        snapshot = None
        if user is not None and user.is_authenticated:
            snapshot = await _job_visible(user, job_id)
        if snapshot is None:
            await self.close(code=4404)
            return
        self.group = f"job.{job_id}"
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "job.snapshot", **snapshot})

    async def disconnect(self, code):
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def job_update(self, event):
        await self.send_json(event)


class WorklistConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.groups_joined = [f"cohort.{pk}" for pk in await _cohort_ids(user)]
        for group in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "worklist.hello", "cohorts": len(self.groups_joined)})

    async def disconnect(self, code):
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def worklist_update(self, event):
        await self.send_json(event)
