"""Send a Celery task to where it runs, after the current transaction commits.

``LOWMAG_TASK_MODE``:
- ``celery``: the Redis broker and real workers (production; the default with REDIS_URL);
- ``thread``: the embedded default: the same task code run by one background thread of
  this process (``task.apply``: retries and failure handling behave as in a worker);
- ``sync``: run at once in the caller's thread (management commands, most tests).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import close_old_connections, transaction

log = logging.getLogger(__name__)
_executor: ThreadPoolExecutor | None = None


def task_mode() -> str:
    mode = getattr(settings, "LOWMAG_TASK_MODE", "")
    if mode:
        return mode
    return "celery" if settings.REDIS_URL else "thread"


def _run_in_thread(task, args, kwargs) -> None:
    close_old_connections()
    try:
        task.apply(args=args, kwargs=kwargs, throw=False)
    except Exception:  # noqa: BLE001 - a background failure is logged, never crashes the server
        log.exception("embedded worker: task %s failed", task.name)
    finally:
        close_old_connections()


def _executor_instance() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowmag-worker")
    return _executor


def dispatch(task, *args, **kwargs) -> None:
    mode = task_mode()
    if mode == "sync":
        transaction.on_commit(lambda: task.apply(args=args, kwargs=kwargs, throw=False))
    elif mode == "thread":
        transaction.on_commit(
            lambda: _executor_instance().submit(_run_in_thread, task, args, kwargs)
        )
    else:
        transaction.on_commit(lambda: task.apply_async(args=args, kwargs=kwargs))
