"""Celery tasks: thin shells with explicit names and plain arguments.

``imagesync.sync`` runs on the control queue; ``imagesync.pull`` runs on the
queue of the node it pulls onto (``node.<name>``), served by that node's own
worker, whose concurrency is ``max_parallel``, or by a worker shared by several
nodes, where each pull first takes a slot of its node (``imagesync.nodeslots``).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from typing import Any

from celery.exceptions import Retry as RetryLater
from celery.exceptions import SoftTimeLimitExceeded
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import agents, backup, keys, logs, prune, references, taskargs, workerhooks
from .attempt import Attempt, WaitForHolder, spent_since
from .backupstore import BackupStore, abandon_overdue
from .budgets import SYNC_TIME_LIMIT, pull_time_limits
from .celery import app, settings
from .celeryconfig import CONTROL_QUEUE, node_queue
from .errors import ConfigError, one_line
from .nodeslots import LEASE_MARGIN, POLL, THREAD_POLL, NodeSlots, requeue_delay
from .outcomes import EXPIRED, FAILED, SKIPPED, TIMED_OUT, Outcome
from .pending import Pending
from .planning.plan import DEFAULT_ROUTE, Route
from .pulls import get_image, needs_check
from .redisclient import connect
from .runs import RUNNING
from .runstores import run_store
from .semaphore import Semaphore
from .sync import finalize_stale, finish_pull, start_run
from .taskargs import RefusedTask

log = logging.getLogger("imagesync")

PULL_SOFT_LIMIT, PULL_HARD_LIMIT = pull_time_limits(settings)
#: backups that hold a process of the control worker at once (celeryconfig.CONTROL_CONCURRENCY
#: leaves the others to runs), and how long another waits in the queue before it looks again
BACKUPS_AT_ONCE, BACKUP_WAIT = 1, 30
#: retry backoff: base seconds, doubled per attempt, capped, with jitter
BACKOFF_BASE, BACKOFF_CAP = 2.0, 60.0

#: how a worker's Redis client rides out a Redis restart: 0.25, 0.5, 1, then 2 s
#: between attempts, about 12 s in all
REDIS_RETRY = Retry(ExponentialBackoff(cap=2.0, base=0.25), retries=8)

_redis: dict[int, Redis] = {}


def redis() -> Redis:
    """This process's Redis client (a forked child makes its own), shared by its threads.

    A pull that ends while Redis restarts must still report, or its run loses
    the outcome and ends abandoned; redis-py's default retries give up within
    a second or two, so this client retries for longer. Recording an outcome
    twice is harmless (the run counts each pull once).
    """
    client = _redis.get(os.getpid())
    if client is None:
        client = _redis[os.getpid()] = connect(settings, threads=True, health_check_interval=30,
                                               retry=REDIS_RETRY)
    return client


def backoff(retries: int) -> float:
    """Exponential backoff with jitter around the nominal delay; the cap bounds the delay, jitter included."""
    nominal = min(BACKOFF_CAP, BACKOFF_BASE * 2**retries)
    return round(min(BACKOFF_CAP, nominal * random.uniform(0.5, 1.5)), 2)


def send_inventory(node: str, request: str, expires: float) -> None:
    """Queue ``imagesync.inventory`` on ``node``'s queue; it is worth running for ``expires`` s."""
    app.send_task("imagesync.inventory", args=(request, node), queue=node_queue(node), expires=expires)


def send_pull(node: str, image: str, run_id: str, expires: float, route: Route = DEFAULT_ROUTE,
              producer: Any = None) -> None:
    """Queue one pull, worth running for ``expires`` seconds.

    The deadline travels as an argument rather than as Celery's ``expires``: a
    worker drops an expired message before any code of ours sees its
    arguments, and a retry loses what would let a handler read them back. The
    task itself reports a pull past its deadline as "expired", retried or
    not, in a pool process, like any other outcome. Like ``expires``, the
    deadline compares the clocks of two hosts: keep them in sync (NTP).
    A ``route`` other than the registry alone travels with it.

    A run sends its pulls through one ``producer`` (a connection of the pool held for
    the whole fan-out), and names their arguments for Flower itself: Celery's own
    ``saferepr`` of them cost a fifth of each send (bench/README.md, fan-out).
    """
    kwargs: dict = {"deadline": round(time.time() + expires, 3)}
    if route != DEFAULT_ROUTE:
        kwargs["route"] = route.to_dict()
    args = (run_id, node, image)
    pull.apply_async(args=args, kwargs=kwargs, queue=node_queue(node), producer=producer,
                     argsrepr=repr(args), kwargsrepr=repr(kwargs))


