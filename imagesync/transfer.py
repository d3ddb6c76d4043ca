"""Copying an image from a node that holds it: one idea under three names, the
``transfer`` setting that allows it, the ``peers`` source of a route that does
it, and the ``copied`` outcome of a pull it served.

The copy streams ``ctr images export`` on the source node into ``ctr images
import`` on the target, through this process: two commands, one per node
(two SSH channels, or a pipe for a node served locally), and one buffer of
:data:`CHUNK` bytes between them. A chunk is read from the source only once
the previous one is written to the target, and a write waits while the
target's SSH window is full, so a slow side slows the other and memory stays
bounded whatever the image's size.

Both commands run under their node's ``timeout`` with what is left of the
pull's budget (``time_out``). When either side fails, both are stopped: the
other channel is closed, which ends the export (its output pipe closes) or
the import (its input ends). The export's first line names the digest the
source holds; the import's node-side script then checks that the target holds
the reference under that digest, and removes whatever a failed or wrong
import left under the name, so that a source dying mid-stream never leaves a
half-imported image. The next holder is then tried.

Under ``peer_ssh``, the target runs both ends itself, ``ssh HOLDER <export> |
<import>``, with the same checks (:mod:`imagesync.peerssh`): this process sends
one command and reads its few lines of answer, and relays nothing.

Under ``source = "peers-first"`` the holders are the plan's, and those the run
learns of in Redis: every node whose pull of the image succeeds and that can
serve copies (ctr on it; an agent node, if its agent serves its images:
:mod:`imagesync.peerpull`) becomes one, for the nodes of its platform
(:func:`note_holder`). A copy whose image no node can serve yet waits for a holder,
or for its *seed* (the node pulling it from the registry) to end,
which hands over to the next source at once. It waits without holding its pool
process or its node's slot: the task puts the pull back in its queue for a few
seconds (:class:`~imagesync.attempt.WaitForHolder`), so that the seed pulls
behind it in the queue get to run. A wait lasts half of ``time_out`` at most
(:func:`wait_limit`); the next source, the registry, gets what is left. (A copy
that is the route's last source, after the registry failed, waits for a busy
holder as long as ``time_out`` allows, in its process: no seed is behind it.) Each
source serves at most :data:`SERVES` copies at once (a
:class:`~imagesync.semaphore.Semaphore` per node), so the holders double in
each round instead of all copying from the first.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import keys, references, runtimes
from .attempt import Attempt, NodeFailed, WaitForHolder
from .budgets import KILL_AFTER, LIST_TIMEOUT, SSH_GRACE, stale_after
from .copied import Copied, ended, import_ended
from .errors import CommandTimedOut, NodeError, RefusedReference
from .outcomes import COPIED, FAILED, PRESENT, SUCCESSES, TIMED_OUT, Outcome
from .peerpull import Mirrored, mirror_copy, serving_agents
from .peerssh import copy_on_target
from .planning.plan import PEERS
from .redisvalues import as_text
from .runs import pull_key
from .semaphore import Semaphore
from .transport import Stream, transport_for

if TYPE_CHECKING:
    from .config import Node, Settings

log = logging.getLogger(__name__)

#: bytes read from the source and written to the target at a time: the whole buffer
CHUNK = 256 * 1024
#: copies one node serves at once; 1 doubles the holders each round
SERVES = 1
#: seconds between two looks for a holder (or a free one) while a copy waits
POLL = 0.5
#: seconds a serving slot is held without being refreshed, should its copy die
SERVE_LEASE = 30.0
#: seconds of ``time_out`` below which no copy from a further holder is started
MIN_COPY_SECONDS = 5
#: the share of ``time_out`` a copy waits for a holder at most (:func:`wait_limit`)
WAIT_SHARE = 0.5
#: seconds a waiting copy stays back in its queue before it looks again (jittered)
REQUEUE_AFTER = (1.0, 3.0)


def from_peers(attempt: Attempt) -> tuple[Outcome, bool]:
    """Copy the image from a node that holds it; the outcome and whether a retry may help.

    Raises :class:`~imagesync.attempt.WaitForHolder` when no holder can serve it yet
    but one may come, and the task can put the pull back in its queue meanwhile.
    """
    settings, node, route = attempt.settings, attempt.node, attempt.route
    try:
        image = references.normalize(attempt.image)
    except RefusedReference as exc:
        return attempt.outcome(FAILED, f"refused: {exc.reason}"), False
    if attempt.check and _holds(attempt, image):
        return attempt.outcome(PRESENT), False
    holders = Holders(attempt, image)
    tried: dict[str, str] = {}  # source -> why its copy failed
    transient = False
    holder_id = f"{attempt.run_id}:{node.name}:{image}:{uuid.uuid4().hex[:8]}"
    gave_up = ""  # why the wait for a holder ended without one
    while True:
        candidates = [peer for peer in holders.current() if peer not in tried and peer != node.name]
        if not candidates and (tried or not holders.may_appear()):
            break
        if tried and attempt.remaining() < MIN_COPY_SECONDS:
            return attempt.outcome(TIMED_OUT, f"time_out ({settings.time_out} s) was spent"), False
        source = _take_a_source(attempt, candidates, holder_id)
        if source is None:
            waiting = "every holder was busy" if candidates else "no node came to hold it"
            if _followed(attempt):
                # another source gets the rest of time_out: only the first holder is
                # waited for, half of time_out at most
                if tried:
                    gave_up = "every other holder was busy"
                    break
                if attempt.elapsed() >= wait_limit(settings):
                    gave_up = f"{waiting} within {wait_limit(settings):g} s (half of time_out)"
                    break
            elif attempt.remaining() < MIN_COPY_SECONDS:
                return attempt.outcome(TIMED_OUT, f"{waiting} until time_out ({settings.time_out} s) was spent"), False
            if attempt.requeue and not tried:
                raise WaitForHolder(requeue_delay(), time.time() - attempt.elapsed(),
                                    f"{waiting} yet to copy {image} from")
            time.sleep(POLL)
            continue
        serving = _serving(attempt, source)
        try:
            if route.mirror:  # agent to agent: the target's containerd pulls from the holder's agent
                copied: Copied | Mirrored = mirror_copy(attempt, source, image, _refresher(serving, holder_id))
            else:
                copied = copy(settings, settings.node(source), node, image, route.digest, route.platform,
                              attempt.remaining(), _refresher(serving, holder_id))
        finally:
            if serving is not None:
                serving.release(holder_id)
        if copied.ok:
            log.info("%s: %s copied from %s%s", node.name, image, source,
                     f" ({copied.size / 1e6:.1f} MB)" if copied.size else " (by the node itself, over its ssh)")
            return attempt.outcome(COPIED, source=source), False
        log.warning("%s: copy of %s from %s failed: %s", node.name, image, source, copied.reason)
        tried[source] = copied.reason
        transient = transient or copied.transient
    if not tried:
        return attempt.outcome(FAILED, gave_up or holders.none_reason()), False
    reasons = "; ".join(f"from {source}: {reason}" for source, reason in tried.items())
    return attempt.outcome(FAILED, f"copy failed {reasons}" + (f"; then {gave_up}" if gave_up else "")), transient


def wait_limit(settings: Settings) -> float:
    """Seconds a copy that another source follows waits for a holder, or for a free one, at
    most: half of ``time_out``, so that the next source (the registry) has the other half."""
    return settings.time_out * WAIT_SHARE


def _followed(attempt: Attempt) -> bool:
    """Whether another source follows the copy in the route (under peers-first, the registry).
    A copy that is the last source waits for a free holder as long as ``time_out`` allows."""
    return attempt.route.sources[-1:] != (PEERS,)


def requeue_delay() -> float:
    """Seconds a waiting copy stays back in its queue before it looks again (jittered)."""
    return round(random.uniform(*REQUEUE_AFTER), 2)


def _holds(attempt: Attempt, image: str) -> bool:
    """Whether the node holds ``image`` already (a moved tag: under its new digest), as its containerd says within
    :data:`~imagesync.budgets.LIST_TIMEOUT` (or what is left of ``time_out``).

    The check runs under the node's ``timeout``: closing the SSH channel would stop
    nothing there. A node that cannot answer is the node's own failure, whatever the source.
    """
    node = attempt.node
    seconds = max(1, min(int(LIST_TIMEOUT), attempt.remaining()))
    try:
        answer = transport_for(attempt.settings, node).run(
            runtimes.ctr_for(node).presence_command(image, seconds), timeout=seconds + KILL_AFTER + SSH_GRACE)
    except NodeError as exc:
        raise NodeFailed(attempt.outcome(FAILED, exc.message), exc.transient) from exc
    if answer.exit_code in runtimes.TIMEOUT_EXIT_CODES:
        reason = f"containerd on {node.name} did not say within {seconds} s whether it holds {image}"
        raise NodeFailed(attempt.outcome(FAILED, reason), True)
    held = answer.stdout.strip()
    if attempt.route.replaces and attempt.route.digest:
        return answer.ok and held == attempt.route.digest  # a moved tag: held under its old digest is not held
    return answer.ok and bool(held)


class Holders:
    """The nodes that can serve this copy: the route's, then, under peers-first, those
    the run learns of in Redis (:func:`note_holder`).

    A learned holder serves only a node of its own platform, as the plan's holders
    do; one that is no SSH node of the configuration (an agent, a node the
    configuration has lost since) serves none, but to an agent node (a ``mirror``
    route), whose holders are the agents that serve their node's images.
    """

    def __init__(self, attempt: Attempt, image: str) -> None:
        self.attempt = attempt
        self.image = image
        self.shared = attempt.redis is not None and bool(attempt.run_id) and attempt.settings.source == "peers-first"

    def current(self) -> list[str]:
        peers = list(self.attempt.route.peers)
        if self.shared:
            peers += sorted(name for name, platform in self.learned().items()
                            if name not in peers and self.serves(platform))
        if self.attempt.route.mirror:  # agent nodes copy from the agents that serve their node's images
            configured = serving_agents(self.attempt.redis) if self.attempt.redis is not None else set()
        else:
            configured = {node.name for node in self.attempt.settings.nodes}
        return [name for name in peers if name in configured]

    def learned(self) -> dict[str, str]:
        """The holders the run learned of: node -> its platform ("" if unknown)."""
        assert self.attempt.redis is not None
        found = self.attempt.redis.hgetall(keys.run_holders(self.attempt.run_id, self.image))
        return {as_text(name): as_text(platform) for name, platform in found.items()}

    def serves(self, platform: str) -> bool:
        """Whether a holder of ``platform`` can serve this node: a node keeps only its own
        platform's layers of a multi-platform image."""
        mine = self.attempt.route.platform
        return not (mine and platform and platform != mine)

    def may_appear(self) -> bool:
        """Whether waiting may bring a holder: the seed is still getting the image."""
        seed = self.attempt.route.seed
        return self.shared and seed is not None and self.seed_outcome() is None

    def seed_outcome(self) -> dict | None:
        """How the seed's pull of the image ended (None while it runs)."""
        seed = self.attempt.route.seed
        assert self.attempt.redis is not None and seed is not None
        found = self.attempt.redis.hget(keys.run_results(self.attempt.run_id), pull_key(seed, self.image))
        return None if found is None else json.loads(found)

    def none_reason(self) -> str:
        seed = self.attempt.route.seed
        outcome = self.seed_outcome() if self.shared and seed is not None else None
        if outcome is None:
            return "no reachable node with ctr holds it"
        if outcome.get("status") not in SUCCESSES:
            failure = f"{outcome.get('status')}: {outcome.get('reason') or 'no reason given'}"
            return f"no node holds it: {seed}, which was to get it from the registry, {failure}"
        return (f"no node that can serve {self.attempt.node.name} holds it: {seed}, which got it from "
                "the registry, cannot (another platform, or no copies from it)")


