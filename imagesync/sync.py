"""The run lifecycle as ordinary functions; the Celery tasks are thin shells around these.

* :func:`start_run` takes the lock, inventories every node, plans, records the
  run and hands each (node, image) pull to ``send_pull``: first those that need
  no registry's answer, then those that wait for a platform verdict as the
  verdicts come in, and last the pulls of the tags the registries have moved
  (asked about while the first pulls run), added to the run.
* :func:`finish_pull` records a pull's outcome, writes its log lines, and, for
  the pull that completes the run, the summary.
* :func:`finalize_stale` ends runs that stopped making progress.
* :func:`cancel_run` ends a run on an operator's word.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis import Redis

from . import backup, backupstore, declared, logs
from .agents import known_nodes
from .budgets import pull_expiry
from .errors import ImagesyncError
from .lock import RunLock
from .outcomes import Outcome
from .pending import Pending
from .planning import refresh, room
from .planning.plan import Plan
from .planning.planner import make_plan
from .planning.platforms import PlatformCheck, batches
from .planning.policy import policy_for
from .runs import CANCELLED, RunCancelled, RunStore, new_run_id, summary_lines
from .runstores import run_lock, run_store
from .sending import Sender, SendPull, as_exclusions, interleaved, keep_off, node_counts
from .survey import SendInventory, survey

if TYPE_CHECKING:
    from .config import Settings
    from .inventory import Inventory

log = logging.getLogger("imagesync")


@dataclass
class Started:
    status: str  # "started", "already-running", "nothing-to-do", "cancelled"
    run_id: str | None
    message: str
    pulls: int = 0
    plan: Plan | None = None
    #: nodes the run was meant for that it could not reach: node -> why
    missed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"status": self.status, "run": self.run_id, "pulls": self.pulls, "message": self.message,
                "missed": self.missed}


def missed_targets(plan: Plan, configured: Iterable[str], targets: Iterable[str] | None) -> dict[str, str]:
    """The nodes a run was meant for but skipped: the named targets it could not
    reach, or every node when it reached none. Such a run has failed."""
    if targets is not None:
        return {node: plan.skipped[node] for node in targets if node in plan.skipped}
    if plan.skipped and set(plan.skipped) >= set(configured):
        return dict(plan.skipped)
    return {}


def _known(settings: Settings, redis: Redis | None) -> list[str]:
    """Every node a run may target, for the conditions that remember what nodes held."""
    return known_nodes(settings, redis) if redis is not None else []


def plan_now(settings: Settings, targets: Iterable[str] | None = None, redis: Redis | None = None,
             send_inventory: SendInventory | None = None, platform_check: PlatformCheck | None = None) -> Plan:
    """Inventory every node and plan, without changing anything; ``send_inventory`` queues
    the inventory tasks of agent nodes (needed with ``agents = true``). With ``platform_check``
    made to defer, the pairs that wait for a registry's verdict stay planned (see :func:`start_run`)."""
    return plan_from(settings, survey(settings, redis, send_inventory), targets, redis, platform_check=platform_check)


def plan_images(settings: Settings, images: Iterable[str], targets: Iterable[str] | None = None,
                redis: Redis | None = None, send_inventory: SendInventory | None = None,
                platform_check: PlatformCheck | None = None) -> Plan:
    """Inventory every node and plan a run whose wanted set is exactly ``images``."""
    return plan_from(settings, survey(settings, redis, send_inventory), targets, redis, list(images),
                     platform_check)


def plan_from(settings: Settings, inventory: Inventory, targets: Iterable[str] | None = None,
              redis: Redis | None = None, images: list[str] | None = None,
              platform_check: PlatformCheck | None = None, later: refresh.Later | None = None,
              answers: Mapping[str, str] | None = None) -> Plan:
    """The plan for ``inventory``: of the configured images, or exactly ``images``. ``later`` and
    ``answers``: moved tags asked about after the first pulls (:class:`refresh.Later`)."""
    limited = images is not None
    return make_plan(
        inventory.images, () if limited else settings.prefixes,
        list(images or ()) if limited else settings.declared_images(), inventory.unreachable, targets,
        facts=inventory.facts,
        policy=policy_for(settings, redis, limited=limited, nodes=_known(settings, redis),
                          platform_check=platform_check, later=later, answers=answers),
        exclude=settings.exclude,
    )


def images_trigger(trigger: str, images: list[str], shown: int = 3) -> str:
    """``webhook: registry/repo:tag, ...``: the trigger of a run limited to ``images``."""
    names = ", ".join(images[:shown]) + (f" and {len(images) - shown} more" if len(images) > shown else "")
    return f"{trigger}: {names}"


