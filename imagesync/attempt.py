"""What every source of a pull is given and may answer: the interface between the pull,
which walks a route (:mod:`imagesync.pulls`), and the sources it walks (the registry,
the backup registry, the nodes that hold the image)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .planning.plan import DEFAULT_ROUTE, Route
from .runs import Outcome

if TYPE_CHECKING:
    from redis import Redis

    from .config import Node, Settings


@dataclass
class Attempt:
    """One attempt at getting ``image`` onto ``node``: what every source is given."""

    settings: Settings
    node: Node
    image: str
    route: Route = DEFAULT_ROUTE
    run_id: str = ""
    #: ask the node first whether it holds the image (see pulls.needs_check)
    check: bool = True
    #: whether the task may still retry: a source that may succeed later then retries rather than hand over
    last: bool = True
    #: this process's Redis client, for sources that coordinate (None in a test of one source)
    redis: Redis | None = None
    started: float = field(default_factory=time.monotonic)

    def remaining(self) -> int:
        """Whole seconds left of ``time_out`` for the sources still to try."""
        return int(self.settings.time_out - (time.monotonic() - self.started))

    def outcome(self, status: str, reason: str = "", source: str = "") -> Outcome:
        return Outcome(self.node.name, self.image, status, round(time.monotonic() - self.started, 3),
                       reason, source=source)


#: a source: (outcome, whether a retry may help)
Fetch = Callable[[Attempt], tuple[Outcome, bool]]


class NodeFailed(Exception):
    """A source failed because the node itself did: unreachable, no runtime, its runtime
    down, the connection dropped. No other source can do better: the route ends there."""

    def __init__(self, outcome: Outcome, transient: bool) -> None:
        super().__init__(outcome.reason)
        self.outcome, self.transient = outcome, transient
