"""Time budgets: how long each step may take, and the deadlines derived from ``time_out``.

Every bound that another bound is computed from lives here, so that the chain
(node-side ``timeout`` < SSH command < task time limit < visibility timeout;
one pull < a run's stale window < a queued pull's expiry) can be read in one place.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings

#: seconds between timeout's TERM and its KILL of a node-side command that ignores TERM
KILL_AFTER = 5
#: seconds the SSH command may run past the node-side timeout before we give up on it
SSH_GRACE = 10
#: seconds a node may take to list its images
LIST_TIMEOUT = 60.0
#: seconds the sync task may take: inventory (bounded by its own timeout) and fan-out
SYNC_TIME_LIMIT = 900
#: how often beat looks for runs that stopped making progress
FINALIZE_EVERY = 30.0
#: seconds without any pull reporting after which a run counts as stuck, beyond time_out
STALE_MARGIN = 60


def stale_after(settings: Settings) -> int:
    """Seconds a run may go without progress: one full pull, its kill grace and a margin."""
    return int(settings.time_out + KILL_AFTER + STALE_MARGIN)


def pull_expiry(settings: Settings, pulls_on_node: int) -> float:
    """Seconds a queued pull stays worth running: the node's whole queue at worst, plus a margin.

    Redis has no message TTL; without ``expires`` the pulls of a node whose
    worker is gone would wait for it forever.
    """
    rounds = math.ceil(pulls_on_node / settings.max_parallel)
    return rounds * (settings.time_out + KILL_AFTER) + stale_after(settings)


def pull_time_limits(settings: Settings) -> tuple[int, int]:
    """(soft, hard) limits of a pull task: after the node-side timeout and the SSH grace."""
    soft = settings.time_out + KILL_AFTER + SSH_GRACE + 5
    return soft, soft + 15
