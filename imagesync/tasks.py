"""Celery tasks: thin shells with explicit names and plain arguments.

``imagesync.sync`` runs on the control queue; ``imagesync.pull`` runs on the
queue of the node it pulls onto (``node.<name>``), served by that node's own
worker, whose concurrency is ``max_parallel``.
"""

from __future__ import annotations

import json
import logging
import os
import random

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import after_setup_logger, task_revoked
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import logs
from .celery import app, refuse, settings
from .celeryconfig import SYNC_TIME_LIMIT, node_queue, pull_time_limits
from .errors import ConfigError
from .pulls import pull_image
from .runs import EXPIRED, FAILED, RUNNING, SKIPPED, TIMED_OUT, Outcome
from .sync import finalize_stale, finish_pull, run_store, start_run

log = logging.getLogger("imagesync")

PULL_SOFT_LIMIT, PULL_HARD_LIMIT = pull_time_limits(settings)
#: retry backoff: base seconds, doubled per attempt, capped, with jitter
BACKOFF_BASE, BACKOFF_CAP = 2.0, 60.0

#: how a worker's Redis client rides out a Redis restart: 0.25, 0.5, 1, then 2 s
#: between attempts, about 12 s in all
REDIS_RETRY = Retry(ExponentialBackoff(cap=2.0, base=0.25), retries=8)

_redis: dict[int, Redis] = {}


def redis() -> Redis:
    """This process's Redis client (a forked child makes its own).

    A pull that ends while Redis restarts must still report, or its run loses
    the outcome and ends abandoned; redis-py's default retries give up within
    a second or two, so this client retries for longer. Recording an outcome
    twice is harmless (the run counts each pull once).
    """
    client = _redis.get(os.getpid())
    if client is None:
        client = _redis[os.getpid()] = Redis.from_url(
            settings.redis_url, health_check_interval=30, retry=REDIS_RETRY
        )
    return client


def backoff(retries: int) -> float:
    """Bounded exponential backoff with full jitter around the nominal delay."""
    nominal = min(BACKOFF_CAP, BACKOFF_BASE * 2**retries)
    return round(nominal * random.uniform(0.5, 1.5), 2)


def send_pull(node: str, image: str, run_id: str, expires: float) -> None:
    # argsrepr (shown by Flower) is the exact JSON of the arguments: the
    # handler of an expired pull reads them back from it (see below).
    args = (run_id, node, image)
    pull.apply_async(args=args, queue=node_queue(node), expires=expires, argsrepr=json.dumps(args))


@app.task(name="imagesync.sync", time_limit=SYNC_TIME_LIMIT, soft_time_limit=SYNC_TIME_LIMIT - 30)
def sync(trigger: str = "manual", nodes: list[str] | None = None) -> dict:
    """Start a run (or report that one is already running)."""
    if nodes:
        for name in nodes:
            settings.node(name)
    return start_run(settings, redis(), send_pull, trigger=trigger, targets=nodes).to_dict()


@app.task(
    name="imagesync.pull",
    bind=True,
    ignore_result=True,
    acks_late=True,
    max_retries=settings.retries,
    soft_time_limit=PULL_SOFT_LIMIT,
    time_limit=PULL_HARD_LIMIT,
)
def pull(self, run_id: str, node: str, image: str) -> str:  # type: ignore[no-untyped-def]
    """Pull ``image`` onto ``node`` for run ``run_id`` and report the outcome."""
    attempts = self.request.retries + 1
    state = _run_status(run_id)
    if state not in (None, RUNNING):
        outcome = Outcome(node, image, SKIPPED, reason=f"run was already {state} when this pull started")
    else:
        try:
            outcome, transient = pull_image(settings, settings.node(node), image)
        except ConfigError as exc:
            outcome, transient = Outcome(node, image, FAILED, reason=exc.problems[0]), False
        except SoftTimeLimitExceeded:
            reason = f"task time limit ({PULL_SOFT_LIMIT} s) reached"
            outcome, transient = Outcome(node, image, TIMED_OUT, reason=reason), False
        if transient and self.request.retries < self.max_retries:
            delay = backoff(self.request.retries)
            log.info("run %s: %s: %s failed (%s); retry %d of %d in %.1f s", run_id, node, image,
                     outcome.reason, attempts, self.max_retries, delay)
            raise self.retry(countdown=delay)
    outcome.attempts = attempts
    finish_pull(settings, redis(), run_id, outcome)
    return outcome.status


def _run_status(run_id: str) -> str | None:
    return run_store(settings, redis()).status(run_id)


@app.task(name="imagesync.finalize", ignore_result=True)
def finalize() -> list[str]:
    """Finalize runs that stopped making progress and free their lock."""
    return finalize_stale(settings, redis())


@task_revoked.connect
def _report_expired_pull(request=None, expired=False, **_):  # type: ignore[no-untyped-def]
    # A pull that waited past its expiry is dropped by the worker; report it so
    # the run's counts stay right.
    # The request here is rebuilt from the message headers: no args, but our argsrepr.
    if request is None or not expired or getattr(request, "task", None) != pull.name:
        return
    try:
        run_id, node, image = json.loads(request.argsrepr)
    except (TypeError, ValueError):
        log.warning("an expired pull could not be reported: arguments unreadable (%r)", request.argsrepr)
        return
    finish_pull(settings, redis(), run_id, Outcome(
        node, image, EXPIRED, reason="waited in the queue past its expiry (node's worker down or busy)"))


@after_setup_logger.connect
def _log_to_files(logger=None, **_):  # type: ignore[no-untyped-def]
    # A worker or beat started as "celery -A imagesync ..." has not been through
    # the CLI's check: with a log_dir it cannot write, every log line would end
    # in a traceback, so it stops here, before it starts anything.
    try:
        logs.check_log_dir(settings.log_dir)
    except ConfigError as exc:
        refuse(exc)
    if logger is not None:
        logger.addHandler(logs.file_handler(settings.log_dir))
    for noisy in ("paramiko", "invoke", "fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
