"""The disk guard: never push a node's image filesystem below ``min_free``, and
stop fighting the node's own image garbage collection.

Two planner conditions (see :func:`imagesync.policy.policy_for`), applied in
this order:

* :func:`evictions` finds the images a node held at the end of the previous
  run and lacks now (imagesync removes one only in a prune, which it does not
  count here: the node did, most likely the kubelet's image GC), and keeps an image that was evicted twice in
  a row off that node until its image filesystem has more room.
* :func:`room` sends a node only the pulls that leave at least ``min_free`` of
  its image filesystem free, counting the room promised to the pulls before it
  in the same run.

What a pull costs on disk. The runtimes report an image's *content* size
(``crictl images``' size, ``ctr images ls``' SIZE: the compressed blobs). A
pull keeps that content and unpacks every layer beside it: with the
overlayfs snapshotter the uncompressed layers, with the native snapshotter a
full copy of each layer on top of its parents. Measured on the test cluster
(containerd 1.6, native snapshotter, layers that do not compress), a pull
took 2.04x the reported size for one layer, 2.50x for two and 3.56x for four.
Layers of real images unpack to about 2 to 3 times their gzip'd size, which
makes content plus overlayfs about 3 to 4 times. :data:`ON_DISK` (3x) is the
estimate; ``min_free`` is the margin for the rest.

What each node held at the end of the last run is kept in Redis
(:func:`imagesync.keys.node_held`): the run's inventory, plus every image one
of its pulls brought. :func:`remember` writes it when a run starts (never
for ``imagesync plan`` or ``status``), :func:`pulled` when a pull succeeds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import keys, references
from ..errors import RefusedReference
from ..redisvalues import as_text
from ..sizes import MinFree, human
from .plan import SKIPPED, Plan

if TYPE_CHECKING:
    from redis import Redis

    from ..config import Settings
    from ..outcomes import Outcome

#: bytes a pull costs on the node's disk, per byte of the image's reported (content) size
ON_DISK = 3
#: evictions in a row after which an image is not pulled again until the node has more room
EVICTIONS_TO_STOP = 2
#: without the image's size, "more room" means this share of the filesystem more free
GROWTH_WITHOUT_SIZE = 0.05

def needs(plan: Plan, image: str) -> int | None:
    """The estimated bytes a pull of ``image`` costs on disk; None when no node reports its size."""
    size = plan.sizes.get(image)
    return size * ON_DISK if size else None


def pull_order(plan: Plan, images: Iterable[str], declared: frozenset[str]) -> list[str]:
    """The order in which a node's pulls get room: declared images first, then the
    rest; within each, smallest first, and those of unknown size last.

    Declared images come first because the operator named them; the union is
    best effort. Smallest first then fits the most images into what is left
    (for one capacity, taking the smallest first maximizes the count).
    """
    def key(image: str) -> tuple[bool, bool, int, str]:
        cost = needs(plan, image)
        return (image not in declared, cost is None, cost or 0, image)

    return sorted(images, key=key)


def room(min_free: MinFree, declared: Iterable[str] = ()) -> Callable[[Plan], None]:
    """The condition: per node, the pulls that would leave less than ``min_free``
    are skipped, with the figures. A node whose image filesystem is unknown is
    not guarded (``imagesync check`` says so)."""
    wanted_first = references.normalized(declared)

    def condition(plan: Plan) -> None:
        for node in list(plan.missing):
            facts = plan.facts.get(node)
            if facts is None or facts.disk_total is None or facts.disk_free is None:
                continue
            keep = min_free.bytes_of(facts.disk_total)
            order = pull_order(plan, plan.missing[node], wanted_first)
            plan.missing[node] = list(order)
            promised = 0
            for image in order:
                cost = needs(plan, image)
                left = facts.disk_free - promised - (cost or 0)
                if left >= keep:
                    promised += cost or 0
                    continue
                earlier = f", {human(promised)} of it promised to earlier pulls of this run" if promised else ""
                if cost is None:
                    what = "size unknown (no node reports it) and the node is already below min_free"
                else:
                    what = f"needs ~{human(cost)} ({ON_DISK}x its {human(plan.sizes[image])})"
                plan.exclude(node, image, SKIPPED,
                             f"not enough room: {what}; {human(facts.disk_free)} free of {human(facts.disk_total)}"
                             f"{earlier}; min_free {min_free} = {human(keep)}")

    return condition


@dataclass
class Memory:
    """What earlier runs left in Redis: per node, what it held at the end of the
    last run, and the images it evicted in a row (image -> count and the free
    bytes when the last eviction was seen)."""

    held: dict[str, set[str]] = field(default_factory=dict)
    evictions: dict[str, dict[str, dict]] = field(default_factory=dict)

    @classmethod
    def load(cls, redis: Redis, nodes: Iterable[str]) -> Memory:
        nodes = list(nodes)
        with redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.smembers(keys.node_held(node))
                pipe.hgetall(keys.node_evictions(node))
            answers = pipe.execute()
        memory = cls()
        for node, held, evicted in zip(nodes, answers[::2], answers[1::2], strict=True):
            memory.held[node] = {as_text(ref) for ref in held}
            memory.evictions[node] = {as_text(ref): json.loads(as_text(value)) for ref, value in evicted.items()}
        return memory


def evictions(memory: Memory, in_scope: Callable[[Plan, str], bool]) -> Callable[[Plan], None]:
    """The condition: record in ``plan.evicted`` what each node held at the end
    of the last run and lacks now; skip the images a node evicted
    ``EVICTIONS_TO_STOP`` times in a row, until its free space has grown."""

    def condition(plan: Plan) -> None:
        for node in plan.holdings:
            before = memory.held.get(node, set())
            gone = sorted(ref for ref in before if in_scope(plan, ref) and not plan.held(node, ref)[0])
            if gone:
                plan.evicted[node] = gone
            facts = plan.facts.get(node)
            free = facts.disk_free if facts else None
            if free is None:
                continue  # whether room grew cannot be told: the node is not guarded
            for image in list(plan.missing.get(node, [])):
                seen = memory.evictions.get(node, {}).get(image, {})
                count = int(seen.get("count", 0)) + (image in gone)
                if count < EVICTIONS_TO_STOP:
                    continue
                then = free if image in gone else seen.get("free")
                more = needs(plan, image)
                if more is None and facts is not None and facts.disk_total:
                    more = int(facts.disk_total * GROWTH_WITHOUT_SIZE)
                if then is None or free >= then + (more or 0):
                    continue  # the node has more room now (or it was not known then): try again
                figures = f"free now {human(free)}, at the last eviction {human(then)}, needs {human(more or 0)} more"
                plan.exclude(node, image, SKIPPED,
                             f"evicted by the node {count} times in a row (likely the kubelet's image GC): "
                             f"not pulled again until its image filesystem has more room ({figures})")

    return condition


def configured(prefixes: Iterable[str], declared: Iterable[str]) -> Callable[[Plan, str], bool]:
    """Scope of a full run: an image counts when it is still wanted, or lies
    under a configured prefix or among the declared images."""
    prefixes = tuple(prefixes)
    exact = references.normalized(declared)

    def in_scope(plan: Plan, ref: str) -> bool:
        if ref in exact or ref in plan.wanted:
            return True
        try:
            return references.matches_any(references.parse(ref), prefixes)
        except RefusedReference:
            return False

    return in_scope


def only_wanted(plan: Plan, ref: str) -> bool:
    """Scope of a run limited to some images: the others were not asked about."""
    return ref in plan.wanted


def scope_for(settings: Settings, limited: bool = False) -> Callable[[Plan, str], bool]:
    """Which images a run with ``settings`` can tell evicted: all it syncs, or, for a
    run limited to some images, those alone."""
    return only_wanted if limited else configured(settings.prefixes, settings.declared_images())


def conditions_for(settings: Settings, redis: Redis | None, limited: bool = False,
                   nodes: Iterable[str] = ()) -> list[Callable[[Plan], None]]:
    """The disk guard's conditions: evictions (with what Redis remembers of ``nodes``,
    every node a run may target), then room."""
    found: list[Callable[[Plan], None]] = []
    if redis is not None:
        memory = Memory.load(redis, list(nodes))
        found.append(evictions(memory, scope_for(settings, limited)))
    found.append(room(MinFree.parse(settings.min_free), settings.declared_images()))
    return found


def remember(redis: Redis, plan: Plan, in_scope: Callable[[Plan, str], bool]) -> None:
    """At a run's start: count the evictions ``plan`` found, forget those of images a
    node kept, and store what each node holds now (within the run's scope)."""
    nodes = sorted(plan.holdings)
    memory = Memory.load(redis, nodes)
    with redis.pipeline() as pipe:
        for node in nodes:
            before = memory.held.get(node, set())
            now = {ref for ref in plan.holdings[node] if in_scope(plan, ref)}
            facts = plan.facts.get(node)
            for image in plan.evicted.get(node, []):
                seen = memory.evictions.get(node, {}).get(image, {})
                record = {"count": int(seen.get("count", 0)) + 1, "free": facts.disk_free if facts else None}
                pipe.hset(keys.node_evictions(node), image, json.dumps(record))
            kept = [ref for ref in before if ref in now]
            if kept:
                pipe.hdel(keys.node_evictions(node), *kept)
            stale = [ref for ref in before if in_scope(plan, ref) and ref not in now]
            if stale:
                pipe.srem(keys.node_held(node), *stale)
            if now:
                pipe.sadd(keys.node_held(node), *now)
        pipe.execute()


def pulled(redis: Redis, outcome: Outcome) -> None:
    """A pull that brought its image: the node holds it at the end of this run."""
    if outcome.succeeded:
        redis.sadd(keys.node_held(outcome.node), outcome.image)




def evicted_lines(evicted: Mapping[str, Iterable[str]]) -> list[str]:
    """``evicted by node-2: IMAGE (...)``: one line per image, as notes and summaries say it."""
    return [f"evicted by {node}: {image} (held at the end of the last run, gone now; "
            "not by a prune: likely the kubelet's image GC)"
            for node, images in sorted(evicted.items()) for image in images]
