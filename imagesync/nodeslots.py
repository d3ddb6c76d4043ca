"""The per-node limit of ``max_parallel`` pulls when one worker serves several nodes.

A worker of one node runs at most ``max_parallel`` pulls because that is its
concurrency. A worker shared by several nodes (``imagesync worker --nodes``)
has one pool for all of them, so each pull first takes a slot of its node's
semaphore (``imagesync.semaphore``, key ``keys.node_pulls(node)``), and gives
it back when the pull has reported.

A slot's lease lasts as long as the pull it stands for can possibly run on
the node: the task's hard time limit, plus a margin for the SSH connection.
The node-side ``timeout`` ends the pull within that time even if the worker
died under it, so a slot left by a dead worker is never free while the pull
it stands for may still run on the node; it is free again once that pull
cannot be running any more. No refresh is needed: nothing of a pull outlives
its hard limit.

A pull whose node is full waits a little in its pool process (a slot often
frees within a second or two), then goes back to its queue: a full node must
not hold the pool that the other nodes share. In a worker whose pool is
threads, a waiting pull wakes as soon as another thread of the worker gives
back a slot of its node, and otherwise looks at the slots once a second
(``THREAD_POLL``): slots freed by another process are rare there.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Collection

from redis import Redis
from redis.exceptions import RedisError

from . import keys
from .semaphore import Semaphore

log = logging.getLogger("imagesync")

#: seconds a slot's lease lasts beyond the pull task's hard time limit: the SSH
#: connection (connect_timeout, a jump host's too) before the node-side timeout starts
LEASE_MARGIN = 60.0
#: seconds a pull waits in its pool process for a slot of its node before it goes back to its queue
WAIT = 5.0
#: seconds between two looks at a full node's slots while waiting
POLL = 0.1
#: the same in a worker whose pool is threads, whose own slots' release wakes a waiting pull at once
THREAD_POLL = 1.0
#: seconds a pull that went back to its queue stays there before its next try (jittered)
REQUEUE_AFTER = (1.0, 3.0)


def shares_pool(queues: Collection[str], concurrency: int, max_parallel: int, node_prefix: str) -> bool:
    """Whether a worker consuming ``queues`` with ``concurrency`` processes needs node
    slots: it serves several node queues, or more than ``max_parallel`` of one."""
    nodes = [q for q in queues if q.startswith(node_prefix)]
    return len(nodes) > 1 or (len(nodes) == 1 and concurrency > max_parallel)


def default_concurrency(nodes: int, max_parallel: int, pool: str = "prefork") -> int:
    """Pool processes of a worker shared by ``nodes`` nodes: enough for every node to
    pull one image at once (a pushed image) and for one node to pull ``max_parallel``
    (a new node), never more than all of them at their limit.

    A thread costs little, so a pool of threads runs every node at its limit (full
    speed). Spare threads, holding each node's next pulls, made a fill no faster
    and cost a quarter more CPU per pull (bench/README.md, section 12)."""
    if pool == "threads":
        return nodes * max_parallel
    return min(nodes * max_parallel, max(nodes, max_parallel))


def requeue_delay() -> float:
    return round(random.uniform(*REQUEUE_AFTER), 2)


class _Freed:
    """How many slots of each node this process gave back; waiting threads wake on a change."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.changed = threading.Condition()

    def now(self, node: str) -> int:
        with self.changed:
            return self.count.get(node, 0)

    def gave_back(self, node: str) -> None:
        with self.changed:
            self.count[node] = self.count.get(node, 0) + 1
            self.changed.notify_all()

    def wait(self, node: str, since: int, seconds: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.count.get(node, 0) != since, seconds)


_freed = _Freed()


class NodeSlots:
    """``max_parallel`` slots per node, each leased for ``lease`` seconds at most; a full
    node is looked at again every ``poll`` seconds (jittered), and at once when this
    process gives one of its slots back (with ``sleep`` given, only every ``poll``)."""

    def __init__(self, redis: Redis, max_parallel: int, lease: float,
                 sleep: Callable[[float], None] | None = None, poll: float = POLL) -> None:
        self.redis = redis
        self.max_parallel = max_parallel
        self.lease = lease
        self.poll = poll
        self._sleep = sleep

    def semaphore(self, node: str) -> Semaphore:
        return Semaphore(self.redis, keys.node_pulls(node), self.max_parallel, self.lease)

    def take(self, node: str, pull_id: str, wait: float = WAIT) -> str | None:
        """A slot of ``node`` for the pull ``pull_id``, waiting up to ``wait`` seconds;
        returns its holder name (for ``give_back``), or None if the node stayed full.

        Each taking has its own holder name: a pull redelivered while a dead
        worker's copy of it may still run on the node takes a slot of its own.
        """
        semaphore = self.semaphore(node)
        holder = f"{pull_id}:{secrets.token_hex(4)}"
        give_up = time.monotonic() + wait
        while True:
            freed = _freed.now(node)
            if semaphore.acquire(holder):
                return holder
            if time.monotonic() >= give_up:
                return None
            pause = self.poll * random.uniform(0.5, 1.5)
            if self._sleep is not None:
                self._sleep(pause)
            else:
                _freed.wait(node, freed, min(pause, max(0.0, give_up - time.monotonic())))

    def give_back(self, node: str, holder: str) -> None:
        """Free the slot. Never raises: a slot that cannot be freed now (Redis down)
        frees itself when its lease runs out, and the pull's outcome must still be reported."""
        try:
            self.semaphore(node).release(holder)
            _freed.gave_back(node)
        except RedisError as exc:
            log.warning("%s: could not free pull slot %s (%s); it frees itself within %.0f s",
                        node, holder, exc, self.lease)
