"""ASGI entry point (served by ``python -m portal.web``): HTTP through the tile fast path and
Django, websockets through Channels."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from portal.viewer.fastpath import TileFastPath  # noqa: E402
from portal.viewer.routing import websocket_urlpatterns  # noqa: E402

FULL_COLLECTION_AFTER = 1000  # middle-generation passes before a full one (Python: 10)


def _freeze_startup_heap() -> None:
    """Keep the start-up heap out of the garbage collector's full passes, and those rare.

    A full collection walks every tracked object: with Django, the URL conf and the libraries
    loaded (~10^5 objects) it took ~170 ms on a 2-core machine, and it ran every few thousand
    tile requests: the ~1% of tiles that stalled for ~0.2 s. Those objects live as long as the
    process, so they are imported now and frozen (``gc.freeze``) out of the collector's reach.

    What is left for a full pass is the server's own live objects. Under daphne, which kept
    every finished request (~20 objects each) until a sweep once a second, that was ~10^5
    objects at a few thousand tiles/s, walked for 20-120 ms 1-2 times a second and none
    freed (reference counting frees them). The server is uvicorn now, but a busy process
    still has many live request objects between collections, so after
    ``FULL_COLLECTION_AFTER`` middle passes, not 10, a full pass runs about once a minute at
    full load. Young passes, which free short-lived cycles, are unchanged.
    """
    import gc

    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - imports every view module now
    import portal.viewer.tileservice  # noqa: F401

    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)


_freeze_startup_heap()

application = ProtocolTypeRouter(
    {
        "http": TileFastPath(django_asgi_app),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
