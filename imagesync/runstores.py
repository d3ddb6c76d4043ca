"""The run store and the run lock of a configuration: their TTLs follow ``time_out``.

Kept apart from :mod:`imagesync.sync`, which starts runs (inventory, planning,
SSH), so that a process that only reads or ends runs (``imagesync history``,
``cancel``, the exporter) does not import all that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .budgets import stale_after
from .lock import RunLock
from .runs import RunStore

if TYPE_CHECKING:
    from redis import Redis

    from .config import Settings


def run_store(settings: Settings, redis: Redis) -> RunStore:
    ttl = stale_after(settings)
    return RunStore(redis, stale_after=ttl, lock_ttl=ttl, history=settings.history)


def run_lock(settings: Settings, redis: Redis) -> RunLock:
    return RunLock(redis, ttl=stale_after(settings))
