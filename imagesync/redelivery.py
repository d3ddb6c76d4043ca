"""Take back, at a node worker's start, the pulls its dead predecessor held.

A pull is acknowledged only when it has reported. Until then kombu's Redis
transport keeps it in its ``unacked`` hash, and hands it out again only after
the visibility timeout (``time_out + 335`` s), longer than a run may go
without progress: a worker that died outright (its main process killed, the
host rebooted) would cost its run.

Each node queue is served by exactly one worker, by design. So a node worker
that starts knows that the unacknowledged messages of its own queue, taken
before it started, belong to no live worker, and puts them back at the head of
the queue at once, marked redelivered (the pull then asks the node first).
If a second worker for the same node does run, a pull it is running may run
twice: harmless, since pulls are idempotent and a run counts each pull once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from typing import Any

from .redisvalues import as_text

log = logging.getLogger("imagesync")


def take_back(channel: Any, queues: Collection[str], before: float) -> list[str]:
    """Restore the unacknowledged messages of ``queues`` delivered before ``before``.

    ``channel`` is a kombu Redis channel; returns the delivery tags restored.
    Messages delivered since ``before`` are this worker's own and stay.
    """
    qos = channel.qos
    client = channel.client
    restored = []
    for tag, raw in client.hgetall(qos.unacked_key).items():
        try:
            _message, _exchange, routing_key = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if routing_key not in queues:
            continue
        delivered = client.zscore(qos.unacked_index_key, tag)
        if delivered is None or delivered >= before:
            continue
        # one transaction (WATCH on the hash): a message restored by someone
        # else in between is not restored twice
        # kombu publishes with LPUSH and consumes with BRPOP: the right end is the
        # head of the queue, where rpush (leftmost=False) puts the message
        qos.restore_by_tag(tag, leftmost=False)
        restored.append(as_text(tag))
    return restored
