"""``imagesync prune``: the images imagesync manages and no longer wants on a node leave it.

A prune is a run of its own, with the trigger ``prune`` (``prune after run RUN`` when
``prune = true`` starts it after a scheduled run completed):

1. it takes the single-run lock, so that no run pulls while it removes, and a run
   that starts meanwhile finds it in progress;
2. it lists every node's images, as a run does, and on each node which images its
   containers use (:mod:`imagesync.runtimes.removal`);
3. it judges every image each node holds (:mod:`imagesync.retired`): those that carry
   a retired name are removed, or kept with the reason;
4. it records each image it judged in the run record, as a run records its pulls
   (outcomes ``removed``, ``kept``, or ``failed``), writes a log line for each, and the
   summary; the last outcome completes the run and releases the lock.

The removals run node by node, one at a time on each node, every node at once. A
node that cannot be reached, or cannot say which images its containers use, loses
nothing and is named as skipped. A prune that finds nothing retired leaves no run
record: it says so in one log line. ``dry_run`` judges and removes nothing, takes no lock.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis import Redis

from . import declared, keys, logs, references
from .budgets import KILL_AFTER, LIST_TIMEOUT, SSH_GRACE
from .errors import NodeError, RefusedReference, one_line
from .outcomes import FAILED, KEPT, REMOVED, TIMED_OUT, Outcome
from .planning.labels import Selections, node_labels
from .redisvalues import as_text
from .retired import Rules, Verdict, verdicts
from .runs import COMPLETED, Run, new_run_id
from .runstores import run_lock, run_store
from .runtimes import Image, removal
from .survey import SendInventory, survey
from .sync import finalize_stale
from .transport import transport_for

if TYPE_CHECKING:
    from .config import Node, Settings

log = logging.getLogger("imagesync")

#: how many removals run at once, one per node
MAX_NODES_AT_ONCE = 16
#: the trigger of a prune that follows a run (``prune = true``)
AFTER = "prune after run "


@dataclass
class Pruned:
    """What a prune did, or would do (``dry_run``)."""

    #: "done", "nothing-to-do", "already-running" or "dry-run"
    status: str
    run_id: str | None
    message: str
    verdicts: list[Verdict] = field(default_factory=list)
    #: nodes that lost nothing because they could not be asked: node -> why
    skipped: dict[str, str] = field(default_factory=dict)
    #: of them, those the prune was meant for: the nodes named, or every node when none was reached
    missed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"status": self.status, "run": self.run_id, "message": self.message, "skipped": self.skipped,
                "missed": self.missed, "images": [verdict.to_dict() for verdict in self.verdicts]}


def rules_for(settings: Settings, redis: Redis | None, nodes: Iterable[str]) -> Rules:
    """Prune's rules for ``settings`` on ``nodes``: what Redis remembers of the declared images
    besides, and the labels of the nodes, judged as the plan judges them (planning.labels)."""
    selections = Selections(settings)
    carried = node_labels(settings, redis, nodes)
    return Rules(prefixes=tuple(settings.prefixes), declared=declared.declared_now(settings),
                 remembered=declared.remembered(redis) if redis is not None else {},
                 exclude=tuple(settings.exclude),
                 labels=lambda node, image: selections.unselected(carried.get(node, ()), image))


def follows(settings: Settings, redis: Redis, run_id: str) -> bool:
    """Whether a prune follows run ``run_id``: with ``prune = true``, after a run that beat
    started and that completed (not one cancelled or abandoned)."""
    if not settings.prune:
        return False
    status, trigger = (as_text(value) for value in redis.hmget(keys.run(run_id), ["status", "trigger"]))
    return status == COMPLETED and trigger == "beat"


def prune(settings: Settings, redis: Redis, *, trigger: str = "prune", targets: Iterable[str] | None = None,
          dry_run: bool = False, send_inventory: SendInventory | None = None) -> Pruned:
    """Remove retired images from ``targets`` (every node by default); see the module's docstring."""
    run_id = new_run_id()
    lock = run_lock(settings, redis)
    if not dry_run and not lock.acquire(run_id):
        finalize_stale(settings, redis)  # a holder that died: end its run now
        if not lock.acquire(run_id):
            message = f"already running: run {lock.holder()} holds the lock; this {trigger} does nothing"
            log.info(message)
            return Pruned("already-running", lock.holder(), message)
    try:
        found, skipped, asked = _judge(settings, redis, targets, send_inventory)
        missed = _missed(skipped, asked, targets)
        if dry_run:
            going = sum(verdict.remove for verdict in found)
            return Pruned("dry-run", None, f"would remove {going} images and keep {len(found) - going}",
                          found, skipped, missed)
        for node, reason in skipped.items():
            log.warning("prune %s: node %s skipped: %s", run_id, node, reason)
        if not found:
            lock.release(run_id)
            message = "prune: nothing to remove: no node holds a retired image" + (
                f" ({len(skipped)} nodes skipped)" if skipped else "")
            log.info(message)
            return Pruned("nothing-to-do", None, message, found, skipped, missed)
        store = run_store(settings, redis)
        store.create(run_id, trigger=trigger, pulls=[(v.node, v.image) for v in found], skipped=skipped,
                     drift=[], refused=[], wanted=0)
        log.info("prune %s started by %s: %d retired images on %d nodes", run_id, trigger, len(found),
                 len({verdict.node for verdict in found}))
        _remove_all(settings, redis, run_id, found)
    except BaseException as exc:
        # the lock must not outlive this failure; what was recorded stays
        try:
            store = run_store(settings, redis)
            if store.abandon(run_id, f"prune failed: {one_line(str(exc))}", force=True):
                _write_summary(store.get(run_id))
        finally:
            lock.release(run_id)
        raise
    run = run_store(settings, redis).get(run_id, with_results=False)
    counts = ", ".join(f"{n} {status}" for status, n in (run.counts if run else {}).items())
    return Pruned("done", run_id, f"prune {run_id}: {counts or 'nothing reported'}", found, skipped, missed)


