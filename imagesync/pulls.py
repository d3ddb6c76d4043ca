"""One pull of one image onto one node: one command on the node, one SSH round trip.

A pull on its first delivery was planned from an inventory taken seconds
earlier, so it just pulls: pulling an image that is already there is harmless
(the runtime only resolves the manifest again). A pull that may be stale, because
it was redelivered after a worker died, retried, or waited long in its queue,
is *checked*: the same node-side command first asks the runtime about the one
image and pulls only if the node lacks it, reporting "present" otherwise.

Either way the command runs under the node's own ``timeout``, and the SSH
command gets a little longer than that, so the node-side process is always the
first to stop, and the task's time limits cover the whole command.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import references, runtimes
from .errors import CommandTimedOut, NodeError, RefusedReference
from .inventory import runtime_missing
from .runs import FAILED, PRESENT, PULLED, TIMED_OUT, Outcome
from .transport import transport_for

if TYPE_CHECKING:
    from .config import Node, Settings

#: seconds the SSH command may run past the node-side timeout before we give up on it
SSH_GRACE = 10
#: seconds after its run started within which a first-delivery pull trusts the
#: run's inventory and pulls without asking the node first
FRESH_PLAN = 120.0


def needs_check(retries: int, redelivered: bool, run_started: float | None, now: float | None = None) -> bool:
    """Whether a pull must ask the node first whether it already holds the image.

    A first delivery, soon after its run's inventory, trusts it and just pulls:
    one node-side process instead of two. A retry, a redelivery (a worker died
    under it) or a pull that waited long in its queue may find the image
    already there, and then reports "present" rather than pulling again.
    """
    if retries or redelivered or run_started is None:
        return True
    return (now or time.time()) - run_started > FRESH_PLAN


def pull_image(settings: Settings, node: Node, image: str, check: bool = True) -> tuple[Outcome, bool]:
    """Bring ``image`` onto ``node``; returns the outcome and whether a retry may help.

    With ``check``, a node that already holds the image is reported "present"
    and nothing is pulled; without it, such a pull reports "pulled" (neither
    crictl nor ctr tells a fresh pull from one of a present image).
    """
    started = time.monotonic()

    def outcome(status: str, reason: str = "") -> Outcome:
        return Outcome(node.name, image, status, round(time.monotonic() - started, 3), reason)

    try:
        image = references.normalize(image)
    except RefusedReference as exc:
        # Only a forged or corrupt message gets here. The name goes on into log
        # lines and the run record, so as the plan shows refusals: cut and escaped.
        image = repr(exc.reference)
        return outcome(FAILED, f"refused: {exc.reason}"), False
    runtime = runtimes.for_node(node)
    try:
        login = settings.login_for(references.parse(image).domain)
        command = runtime.pull_command(image, settings.time_out, login, check=check)
        result = transport_for(settings, node).run(
            command.command, timeout=command.seconds + runtimes.KILL_AFTER + SSH_GRACE
        )
    except CommandTimedOut as exc:
        return outcome(TIMED_OUT, exc.message), False
    except NodeError as exc:
        return outcome(FAILED, exc.message), exc.transient
    if runtimes.found_present(result):
        return outcome(PRESENT), False
    if result.ok:
        return outcome(PULLED), False
    if result.exit_code in runtimes.TIMEOUT_EXIT_CODES:
        reason = f"pull did not finish within time_out ({settings.time_out} s); stopped on the node"
        return outcome(TIMED_OUT, reason), False
    if result.exit_code == runtimes.COMMAND_NOT_FOUND:
        return outcome(FAILED, runtime_missing(node.name, runtime.name).message), False
    if result.exit_code < 0:
        # No exit status: over SSH (-1) the connection dropped under the pull or
        # the pull died of a signal; locally, -N is death by signal N. The
        # runtime said nothing, so only another attempt can tell more.
        reason = f"the pull on {node.name} ended without an exit status: the connection dropped or the node killed it"
        return outcome(FAILED, reason), True
    reason = runtimes.failure_reason(result.stderr, result.stdout)
    return outcome(FAILED, reason), runtimes.is_transient(reason)