def _take_a_source(attempt: Attempt, candidates: list[str], holder_id: str) -> str | None:
    """The first of ``candidates`` (in an order that spreads targets over them) with a free serving slot."""
    if not candidates:
        return None
    if attempt.redis is None:  # nothing to share: the route's order
        return candidates[0]
    start = zlib.crc32(attempt.node.name.encode()) % len(candidates)
    for source in candidates[start:] + candidates[:start]:
        serving = _serving(attempt, source)
        if serving is not None and serving.acquire(holder_id):
            return source
    return None


def _refresher(serving: Semaphore | None, holder_id: str) -> Callable[[], object] | None:
    """What keeps a serving slot while its copy streams."""
    if serving is None:
        return None
    return lambda: serving.refresh(holder_id)


def _serving(attempt: Attempt, source: str) -> Semaphore | None:
    if attempt.redis is None:
        return None
    return Semaphore(attempt.redis, keys.node_serves(source), SERVES, SERVE_LEASE)


def holders_ttl(settings: Settings) -> int:
    """Seconds a run's holder sets live: as long as the run may go without progress."""
    return stale_after(settings)


def note_holder(attempt: Attempt, outcome: Outcome) -> None:
    """Under peers-first, a node that now holds the image becomes one of its holders for
    the run, if it can serve copies: its route says so (ctr on it, and commands opened
    on it from any worker, or an agent that serves its node's images), with its platform."""
    settings, route = attempt.settings, attempt.route
    if not (settings.transfer and settings.source == "peers-first" and outcome.succeeded
            and PEERS in route.sources and attempt.redis is not None and attempt.run_id):
        return
    try:
        image = references.normalize(attempt.image)
    except RefusedReference:
        return
    key = keys.run_holders(attempt.run_id, image)
    pipe = attempt.redis.pipeline()
    pipe.hset(key, attempt.node.name, route.platform or "")
    pipe.expire(key, holders_ttl(settings))
    pipe.execute()