def _judge(settings: Settings, redis: Redis, targets: Iterable[str] | None,
           send_inventory: SendInventory | None) -> tuple[list[Verdict], dict[str, str], list[str]]:
    """Every node's images and containers, judged: the verdicts, the nodes skipped and why,
    and the nodes asked."""
    inventory = survey(settings, redis, send_inventory)
    chosen = None if targets is None else set(targets)
    skipped = {node: reason for node, reason in inventory.unreachable.items() if chosen is None or node in chosen}
    configured = {node.name: node for node in settings.nodes}
    nodes = []
    for name in sorted(inventory.images):
        if chosen is not None and name not in chosen:
            continue
        if name not in configured:
            skipped[name] = "an agent's node: prune removes images only from the nodes of the configuration"
            continue
        nodes.append(configured[name])
    rules = rules_for(settings, redis, [node.name for node in nodes])
    found: list[Verdict] = []
    asked = []
    for node, containers in zip(nodes, _in_parallel(settings, nodes, _containers), strict=True):
        if isinstance(containers, str):
            skipped[node.name] = containers
            continue
        asked.append(node.name)
        found += verdicts(node.name, inventory.images[node.name], rules, containers)
    return found, skipped, asked


def _containers(settings: Settings, node: Node) -> removal.Containers | str:
    """What the containers of ``node`` use, or why the node could not say."""
    try:
        result = transport_for(settings, node).run(removal.containers_command(node, int(LIST_TIMEOUT)),
                                                   timeout=LIST_TIMEOUT + KILL_AFTER + SSH_GRACE)
        return removal.parse_containers(node, result.stdout)
    except (NodeError, ValueError) as exc:
        return f"cannot tell which images its containers use ({one_line(str(exc))}): nothing removed"


def _in_parallel(settings: Settings, nodes: list[Node], call) -> list:  # type: ignore[no-untyped-def]
    """``call(settings, node)`` for every node at once (up to MAX_NODES_AT_ONCE), in order."""
    if not nodes:
        return []
    with ThreadPoolExecutor(max_workers=min(len(nodes), MAX_NODES_AT_ONCE)) as pool:
        return list(pool.map(lambda node: call(settings, node), nodes))


def _missed(skipped: dict[str, str], asked: list[str], targets: Iterable[str] | None) -> dict[str, str]:
    """The skipped nodes a prune was meant for, as a run counts them: the nodes named, or every
    node when it could ask none. Such a prune has failed."""
    if targets is not None:
        return {node: skipped[node] for node in targets if node in skipped}
    return {} if asked else dict(skipped)


