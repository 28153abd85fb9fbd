from django.urls import path

from portal.analyses.consumers import TrainingProgressConsumer
from portal.viewer import consumers

websocket_urlpatterns = [
    path("ws/jobs/<int:job_id>/", consumers.JobProgressConsumer.as_asgi()),
    path("ws/worklist/", consumers.WorklistConsumer.as_asgi()),
    path("ws/training/<int:run_id>/", TrainingProgressConsumer.as_asgi()),
]