@app.task(name="imagesync.sync", bind=True, time_limit=SYNC_TIME_LIMIT, soft_time_limit=SYNC_TIME_LIMIT - 30)
def sync(self, trigger: str = "manual", nodes: list[str] | None = None,  # type: ignore[no-untyped-def]
         images: list[str] | None = None) -> dict:
    """Start a run (or report that one is already running); with ``images`` (sent by
    ``imagesync webhook``), a run of those of them still pending in Redis."""
    if self.request.id:
        # Say at once that a worker has it: whoever waits for the answer can
        # tell a long inventory from a missing control worker.
        redis().set(keys.sync_taken(self.request.id), self.request.hostname or "?", ex=SYNC_TIME_LIMIT)
    trigger = taskargs.trigger(trigger)
    images = [taskargs.reference(image) for image in images or ()]
    if nodes:
        agents.check_targets(settings, redis(), nodes)
    with app.producer_or_acquire() as producer:
        started = start_run(settings, redis(), functools.partial(send_pull, producer=producer), trigger=trigger,
                            targets=nodes, images=images or None, pending=Pending(redis()) if images else None,
                            send_inventory=send_inventory)
    if started.status == "nothing-to-do" and started.run_id:
        send_backup(started.run_id)  # a run with nothing to pull completes at once
        send_prune(started.run_id)
    return started.to_dict()


@app.task(
    name="imagesync.pull",
    bind=True,
    ignore_result=True,
    acks_late=True,
    max_retries=settings.retries,
    soft_time_limit=PULL_SOFT_LIMIT,
    time_limit=PULL_HARD_LIMIT,
)
def pull(self, run_id: str, node: str, image: str, deadline: float | None = None,  # type: ignore[no-untyped-def]
         route: dict | None = None, began: float | None = None) -> str:
    """Get ``image`` onto ``node`` for run ``run_id``, from the sources of its ``route``
    (the registry alone without one), and report the outcome.

    ``began``: when this attempt's ``time_out`` began, for a pull put back in
    its queue to wait for a holder to copy from (it resumes with what is left).
    """
    attempts = self.request.retries + 1
    try:
        run_id, node = _pull_target(self, run_id, node)
    except RefusedTask as exc:
        log.error("pull of %r onto %r for run %r: %s; nothing done", image, node, run_id, exc)
        return FAILED
    # a run and a node of this worker: what else is refused is reported into that run
    refusal = None
    try:
        image = taskargs.reference(image)
        deadline, checked = taskargs.deadline(deadline), taskargs.route(settings, redis(), route, image)
        began = taskargs.deadline(began)
    except RefusedTask as exc:
        refusal = exc
    state, started = run_store(settings, redis()).state(run_id)
    if refusal is not None:
        log.error("run %s: %s: %s: %s; nothing done", run_id, node, taskargs.shown(image), refusal)
        # a refused name goes on into log lines and the run record escaped, as the plan shows refusals
        named = image if isinstance(image, str) and references.is_valid(image) else taskargs.shown(image)
        outcome = Outcome(node, named, FAILED, reason=f"refused: {refusal.reason}")
    elif state not in (None, RUNNING):
        outcome = Outcome(node, image, SKIPPED, reason=f"run was already {state} when this pull started")
    elif deadline is not None and time.time() > deadline:
        outcome = Outcome(node, image, EXPIRED,
                          reason="waited in the queue past its expiry (node's worker down or busy)")
    else:
        holder = _take_slot(self, run_id, node)
        try:
            redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
            check = needs_check(self.request.retries, redelivered, started)
            attempt = Attempt(settings, settings.node(node), image, checked, run_id, check=check,
                              last=self.request.retries >= self.max_retries, redis=redis(),
                              spent=spent_since(began), requeue=True)
            outcome, transient = get_image(attempt)
        except WaitForHolder as wait:
            if holder is not None:
                _slots().give_back(node, holder)
            _requeue(self, run_id, wait.delay, began=wait.began)
            raise RetryLater(f"{node}: {image}: {wait.reason}; back in the queue for {wait.delay} s",
                             when=wait.delay) from None
        except ConfigError as exc:
            outcome, transient = Outcome(node, image, FAILED, reason=exc.problems[0]), False
        except SoftTimeLimitExceeded:
            reason = f"task time limit ({PULL_SOFT_LIMIT} s) reached"
            outcome, transient = Outcome(node, image, TIMED_OUT, reason=reason), False
        except Exception as exc:
            # A bug or a surprise must not cost the outcome: the run counts it.
            log.exception("run %s: %s: %s: unexpected error", run_id, node, image)
            reason = f"unexpected error: {type(exc).__name__}: {one_line(str(exc))}"
            outcome, transient = Outcome(node, image, FAILED, reason=reason), False
        if holder is not None:
            _slots().give_back(node, holder)
        if transient and self.request.retries < self.max_retries:
            delay = backoff(self.request.retries)
            log.info("run %s: %s: %s failed (%s); retry %d of %d in %.1f s", run_id, node, image,
                     outcome.reason, attempts, self.max_retries, delay)
            # A pull being retried is a run making progress: its run must not
            # be taken for stuck while the retries last.
            run_store(settings, redis()).touch(run_id)
            # a retry is a new attempt, with a time_out of its own
            kwargs = {k: v for k, v in (self.request.kwargs or {}).items() if k != "began"}
            raise self.retry(countdown=delay, kwargs=kwargs)
    outcome.attempts = attempts
    if finish_pull(settings, redis(), run_id, outcome) == 2:
        send_backup(run_id)  # this pull completed the run
        send_prune(run_id)
    return outcome.status