def start_run(
    settings: Settings,
    redis: Redis,
    send_pull: SendPull,
    trigger: str = "manual",
    targets: Iterable[str] | None = None,
    images: Iterable[str] | None = None,
    pending: Pending | None = None,
    send_inventory: SendInventory | None = None,
) -> Started:
    """Start a run unless one is in progress; ``send_pull(node, image, run_id, expires)`` queues a pull,
    ``send_inventory`` an agent node's inventory.

    With ``images``, the run wants exactly those images (every reachable node
    lacking one pulls it) and its trigger names them. With ``pending`` too
    (the webhook's pushed images), the run takes only those of ``images``
    still pending once it holds the lock, and if none is left, does nothing;
    they leave ``pending`` only once the run has sent their pulls or found
    that no node it reached lacks them (:mod:`imagesync.pending`).

    Pulls that wait for a registry's platform verdict (no node of their node's
    platform holds the image: :class:`~imagesync.planning.platforms.PlatformCheck`)
    are recorded with the others but sent after them, once the registries have
    answered; those the answers keep off their node leave the run record
    (:meth:`RunStore.exclude`). When every pull waits, the registries are asked
    first, as ``plan`` does.
    """
    run_id = new_run_id()
    lock = run_lock(settings, redis)
    if not lock.acquire(run_id):
        # A holder that died is found by the deadline check; run it now rather
        # than make this trigger wait for the next beat.
        finalize_stale(settings, redis)
        if not lock.acquire(run_id):
            holder = lock.holder()
            message = f"already running: run {holder} holds the lock; this {trigger} trigger does nothing"
            log.info(message)
            return Started("already-running", holder, message)
    store = run_store(settings, redis)
    taken: dict[str, str] = {}
    if images is not None:
        images = list(dict.fromkeys(images))
        if pending is not None:
            try:
                taken = pending.take(images)
            except BaseException:
                lock.release(run_id)
                raise
            images = list(taken)
            if not images:
                lock.release(run_id)
                message = f"nothing to do: another run already took the images of this {trigger} trigger"
                log.info(message)
                return Started("nothing-to-do", None, message)
        trigger = images_trigger(trigger, images)
    try:
        check = PlatformCheck(settings, redis, defer=True)
        later = refresh.Later() if settings.refresh else None
        inventory = survey(settings, redis, send_inventory)
        plan = plan_from(settings, inventory, targets, redis, images, check, later)
        waiting = later.waiting(plan) if later is not None and later.tags else set()
        if later is not None and later.tags and not set(plan.pulls) - waiting:
            # every pull would wait for the registries' answers about the tags held: ask now
            check, later, waiting = PlatformCheck(settings, redis, defer=True), None, set()
            plan = plan_from(settings, inventory, targets, redis, images, check)
        more = later is not None and bool(later.tags)
        awaiting = (set(check.awaiting) & set(plan.pulls)) - waiting
        began = time.monotonic()  # the registries' one budget (registry.LOOKUP_BUDGET)
        in_turn = batches(awaiting)
        while in_turn and len(awaiting) == plan.total - len(waiting):
            # no pull can go ahead of the registries' answers yet: ask, one batch at a time, until
            # one may (a run that would pull nothing is then known to be one before it is recorded)
            batch = in_turn.pop(0)
            keep_off(plan, check.settle(batch, began))
            awaiting -= batch
        for node, reason in plan.skipped.items():
            log.warning("run %s: node %s skipped: %s", run_id, node, reason)
        for refusal in plan.refused:
            log.warning("run %s: refused image name from %s: %r (%s)",
                        run_id, refusal.node, refusal.reference, refusal.reason)
        for note in plan.notes:
            log.info("run %s: %s", run_id, note)
        for line in room.evicted_lines(plan.evicted):
            log.warning("run %s: %s", run_id, line)
        room.remember(redis, plan, room.scope_for(settings, limited=images is not None))
        declared.remember(redis, settings, run_id)
        pulls = [pull for pull in interleaved(plan.missing) if pull not in waiting]
        if settings.backup is not None:
            # what the backup must hold once the run completes (imagesync.backup)
            backupstore.BackupStore(redis).remember(run_id, backup.candidates(settings, plan))
        complete = store.create(
            run_id,
            trigger=trigger,
            pulls=pulls,
            skipped=plan.skipped,
            drift=plan.to_dict()["drift"],
            refused=plan.to_dict()["refused"],
            wanted=len(plan.wanted),
            excluded=plan.excluded_as_dict(),
            evicted=plan.evicted,
            # a run limited to some images says nothing of the others: the exporter
            # keeps reading the per-node counts of the last full run
            nodes=node_counts(plan) if images is None else None,
            more=more,
        )
        missed = missed_targets(plan, [*plan.holdings, *plan.skipped], targets)
        if complete:
            if pending is not None and not missed:
                pending.settle(taken)  # no node it reached lacks them
            lock.release(run_id)
            write_summary(settings, store, run_id)
            if missed:
                message = f"run {run_id}: nothing to pull on the nodes it reached; " + _missed_line(missed)
                return Started("nothing-to-do", run_id, message, 0, plan, missed)
            return Started("nothing-to-do", run_id, f"run {run_id}: every node already holds every image", 0, plan)
        # The lock's TTL ran from before the inventory, which may have taken long.
        _keep_lock(lock, store, run_id, "after the inventory")
        per_node = Counter(node for node, _ in pulls)
        log.info("run %s started by %s: %d pulls on %d nodes (%s)%s%s", run_id, trigger, len(pulls),
                 len(per_node), ", ".join(f"{n}: {c}" for n, c in sorted(per_node.items())),
                 f"; {len(awaiting)} wait for their registry's platform verdict" if awaiting else "",
                 f"; {len(later.tags)} tags held are asked about after them" if later and more else "")
        expiry = {node: pull_expiry(settings, count) for node, count in per_node.items()}
        sender = Sender(send_pull, run_id, expiry, lambda when: _keep_lock(lock, store, run_id, when))
        sender.send(plan, [pull for pull in pulls if pull not in awaiting], len(pulls))
        # the pulls that need no verdict are on their way; the others follow, a batch of images at a
        # time, as the registries answer
        kept_off: dict[tuple[str, str], str] = {}
        order = {pull: i for i, pull in enumerate(pulls)}
        for batch in in_turn:
            judged = check.settle(batch, began)
            kept_off.update(judged)
            keep_off(plan, judged)
            if judged and store.exclude(run_id, as_exclusions(judged)) == 2:
                # every pull it sent had reported: the run is complete, its lock released
                if pending is not None:
                    pending.settle(taken)
                write_summary(settings, store, run_id)
                return Started("started", run_id, f"run {run_id} started: {plan.total} pulls", plan.total, plan,
                               missed)
            _keep_lock(lock, store, run_id, "after a batch of platform verdicts")
            sender.send(plan, sorted(batch.difference(judged), key=order.__getitem__), len(pulls))
        if awaiting:
            log.info("run %s: platform verdicts in: %d pulls kept off (n/a), %d sent after the others",
                     run_id, len(kept_off), len(awaiting) - len(kept_off))
        if more:
            assert later is not None
            plan, state = _moved_later(settings, redis, store, run_id, inventory, targets, images, later, waiting,
                                       sender, lambda when: _keep_lock(lock, store, run_id, when))
            if state == 2:
                # complete once closed: every pull it sent had reported, its lock released
                if pending is not None:
                    pending.settle(taken)
                write_summary(settings, store, run_id)
                return Started("started", run_id, f"run {run_id} started: {len(sender.sent)} pulls",
                               len(sender.sent), plan, missed)
        _keep_lock(lock, store, run_id, "after sending every pull")
        if pending is not None:
            pending.settle(taken)
    except RunCancelled as exc:
        # `imagesync cancel` wrote the summary and released the lock; what was
        # sent finds the run cancelled and is skipped.
        log.warning("%s", exc)
        return Started("cancelled", run_id, str(exc))
    except BaseException as exc:
        # Whatever was queued will report into a run that is already over;
        # the lock must not outlive this failure, whatever else fails here.
        try:
            if store.abandon(run_id, f"start failed: {exc}", force=True):
                write_summary(settings, store, run_id)
        finally:
            lock.release(run_id)
        raise
    total = len(sender.sent)
    message = f"run {run_id} started: {total} pulls" + (f"; {_missed_line(missed)}" if missed else "")
    return Started("started", run_id, message, total, plan, missed)