def _remove_all(settings: Settings, redis: Redis, run_id: str, found: list[Verdict]) -> None:
    """Record every verdict: the images kept at once, the removals node by node, every node at once."""
    by_node: dict[str, list[Verdict]] = {}
    for verdict in found:
        if verdict.remove:
            by_node.setdefault(verdict.node, []).append(verdict)
        else:
            finish(settings, redis, run_id, Outcome(verdict.node, verdict.image, KEPT, reason=verdict.reason))
    nodes = [settings.node(name) for name in sorted(by_node)]

    def remove_on(settings: Settings, node: Node) -> None:
        for verdict in by_node[node.name]:
            finish(settings, redis, run_id, remove(settings, node, verdict), _names(verdict.held))

    _in_parallel(settings, nodes, remove_on)


def _names(image: Image) -> list[str]:
    """Every name of ``image``, normalized, as the plan holds them."""
    found = []
    for name in (*image.tags, *image.digests):
        try:
            found.append(references.normalize(name))
        except RefusedReference:
            continue
    return found


def remove(settings: Settings, node: Node, verdict: Verdict) -> Outcome:
    """Remove one retired image from ``node``, unless a container has come to use it meanwhile."""
    began = time.monotonic()
    image: Image = verdict.held
    try:
        result = transport_for(settings, node).run(removal.remove_command(node, image, int(LIST_TIMEOUT)),
                                                   timeout=LIST_TIMEOUT + KILL_AFTER + SSH_GRACE)
        did, detail = removal.read_removal(result)
    except (NodeError, RefusedReference) as exc:
        did, detail = removal.FAILED, one_line(str(exc))
    took = time.monotonic() - began
    if did == removal.REMOVED:
        return Outcome(node.name, verdict.image, REMOVED, took, reason=verdict.reason)
    if did == removal.IN_USE:
        return Outcome(node.name, verdict.image, KEPT, took, reason=f"in use by a container (it names {detail})")
    if did == removal.RENAMED:
        return Outcome(node.name, verdict.image, KEPT, took, reason=f"it was named {detail} since it was judged")
    if did == removal.UNLISTED:
        return Outcome(node.name, verdict.image, FAILED, took,
                       reason="its containers could not be listed again just before the removal: nothing removed")
    if did == removal.TIMED_OUT:
        return Outcome(node.name, verdict.image, TIMED_OUT, took, reason=detail)
    return Outcome(node.name, verdict.image, FAILED, took, reason=detail)


def finish(settings: Settings, redis: Redis, run_id: str, outcome: Outcome, names: Iterable[str] = ()) -> None:
    """Record one outcome of a prune: the run record first, then its log lines, and the summary
    when it completed the run (which released the lock); ``names``: every name of an image removed."""
    store = run_store(settings, redis)
    state = store.record(run_id, outcome)
    names = list(names)
    if outcome.status == REMOVED and names:
        # the node no longer holds it, on purpose: the next run must not take it for evicted (planning.room)
        redis.srem(keys.node_held(outcome.node), *names)
    try:
        logs.record_prune(settings.log_dir, run_id, outcome)
    except OSError as exc:
        logs.report_unwritable(settings.log_dir, exc)
    log.log(logging.WARNING if outcome.failed else logging.INFO, "prune %s: %s: %s %s%s", run_id, outcome.node,
            outcome.image, outcome.describe(), f": {outcome.reason}" if outcome.reason else "")
    if state == 2:
        _write_summary(store.get(run_id))


def summary_lines(run: Run) -> list[str]:
    """A prune's summary as log lines: one for the whole, then one per node skipped, per image
    kept or not removed, and per node the count removed (each image removed is in pruned_images.log)."""
    return [line for _, line in _summary(run)]


def _summary(run: Run) -> list[tuple[int, str]]:
    """The summary's lines, each with its log level: a warning for what went wrong."""
    counts = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in run.counts.items()) or "nothing reported"
    whole = (f"prune {run.id} {run.status} in {run.duration:.1f} s: {run.expected} retired images; {counts}"
             + (f" ({run.reason})" if run.reason else ""))
    lines = [(logging.WARNING if run.failures or run.status != COMPLETED else logging.INFO, whole)]
    lines += [(logging.WARNING, f"prune {run.id}: node {node} skipped: {reason}")
              for node, reason in run.skipped.items()]
    lines += [(logging.WARNING if o.failed else logging.INFO,
               f"prune {run.id}: {o.node}: {o.image} {o.describe()}: {o.reason}")
              for o in run.results if o.status != REMOVED]
    removed = Counter(o.node for o in run.results if o.status == REMOVED)
    lines += [(logging.INFO, f"prune {run.id}: {node}: {n} removed") for node, n in sorted(removed.items())]
    return lines


def _write_summary(run: Run | None) -> None:
    if run is None:
        return
    for level, line in _summary(run):
        log.log(level, line)
