"""What a worker does as it starts, forks its pool and stops, besides running tasks.

* An agent's worker keeps its node's heartbeat (:class:`imagesync.agents.Heartbeat`) and,
  with ``agent_peer_port``, serves its node's images to the other agents (:mod:`imagesync.peerserve`).
* Before each fork, the main process freezes what it imported (gc.freeze), so the
  pool processes keep sharing those pages.
* A worker whose pool serves several nodes' queues (or more than ``max_parallel``
  of one) notes it: each pull then takes a slot of its node (``tasks._take_slot``).
* A worker whose pool is threads keeps the tasks' time limits itself
  (:mod:`imagesync.timelimits`): Celery enforces them in prefork only.
* A node worker that starts takes back at once what its dead predecessor held.
* Its log lines also go to ``log_dir``, which it checks before it starts anything.
"""

from __future__ import annotations

import gc
import logging
import os
import time

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import (
    after_setup_logger,
    task_postrun,
    task_prerun,
    worker_before_create_process,
    worker_init,
    worker_ready,
    worker_shutting_down,
)

from . import agents, logs, peerserve, timelimits
from .celery import refuse, settings
from .celeryconfig import NODE_QUEUE_PREFIX
from .errors import ConfigError
from .nodeslots import shares_pool
from .redelivery import take_back
from .redisclient import connect

log = logging.getLogger("imagesync")


def shared_pool() -> bool:
    """Whether this worker's pool serves pulls of several nodes (or more than max_parallel of
    one), so that each pull must take a slot of its node first; set before the pool forks."""
    return _shared_pool


def thread_pool() -> bool:
    """Whether this worker's pool is threads: its tasks share the process and its connections."""
    return _time_limits is not None


#: the time limits of the tasks of a worker whose pool is threads (None in any other worker)
_time_limits: timelimits.Watchdog | None = None


@worker_init.connect
def _keep_time_limits(sender=None, **_):  # type: ignore[no-untyped-def]
    global _time_limits
    if sender is None:
        return
    from celery.concurrency import get_implementation
    from celery.concurrency.thread import TaskPool

    pool = get_implementation(sender.pool_cls)
    if isinstance(pool, type) and issubclass(pool, TaskPool):
        _time_limits = timelimits.Watchdog(SoftTimeLimitExceeded)
        _time_limits.start()


@worker_ready.connect
def _say_time_limits(**_: object) -> None:
    if _time_limits is not None:
        log.info("pool of threads: this worker keeps its tasks' time limits itself (imagesync.timelimits)")


@task_prerun.connect
def _task_began(task_id=None, task=None, **_):  # type: ignore[no-untyped-def]
    if _time_limits is not None and task is not None:
        hard, soft = task.request.timelimit or (None, None)
        _time_limits.began(task_id or "?", task.name, soft or task.soft_time_limit, hard or task.time_limit)


@task_postrun.connect
def _task_ended(**_: object) -> None:
    if _time_limits is not None:
        _time_limits.ended()


#: the heartbeat of this worker's node, when it was started by `imagesync agent`
_heartbeat: agents.Heartbeat | None = None


@worker_ready.connect
def _start_heartbeat(**_: object) -> None:
    global _heartbeat
    text = os.environ.get(agents.AGENT_VARIABLE)
    if not text:
        return
    node = agents.Node.model_validate_json(text)
    redis = lambda: connect(settings, socket_timeout=10, socket_connect_timeout=5)  # noqa: E731
    peer = ""
    if settings.agent_peer_port is not None:
        # in the main process, beside the heartbeat: the pool's processes run the pulls
        try:
            server = peerserve.start(settings.agent_peer_address, settings.agent_peer_port,
                                     peerserve.ctr_argv(node.endpoint, node.namespace),
                                     lambda: peerserve.fleet_token(redis()))
            peer = agents.peer_address(settings, server.port)
        except OSError as exc:  # the node still registers and pulls; it serves no copies
            log.error("agent %s serves no copies: cannot listen on %s:%s (%s): choose another agent_peer_port",
                      node.name, settings.agent_peer_address, settings.agent_peer_port, exc.strerror or exc)
    _heartbeat = agents.Heartbeat(redis, node, settings.agent_heartbeat, settings.agent_forget,
                                  lambda: agents.examine_self(settings, node), peer)
    _heartbeat.start()


@worker_shutting_down.connect
def _stop_heartbeat(**_: object) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


#: set in a worker's main process before it forks its pool: whether pulls of
#: several nodes (or more than max_parallel of one) share its pool, so that
#: each pull must take a slot of its node first
_shared_pool = False


#: when this worker started, before it took any message off its queues
_worker_started = 0.0


@worker_before_create_process.connect
def _freeze_before_fork(**_: object) -> None:
    # A pool process shares the main process's memory until something writes
    # to a page; the cyclic garbage collector writes to every object it scans,
    # so without this each pool process soon holds its own copy of everything
    # imported before the fork. Frozen objects are never scanned (gc.freeze),
    # and stay shared; called before every fork, so a replaced process too.
    gc.collect()
    gc.freeze()


@worker_init.connect
def _note_start(**_: object) -> None:
    global _worker_started
    _worker_started = time.time()


@worker_init.connect
def _note_shared_pool(sender=None, **_):  # type: ignore[no-untyped-def]
    global _shared_pool
    if sender is None:
        return
    queues = list(sender.app.amqp.queues.consume_from)
    concurrency = sender.concurrency if isinstance(sender.concurrency, int) else 0
    _shared_pool = shares_pool(queues, concurrency, settings.max_parallel, NODE_QUEUE_PREFIX)


@worker_ready.connect
def _say_shared_pool(sender=None, **_):  # type: ignore[no-untyped-def]
    if _shared_pool and sender is not None:
        nodes = [q.removeprefix(NODE_QUEUE_PREFIX) for q in sender.app.amqp.queues.consume_from
                 if q.startswith(NODE_QUEUE_PREFIX)]
        log.info("one pool for %d nodes (%s): at most %d pulls at once on each, held by node slots in Redis",
                 len(nodes), ", ".join(nodes), settings.max_parallel)


@worker_ready.connect
def _take_back_unacked_pulls(sender=None, **_):  # type: ignore[no-untyped-def]
    # A node worker that starts takes back at once what its dead predecessor
    # held, rather than leave it to the visibility timeout (imagesync.redelivery).
    if sender is None:
        return
    queues = [name for name in sender.app.amqp.queues.consume_from if name.startswith(NODE_QUEUE_PREFIX)]
    if not queues:
        return
    try:
        with sender.app.connection_for_write() as connection:
            restored = take_back(connection.default_channel, queues, before=_worker_started or time.time())
    except Exception as exc:  # never keep a worker from starting: the visibility timeout still holds
        log.warning("could not take back the unacknowledged pulls of %s: %s", ", ".join(queues), exc)
        return
    if restored:
        log.warning("took back %d unacknowledged pulls of %s left by a worker that died",
                    len(restored), ", ".join(queues))


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
