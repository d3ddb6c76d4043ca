"""One pull of one image onto one node.

A pull first asks the node whether it already holds the image, so that a pull
delivered twice (a worker died before acknowledging it) does no harm and is
reported as "present". The runtime then pulls under the node's own
``timeout``, and the SSH command gets a little longer than that, so the
node-side process is always the first to stop.
"""

from __future__ import annotations

import time

from . import references, runtimes
from .errors import CommandTimedOut, NodeError, RefusedReference
from .inventory import LIST_TIMEOUT, runtime_missing
from .runs import FAILED, PRESENT, PULLED, TIMED_OUT, Outcome
from .transport import transport_for

#: seconds the SSH command may run past the node-side timeout before we give up on it
SSH_GRACE = 10


def holds(settings, node, image: str) -> bool:  # type: ignore[no-untyped-def]
    """Whether ``node`` surely holds ``image`` (a normalized reference).

    One question about one image, not a listing of the node: a node with
    thousands of images answers as fast as one with ten. Anything but a
    clear yes means "pull": pulling what is there is harmless.
    """
    runtime = runtimes.for_node(node)
    result = transport_for(settings, node).run(runtime.presence_command(image), timeout=LIST_TIMEOUT)
    return runtime.is_present(result)


def pull_image(settings, node, image: str) -> tuple[Outcome, bool]:  # type: ignore[no-untyped-def]
    """Bring ``image`` onto ``node``; returns the outcome and whether a retry may help."""
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
        if holds(settings, node, image):
            return outcome(PRESENT), False
        login = settings.login_for(references.parse(image).domain)
        command = runtime.pull_command(image, settings.time_out, login)
        result = transport_for(settings, node).run(
            command.command, timeout=command.seconds + runtimes.KILL_AFTER + SSH_GRACE
        )
    except CommandTimedOut as exc:
        return outcome(TIMED_OUT, exc.message), False
    except NodeError as exc:
        return outcome(FAILED, exc.message), exc.transient
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