def _moved_later(settings: Settings, redis: Redis, store: RunStore, run_id: str, inventory: Inventory,
                 targets: Iterable[str] | None, images: list[str] | None, later: refresh.Later,
                 waiting: set[tuple[str, str]], sender: Sender, keep_lock: Callable[[str], None]
                 ) -> tuple[Plan, int]:
    """Once the first pulls are on their way: ask the registries about the tags held, plan again
    with their answers, and add to the run what that plan adds (the moved tags' pulls, and the
    pulls that waited for the answers, less the leftovers), then close the run. The plan again,
    and what closing the run answered (:meth:`RunStore.add`)."""
    answers = later.ask(settings)
    keep_lock("after asking the registries about the tags held")
    # the platform verdicts the first pulls waited for are in Redis now: only the pulls added
    # here may still need one (a moved tag's new digest)
    check = PlatformCheck(settings, redis, defer=True)
    final = plan_from(settings, inventory, targets, redis, images, check, answers=answers)
    added = [pull for pull in interleaved(final.missing)
             if pull not in sender.sent and (pull in waiting or pull in final.moved)]
    kept_off = check.settle([pull for pull in added if pull in check.awaiting])
    for (node, image), reason in kept_off.items():
        log.info("run %s: %s: %s not pulled again: %s", run_id, node, image, reason)
    added = [pull for pull in added if pull not in kept_off]
    moved = sum(1 for pull in added if pull in final.moved)
    log.info("run %s: %d moved tags to pull again, %d pulls that waited for the answers: %d pulls added",
             run_id, moved, len(added) - moved, len(added))
    for node, count in Counter(node for node, _ in added).items():
        sender.expiry[node] = pull_expiry(settings, count)
    state = store.add(run_id, added, nodes=node_counts(final) if images is None else None)
    if state == 1:
        sender.send(final, added, len(sender.sent) + len(added))
    return final, state



