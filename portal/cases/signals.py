"""Domain events of the case app, for apps above it to react to without being imported.

``slide_ready``: ingest has read a new slide and it can be viewed and analysed
(``sender=Slide``, ``slide=``). Sent inside the request or task that ingested it; receivers
that queue work do so with ``portal.core.dispatch`` (after the transaction commits).
"""

from __future__ import annotations

from django.dispatch import Signal

slide_ready = Signal()