def _pull_target(task, run_id: object, node: object) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """The run and node of a message for a node, checked (taskargs): the node one this worker
    serves, on its own queue."""
    run_id = taskargs.run_id(run_id)
    node = taskargs.nodes(settings, redis(), [node])[0]
    routing_key = (task.request.delivery_info or {}).get("routing_key")
    taskargs.delivered_to(node, routing_key, node_queue(node))
    return run_id, node


def send_backup(run_id: str, countdown: float = 0) -> None:
    """Queue the backup of a run that just completed, on the control queue (with a backup configured).

    Its time limit grows with the images to check: each copy is bounded by time_out.
    """
    if settings.backup is None:
        return
    images = len(BackupStore(redis()).candidates(run_id) or {})
    rounds = -(-images // settings.max_parallel)
    limit = rounds * (settings.time_out + 30) + SYNC_TIME_LIMIT
    back_up.apply_async(args=(run_id,), queue=CONTROL_QUEUE, time_limit=limit, soft_time_limit=limit - 30,
                        countdown=countdown or None)


# Acknowledged when it starts, not when it ends: a backup may run far longer than
# the visibility timeout, and a second delivery while the first still copies
# would start it again. A backup whose worker dies is ended by its record's
# deadline (finalize); the next run's backup brings the backup up to date.
@app.task(name="imagesync.backup", ignore_result=True, bind=True, acks_late=False)
def back_up(self, run_id: str) -> str:  # type: ignore[no-untyped-def]
    """Copy into the backup registry what run ``run_id`` wanted and the backup lacks.

    At most ``BACKUPS_AT_ONCE`` backup holds one of the control worker's
    processes; another waits in the queue, holding none, so that the others
    stay free for runs (``sync``) and ``finalize``.
    """
    run_id = taskargs.run_id(run_id)
    hard_limit = (self.request.timelimit or (None, None))[0] or SYNC_TIME_LIMIT
    running = Semaphore(redis(), keys.BACKUPS_RUNNING, BACKUPS_AT_ONCE, hard_limit + 60)
    holder = self.request.id or run_id
    if not running.acquire(holder):
        log.info("run %s: another backup is under way; this one waits %d s in the queue", run_id, BACKUP_WAIT)
        send_backup(run_id, countdown=BACKUP_WAIT)
        return "waiting"
    try:
        record = backup.back_up(settings, redis(), run_id, send_backup_push)
    finally:
        running.release(holder)
    return record["status"] if record else "no backup"


def send_prune(run_id: str) -> None:
    """With ``prune = true``, queue a prune on the control queue after run ``run_id``, if beat
    started it and it completed (imagesync.prune.follows)."""
    if prune.follows(settings, redis(), run_id):
        prune_retired.apply_async(kwargs={"after": run_id}, queue=CONTROL_QUEUE)


@app.task(name="imagesync.prune", ignore_result=True, time_limit=SYNC_TIME_LIMIT,
          soft_time_limit=SYNC_TIME_LIMIT - 30)
def prune_retired(after: str | None = None) -> str:
    """Remove from the nodes the images imagesync no longer wants there (imagesync.prune);
    ``after``: the run this prune follows, named in its trigger."""
    try:
        after = None if after is None else taskargs.run_id(after)
    except RefusedTask as exc:
        log.error("prune after run %s: %s; nothing done", taskargs.shown(after), exc)
        return "refused"
    trigger = "prune" if after is None else prune.AFTER + after
    return prune.prune(settings, redis(), trigger=trigger, send_inventory=send_inventory).status


def send_backup_push(node: str, run_id: str, image: str, name: str) -> None:
    backup_push.apply_async(args=(run_id, node, image, name), queue=node_queue(node))


@app.task(name="imagesync.backup_push", ignore_result=True, acks_late=True,
          soft_time_limit=PULL_SOFT_LIMIT, time_limit=PULL_HARD_LIMIT)
def backup_push(run_id: str, node: str, image: str, name: str) -> str:
    """Push ``image`` from ``node`` to the backup as ``name`` (upstream no longer has it);
    on the node's queue, so under its max_parallel."""
    try:
        run_id, node = _pull_target(backup_push, run_id, node)
        image = taskargs.reference(image)
        if settings.backup is None or name != references.backup_name(settings.backup.registry, image):
            raise RefusedTask(f"{name!r} is not the backup's name of {image}")
    except RefusedTask as exc:
        log.error("backup push of %r from %r for run %r: %s; nothing done", image, node, run_id, exc)
        return "failed"
    return backup.push_from_node(settings, redis(), run_id, settings.node(node), image, name).status


@app.task(name="imagesync.inventory", ignore_result=True, soft_time_limit=90, time_limit=100)
def inventory(request: str, node: str) -> None:
    """On an agent: list the node's images and learn its facts, for the run that asked (``request``)."""
    try:
        request, node = taskargs.request_id(request), taskargs.nodes(settings, redis(), [node])[0]
        taskargs.delivered_to(node, (inventory.request.delivery_info or {}).get("routing_key"), node_queue(node))
    except RefusedTask as exc:
        log.error("inventory of %r: %s; nothing done", node, exc)
        return
    agents.answer(settings, redis(), request, node, keep=settings.agent_inventory_timeout + 60)


def _slots() -> NodeSlots:
    poll = THREAD_POLL if workerhooks.thread_pool() else POLL
    return NodeSlots(redis(), settings.max_parallel, PULL_HARD_LIMIT + LEASE_MARGIN, poll=poll)


def _take_slot(task, run_id: str, node: str) -> str | None:  # type: ignore[no-untyped-def]
    """On a shared worker, a slot of ``node`` for this pull (None on a worker of one node).

    A node that stays full puts the pull back on its queue for a few seconds
    and frees the pool process: a retry that counts no attempt (same
    ``retries``, same task id and arguments, its ``deadline`` included).
    """
    if not workerhooks.shared_pool():
        return None
    holder = _slots().take(node, task.request.id or "-")
    if holder is not None:
        return holder
    delay = requeue_delay()
    _requeue(task, run_id, delay)
    raise RetryLater(f"{node} runs max_parallel ({settings.max_parallel}) pulls; back in the queue for {delay} s",
                when=delay)


def _requeue(task, run_id: str, delay: float, **kwargs: object) -> None:  # type: ignore[no-untyped-def]
    """Put the pull back on its queue for ``delay`` s and free its pool process: a retry
    that counts no attempt (same ``retries``, task id and arguments, ``deadline`` included;
    ``kwargs`` replaced). Waiting, like a retry, is a run making progress: not stuck."""
    run_store(settings, redis()).touch(run_id)
    task.signature_from_request(task.request, kwargs={**(task.request.kwargs or {}), **kwargs},
                                countdown=delay, retries=task.request.retries).apply_async()


@app.task(name="imagesync.finalize", ignore_result=True)
def finalize() -> list[str]:
    """Housekeeping: finalize runs that stopped making progress and free their lock; end
    backup records past their deadline (their worker died); remove day folders of log_dir
    older than log_keep_days."""
    ended = finalize_stale(settings, redis())
    if settings.backup is not None:
        abandon_overdue(redis())
    logs.prune(settings.log_dir, settings.log_keep_days)
    return ended
