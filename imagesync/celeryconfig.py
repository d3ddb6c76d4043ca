"""Celery settings, derived from imagesync's configuration. Each says why it is set."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from celery.schedules import crontab

from .budgets import FINALIZE_EVERY, pull_time_limits
from .redisurl import celery_url

if TYPE_CHECKING:
    from .config import Settings

CONTROL_QUEUE = "imagesync"
#: the control worker's processes: runs (``sync``) and ``finalize`` keep two of them
#: whatever the backups do, which hold one at most (``tasks.BACKUPS_AT_ONCE``)
CONTROL_CONCURRENCY = 3


#: every node's queue is this, then the node's name
NODE_QUEUE_PREFIX = "node."


def node_queue(node: str) -> str:
    """Each node has its own queue, served by that node's worker alone."""
    return f"{NODE_QUEUE_PREFIX}{node}"


def schedule_of(settings: Settings):
    if isinstance(settings.schedule, int):
        return float(settings.schedule)
    minute, hour, day_of_month, month_of_year, day_of_week = settings.schedule.split()
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                   month_of_year=month_of_year, day_of_week=day_of_week)


def celery_settings(settings: Settings) -> dict[str, Any]:
    _, hard = pull_time_limits(settings)
    # The Redis transport redelivers any message unacknowledged for this long;
    # it must exceed the longest pull (plus a retry's countdown) or a long pull
    # is handed to a second worker while the first still runs it.
    visibility = hard + 300
    transport_options: dict[str, Any] = {"visibility_timeout": visibility}
    if settings.redis_master_name is not None:
        # Redis Sentinel (a sentinel:// redis_url): the master the sentinels know by this name
        transport_options["master_name"] = settings.redis_master_name
    conf: dict[str, Any] = {
        # a sentinel:// URL written so that kombu and the result backend read one database and login
        "broker_url": celery_url(settings.redis_url),
        "result_backend": celery_url(settings.redis_url),
        "broker_transport_options": transport_options,
        "result_backend_transport_options": transport_options,
        "visibility_timeout": visibility,
        "broker_connection_retry_on_startup": True,
        # A crontab schedule is read in this zone (the host's by default), the
        # zone the operator reads the logs in; Celery's own default is UTC.
        "timezone": settings.timezone,
        "enable_utc": True,
        # A pull survives a killed worker: acknowledged only once done,
        # requeued if the process running it dies. Safe because pulls are idempotent.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Take one message per free process, so a node never has more than
        # max_parallel pulls taken off its queue at once.
        "worker_prefetch_multiplier": 1,
        "task_default_queue": CONTROL_QUEUE,
        "task_create_missing_queues": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 24 * 3600,
        # Flower shows tasks live only when workers send events.
        "worker_send_task_events": True,
        # No task-sent event per queued message: it was half of the cost of sending a pull
        # (bench/README.md, fan-out). Flower shows a pull from the moment a worker receives
        # it; what is still queued is in the run record (imagesync history RUN) and the
        # exporter's queue lengths.
        "task_send_sent_event": False,
        "task_track_started": True,
        "beat_schedule": {
            "sync": {
                "task": "imagesync.sync",
                "schedule": schedule_of(settings),
                "kwargs": {"trigger": "beat"},
                # A trigger nobody picked up is worthless once the next one is due.
                "options": {"expires": 300},
            },
            "finalize-stale-runs": {
                "task": "imagesync.finalize",
                "schedule": FINALIZE_EVERY,
                "options": {"expires": FINALIZE_EVERY},
            },
        },
    }
    if settings.redis_url.startswith("rediss://") and "ssl_cert_reqs" not in settings.redis_url:
        # Celery refuses rediss:// without an explicit certificate policy.
        conf["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        conf["redis_backend_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return conf


def client_app(settings: Settings):  # type: ignore[no-untyped-def]
    """A Celery app that sends imagesync's tasks by name and reads their results, configured
    from ``settings`` as the workers' (:mod:`imagesync.celery`). For a command that only sends
    tasks: it reads the configuration once, as it already has, and imports no task module."""
    from celery import Celery

    app = Celery("imagesync", set_as_current=False)
    app.conf.update(celery_settings(settings))
    return app
