"""Getting one image onto one node, from the sources its route names, in order.

:func:`get_image` follows the plan's :class:`~imagesync.planning.plan.Route`: the
registry (one command on the node, one SSH round trip), then, when the
registry cannot serve the image, the backup registry and the nodes that hold
it. All of them share one budget, ``time_out``: it bounds getting the image,
whatever was tried. A source that fails for good hands over to the next; one
that may succeed if tried again makes the task retry first (the whole route),
and only on the last attempt hands over. A copy that waits for a holder may send
the pull back to its queue meanwhile (:class:`~imagesync.attempt.WaitForHolder`),
only as the route's first source, so that no source is tried twice; its
``time_out`` goes on through the wait.

A pull on its first delivery was planned from an inventory taken seconds
earlier, so it just pulls: pulling an image that is already there is harmless
(the runtime only resolves the manifest again). A pull that may be stale, because
it was redelivered after a worker died, retried, or waited long in its queue,
is *checked*: the same node-side command first asks the runtime about the one
image and pulls only if the node lacks it, reporting "present" otherwise.

A route that names a moved tag (``replaces``: the node holds the tag under the
digest its registry has moved from, and ``digest``, the one it names now) is
checked against the new digest: the node holds the name, so a check by name
alone would find it and fetch nothing. Its outcome, when a source brought the
image, is "updated", naming both digests.

Either way the command runs under the node's own ``timeout``, and the SSH
command gets a little longer than that, so the node-side process is always the
first to stop, and the task's time limits cover the whole command.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from . import references, runtimes
from .attempt import Attempt, Fetch, NodeFailed
from .budgets import KILL_AFTER, SSH_GRACE
from .errors import CommandTimedOut, NodeError, RefusedReference
from .inventory import runtime_missing
from .outcomes import COPIED, FAILED, NOT_APPLICABLE, PRESENT, PULLED, RESTORED, TIMED_OUT, UPDATED, Outcome
from .planning.plan import BACKUP, PEERS, REGISTRY
from .planning.platforms import node_platform, record_failed_pull
from .restore import from_backup
from .transfer import from_peers, note_holder
from .transport import PROGRESS_TAIL, transport_for

if TYPE_CHECKING:

    from .config import Node, Settings

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


#: seconds of ``time_out`` below which the next source is not tried
MIN_SOURCE_SECONDS = 1
#: what a runtime says when an image has nothing for the node's platform
NO_PLATFORM = re.compile(r"no match for platform", re.IGNORECASE)
#: the node's own trouble, whatever the source: a runtime that does not answer its
#: own socket (containerd stopped or restarting), a full disk
NODE_SIDE = re.compile(r"code = unavailable|no space left on device", re.IGNORECASE)


def fetcher(source: str) -> Fetch:
    """The function that gets an image from ``source``."""
    try:
        return SOURCES[source]
    except KeyError:
        raise ValueError(f"unknown source {source!r}") from None


def get_image(attempt: Attempt) -> tuple[Outcome, bool]:
    """Bring the image onto the node from the sources of its route; the outcome and
    whether retrying the task may help.

    A source that fails hands over to the next one if the failure is for good,
    or if it might pass later but this is the task's last attempt. Timed out,
    "not applicable" and a failure of the node itself (:class:`NodeFailed`) end
    the route: the budget is spent, no source can give the node an image that
    has nothing for its platform, or none can reach a node that is down.
    """
    tried: list[str] = []  # what each source that handed over answered
    outcome, transient = attempt.outcome(FAILED, "no source to try"), False
    for source in attempt.route.sources:
        if tried and attempt.remaining() < MIN_SOURCE_SECONDS:
            budget = f"time_out ({attempt.settings.time_out} s) spent before {source} could be tried"
            outcome, transient = attempt.outcome(TIMED_OUT, budget), False
            break
        if tried:
            # only the first source may send the pull back to its queue to wait: those
            # before it would be tried again when it comes back
            attempt = replace(attempt, requeue=False)
        try:
            outcome, transient = fetcher(source)(attempt)
        except NodeFailed as exc:
            outcome, transient = exc.outcome, exc.transient
            break
        if outcome.status != FAILED or (transient and not attempt.last):
            break
        tried.append(f"{source}: {outcome.reason}")
    else:
        if len(tried) > 1:
            outcome.reason = "; ".join(tried)
        tried = []
    if tried:
        outcome.reason = "; ".join([*tried, outcome.reason] if outcome.reason else tried)
    outcome.duration = round(attempt.elapsed(), 3)
    if attempt.route.replaces and outcome.status in (PULLED, COPIED, RESTORED):
        outcome.status, outcome.replaced, outcome.digest = UPDATED, attempt.route.replaces, attempt.route.digest or ""
    note_holder(attempt, outcome)
    return outcome, transient


def pull_image(settings: Settings, node: Node, image: str, check: bool = True) -> tuple[Outcome, bool]:
    """Pull ``image`` onto ``node`` from its registry; see :func:`from_registry`."""
    try:
        return from_registry(Attempt(settings, node, image, check=check))
    except NodeFailed as exc:
        return exc.outcome, exc.transient


def from_registry(attempt: Attempt) -> tuple[Outcome, bool]:
    """Pull the image from its registry; returns the outcome and whether a retry may help.
    Raises :class:`NodeFailed` when the node, not the registry, is what failed.

    With ``check``, a node that already holds the image is reported "present"
    and nothing is pulled; without it, such a pull reports "pulled" (neither
    crictl nor ctr tells a fresh pull from one of a present image).
    """
    settings, node, image, check = attempt.settings, attempt.node, attempt.image, attempt.check
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
    target = attempt.route.pull_as or image
    seconds = max(1, min(settings.time_out, attempt.remaining()))
    try:
        login = settings.login_for(references.parse(target).domain)
        # a configured platform is the one to pull (ctr --platform); a per-architecture
        # reference is also named as the entry's ref where the runtime can tag
        command = runtime.pull_command(target, seconds, login, check=check, platform=node.platform,
                                       also_as=image if attempt.route.pull_as else None,
                                       pin=attempt.route.pin, expect=_expected(attempt))
        result = transport_for(settings, node).run(
            command.command, timeout=command.seconds + KILL_AFTER + SSH_GRACE, tail=PROGRESS_TAIL
        )
    except CommandTimedOut as exc:
        return outcome(TIMED_OUT, exc.message), False
    except NodeError as exc:
        raise NodeFailed(outcome(FAILED, exc.message), exc.transient) from exc
    if runtimes.found_present(result):
        return outcome(PRESENT), False
    if result.ok:
        return outcome(PULLED), False
    if result.exit_code in runtimes.TIMEOUT_EXIT_CODES:
        reason = f"pull did not finish within time_out ({settings.time_out} s); stopped on the node"
        return outcome(TIMED_OUT, reason), False
    if result.exit_code == runtimes.COMMAND_NOT_FOUND:
        raise NodeFailed(outcome(FAILED, runtime_missing(node.name, runtime.name).message), False)
    if result.exit_code < 0:
        # No exit status: over SSH (-1) the connection dropped under the pull or
        # the pull died of a signal; locally, -N is death by signal N. The
        # runtime said nothing, so only another attempt can tell more.
        reason = f"the pull on {node.name} ended without an exit status: the connection dropped or the node killed it"
        raise NodeFailed(outcome(FAILED, reason), True)
    reason = runtimes.failure_reason(result.stderr, result.stdout)
    if NODE_SIDE.search(reason):
        raise NodeFailed(outcome(FAILED, reason), runtimes.is_transient(reason))
    if NO_PLATFORM.search(reason):
        _keep_platform_verdict(attempt, reason)
        return outcome(NOT_APPLICABLE, reason), False
    return outcome(FAILED, reason), runtimes.is_transient(reason)


def _expected(attempt: Attempt) -> str | None:
    """The digest a checked pull must find the node holding the image under to call it present:
    a moved tag's new one (the node holds its name under the old one); else None, any will do."""
    return attempt.route.digest if attempt.route.replaces and attempt.route.digest else None


#: every source a route may name, and the function that gets an image from it
SOURCES: dict[str, Fetch] = {REGISTRY: from_registry, BACKUP: from_backup, PEERS: from_peers}


def _keep_platform_verdict(attempt: Attempt, reason: str) -> None:
    """Remember that the digest this pull judged has nothing for the node's platform, so
    that the next plan leaves it off such nodes (imagesync.planning.platforms). The platform is
    the route's or the node's setting, else one ``uname -m`` on the node: this is rare."""
    platform = attempt.route.platform or attempt.node.platform
    if platform is None and attempt.redis is not None:
        try:
            answer = transport_for(attempt.settings, attempt.node).run("uname -m", timeout=15)
            platform = node_platform(None, answer.stdout.strip() if answer.ok else None)
        except NodeError:
            return
    record_failed_pull(attempt.redis, reason, platform)