def _missed_line(missed: Mapping[str, str]) -> str:
    return "skipped " + "; ".join(f"{node} ({reason})" for node, reason in missed.items())


class LockLost(ImagesyncError):
    """The run's lock expired or was taken while the run was being started."""


def _keep_lock(lock: RunLock, store: RunStore, run_id: str, when: str) -> None:
    """Renew the run's lock; a run that lost it stops here rather than overlap another."""
    if not lock.renew(run_id):
        if store.status(run_id) == CANCELLED:
            raise RunCancelled(f"run {run_id} was cancelled (seen {when}): it sends no more pulls")
        holder = lock.holder()
        raise LockLost(f"run {run_id} lost its lock {when} (now held by {holder or 'nobody'}): "
                       "the inventory took longer than the lock's TTL; the run stops here")


def finish_pull(settings: Settings, redis: Redis, run_id: str, outcome: Outcome) -> int:
    """Record a finished pull: run record first, then log files, and the summary if it was the last.

    Redis comes first: the log files are a copy of what the run record holds,
    and a full or read-only ``log_dir`` must never cost an outcome.
    """
    store = run_store(settings, redis)
    state = store.record(run_id, outcome)
    room.pulled(redis, outcome)
    try:
        logs.record_pull(settings.log_dir, run_id, outcome)
    except OSError as exc:
        logs.report_unwritable(settings.log_dir, exc)
    level = logging.WARNING if outcome.failed else logging.INFO
    log.log(level, "run %s: %s: %s %s in %.1f s%s", run_id, outcome.node, outcome.image,
            outcome.describe(), outcome.duration,
            f": {outcome.reason}" if outcome.reason else "")
    if state == -1:
        log.warning("run %s: no record of this run in Redis (lost or expired); outcome logged only", run_id)
    elif state == 2:
        write_summary(settings, store, run_id)
    return state


def write_summary(settings: Settings, store: RunStore, run_id: str) -> None:
    run = store.get(run_id)
    if run is None:
        return
    for i, line in enumerate(summary_lines(run)):
        log.log(logging.INFO if i == 0 and not run.failures else logging.WARNING, line)


class NotCancelled(ImagesyncError):
    """There was no run to cancel: none in progress, no such run, or it had ended."""


def cancel_run(settings: Settings, redis: Redis, run_id: str | None, by: str, reason: str = "") -> str:
    """Cancel ``run_id``, or the run holding the lock; returns the run id.

    One atomic step marks it cancelled (who, why), takes it off the stale-run
    check and releases its lock, so that a new run can start at once; then its
    summary is written. Its pulls still queued find it cancelled and are skipped
    without reaching the node; pulls already running finish and report late.
    """
    store = run_store(settings, redis)
    if run_id is None:
        run_id = run_lock(settings, redis).holder()
        if run_id is None:
            raise NotCancelled("nothing to cancel: no run is in progress (see 'imagesync history')")
    answer = store.cancel(run_id, by, reason)
    if answer == -1:
        raise NotCancelled(f"nothing to cancel: no run {run_id} in the history (see 'imagesync history')")
    if answer == 0:
        raise NotCancelled(f"nothing to cancel: run {run_id} is not running (it is {store.status(run_id)})")
    write_summary(settings, store, run_id)
    return run_id


def finalize_stale(settings: Settings, redis: Redis, now: float | None = None) -> list[str]:
    """End runs that made no progress for too long, release their lock, write their summary."""
    store = run_store(settings, redis)
    ended = []
    for run_id in store.stale(now):
        reason = f"no pull reported for {store.stale_after} s"
        if store.abandon(run_id, reason, now):
            ended.append(run_id)
            write_summary(settings, store, run_id)
    lock = run_lock(settings, redis)
    holder = lock.holder()
    if holder and store.status(holder) not in (None, "running"):
        # A lock left by a run that is over (its release was lost): free it.
        lock.release(holder)
    return ended