def copy(settings: Settings, source: Node, target: Node, image: str, digest: str | None,
         platform: str | None, seconds: int, progress: Callable[[], object] | None = None) -> Copied:
    """Stream ``image`` from ``source`` into ``target``; it must arrive under the digest
    the source holds it under (and under ``digest``, when the plan knew it). Under
    ``peer_ssh``, the target copies it itself (:mod:`imagesync.peerssh`)."""
    if settings.peer_ssh:
        return copy_on_target(settings, source, target, image, digest, platform, seconds, progress, SERVE_LEASE / 3)
    seconds = max(1, seconds)
    deadline = time.monotonic() + seconds + KILL_AFTER + SSH_GRACE

    def left() -> float:
        return max(0.001, deadline - time.monotonic())

    export = runtimes.ctr_for(source).export_command(image, seconds, platform)
    try:
        reader = transport_for(settings, source).open(export)
    except NodeError as exc:
        return Copied(False, exc.message, exc.transient)
    writer: Stream | None = None
    try:
        first, rest = _first_line(reader, left)
        marker, _, held = first.partition(" ")
        if marker != runtimes.EXPORT_MARKER:  # the shell itself failed: its status and words say why
            return _source_failed(source, reader, left, first)
        if not held:
            return Copied(False, f"{source.name} no longer holds {image}")
        if digest and held != digest:
            return Copied(False, f"{source.name} now holds {image} as {held}, not {digest} as planned")
        try:
            writer = transport_for(settings, target).open(
                runtimes.ctr_for(target).import_command(image, held, seconds, platform))
        except NodeError as exc:
            return Copied(False, f"cannot start the import on {target.name}: {exc.message}", exc.transient)
        size = 0
        chunk, refreshed = rest, time.monotonic()
        while True:
            if chunk:
                try:
                    writer.write(chunk, left())
                except CommandTimedOut:
                    return Copied(False, f"copy did not finish within time_out ({seconds} s)")
                except NodeError:
                    reader.close()  # stop the export: the import has ended
                    return _import_ended(target, writer, left)
                size += len(chunk)
            if progress is not None and time.monotonic() - refreshed > SERVE_LEASE / 3:
                progress()
                refreshed = time.monotonic()
            try:
                chunk = reader.read(CHUNK, left())
            except CommandTimedOut:
                return Copied(False, f"copy did not finish within time_out ({seconds} s)")
            if not chunk:
                break
        status = reader.wait(left())
        if status != 0:
            # the import must not finish a cut stream: it reads EOF now, fails, and cleans up
            writer.close_input()
            _import_ended(target, writer, left)
            return _source_failed(source, reader, left)
        writer.close_input()
        imported = _import_ended(target, writer, left)
        if imported.ok:
            imported.size = size
        return imported
    except CommandTimedOut:
        return Copied(False, f"copy did not finish within time_out ({seconds} s)")
    except NodeError as exc:
        return Copied(False, exc.message, exc.transient)
    finally:
        reader.close()
        if writer is not None:
            writer.close()


def _first_line(stream: Stream, left) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    """The stream's first line and what came after it."""
    data = b""
    while b"\n" not in data and len(data) < 4096:
        chunk = stream.read(4096, left())
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line.decode("utf-8", "replace").strip(), rest


def _source_failed(source: Node, stream: Stream, left, said: str = "") -> Copied:  # type: ignore[no-untyped-def]
    try:
        status = stream.wait(min(left(), 10))
    except CommandTimedOut:
        status = -1
    return ended("export", source, status, runtimes.failure_reason(stream.stderr(), said))


def _import_ended(target: Node, stream: Stream, left) -> Copied:  # type: ignore[no-untyped-def]
    """How the import on ``target`` ended (``ok`` if it did, under the right digest)."""
    status = stream.wait(left())
    tail = b""
    try:
        while chunk := stream.read(65536, left()):
            tail += chunk
    except NodeError:
        pass
    return import_ended(target, status, tail.decode("utf-8", "replace"), stream.stderr())
