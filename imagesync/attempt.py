"""What every source of a pull is given and may answer: the interface between the pull,
which walks a route (:mod:`imagesync.pulls`), and the sources it walks (the registry,
the backup registry, the nodes that hold the image)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .outcomes import Outcome
from .planning.plan import DEFAULT_ROUTE, Route

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
    #: seconds of ``time_out`` this attempt spent before this delivery, back in its queue
    #: waiting for a holder (:class:`WaitForHolder`): the wait does not renew the budget
    spent: float = 0.0
    #: whether the task can put the pull back in its queue for a while (:class:`WaitForHolder`);
    #: without it, a source that waits does so in this process
    requeue: bool = False

    def elapsed(self) -> float:
        """Seconds of ``time_out`` this attempt has spent, its earlier waits in the queue included."""
        return self.spent + time.monotonic() - self.started

    def remaining(self) -> int:
        """Whole seconds left of ``time_out`` for the sources still to try."""
        return int(self.settings.time_out - self.elapsed())

    def outcome(self, status: str, reason: str = "", source: str = "") -> Outcome:
        return Outcome(self.node.name, self.image, status, round(self.elapsed(), 3), reason, source=source)


#: a source: (outcome, whether a retry may help)
Fetch = Callable[[Attempt], tuple[Outcome, bool]]


class NodeFailed(Exception):
    """A source failed because the node itself did: unreachable, no runtime, its runtime
    down, the connection dropped. No other source can do better: the route ends there."""

    def __init__(self, outcome: Outcome, transient: bool) -> None:
        super().__init__(outcome.reason)
        self.outcome, self.transient = outcome, transient


class WaitForHolder(Exception):
    """A source that can only wait for now (a copy whose image no node can serve yet): the
    task puts the pull back in its queue for ``delay`` seconds, counting no attempt, rather
    than hold its pool process, and its node's slot, while it waits.

    ``began`` is when the attempt's ``time_out`` began (wall clock, like a pull's
    deadline): the next delivery resumes with what is left of it (:func:`spent_since`).
    """

    def __init__(self, delay: float, began: float, reason: str) -> None:
        super().__init__(reason)
        self.delay, self.began, self.reason = delay, began, reason


def spent_since(began: float | None, now: float | None = None) -> float:
    """Seconds of ``time_out`` already spent by a pull put back to wait, which began at ``began``."""
    if began is None:
        return 0.0
    return max(0.0, (time.time() if now is None else now) - began)
