"""A copy between nodes that the target runs itself, over the nodes' own SSH (``peer_ssh = true``).

The worker opens one SSH channel to the target (or a pipe, for a node it runs on)
and sends it one command, :func:`~imagesync.runtimes.peercopy.peer_copy_command`:
``ssh HOLDER <export> | <import>``. What comes back is a few lines, the markers
of the two node-side scripts and what the import prints: no byte of the image
passes through this process, so the head node's network and CPU carry none of
it, however many copies run at once.

The checks are those of a copy the worker relays (:func:`imagesync.transfer.copy`):
the export's first line names the digest the holder holds; a holder that no
longer holds the image, or holds another digest than the plan's, is refused
before anything is imported; the import checks that the target holds the
reference under that digest, and removes what a failed or wrong import left.
A holder the target cannot reach, that refuses the target's key or whose host
key the target does not know, fails this copy alone: the next holder is tried,
then the next source, as for any copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import runtimes
from .budgets import KILL_AFTER, SSH_GRACE
from .copied import Copied, ended, import_ended
from .errors import CommandTimedOut, NodeError, RefusedReference
from .runtimes.peercopy import (
    EXPORT_FAILED,
    NOT_HELD,
    OTHER_DIGEST,
    PEER_MARKER,
    SSH_FAILED,
    peer_address,
    peer_copy_command,
)
from .transport import PROGRESS_TAIL, transport_for
from .transport.base import OutputTail

if TYPE_CHECKING:
    from .config import Node, Settings


def copy_on_target(settings: Settings, source: Node, target: Node, image: str, digest: str | None,
                   platform: str | None, seconds: int, progress: Callable[[], object] | None = None,
                   progress_every: float = 10.0) -> Copied:
    """Have ``target`` copy ``image`` from ``source`` itself; it must arrive under the digest
    the source holds it under (and under ``digest``, when the plan knew it). ``progress``
    is called every ``progress_every`` seconds while the copy runs."""
    seconds = max(1, seconds)
    deadline = time.monotonic() + seconds + 2 * KILL_AFTER + SSH_GRACE

    def left() -> float:
        return max(0.001, deadline - time.monotonic())

    try:
        command = peer_copy_command(source, target, image, digest, seconds, platform, settings.ssh.connect_timeout)
    except RefusedReference as exc:
        return Copied(False, f"refused: {exc.reason}")
    try:
        stream = transport_for(settings, target).open(command)
    except NodeError as exc:
        return Copied(False, f"cannot start the copy on {target.name}: {exc.message}", exc.transient)
    output = OutputTail(PROGRESS_TAIL)
    try:
        stream.close_input()
        refreshed = time.monotonic()
        while True:
            try:
                chunk = stream.read(65536, min(left(), progress_every))
            except CommandTimedOut:
                if time.monotonic() >= deadline:
                    raise
                chunk = None  # no output for a while: the copy goes on
            if chunk == b"":
                break
            if chunk:
                output.add(chunk)
            if progress is not None and time.monotonic() - refreshed >= progress_every:
                progress()
                refreshed = time.monotonic()
        status = stream.wait(left())
        stderr = stream.stderr()
    except CommandTimedOut:
        return Copied(False, f"copy did not finish within time_out ({seconds} s)")
    except NodeError as exc:
        return Copied(False, exc.message, exc.transient)
    finally:
        stream.close()
    return _ended(source, target, image, digest, status, output.value().decode("utf-8", "replace"), stderr)


def _said(output: str, what: str) -> str:
    """The value of the peer copy's ``PEER_MARKER WHAT VALUE`` line ("" if it printed none)."""
    for line in reversed(output.splitlines()):
        fields = line.split()
        if fields[:2] == [PEER_MARKER, what] and len(fields) > 2:
            return fields[2]
    return ""


def _ended(source: Node, target: Node, image: str, digest: str | None, status: int, output: str,
           stderr: str) -> Copied:
    """How the copy ended, from the command's exit ``status``, ``output`` and ``stderr``."""
    held = _said(output, "held")
    export = _said(output, "export")
    export_status = int(export) if export.lstrip("-").isdigit() else None
    if status == NOT_HELD:
        return Copied(False, f"{source.name} no longer holds {image}")
    if status == OTHER_DIGEST:
        return Copied(False, f"{source.name} now holds {image} as {held}, not {digest} as planned")
    reason = runtimes.failure_reason(stderr)
    if status == EXPORT_FAILED and export_status == SSH_FAILED:
        where = peer_address(source).describe()
        return Copied(False, f"{target.name} cannot reach {source.name} ({where}) with its ssh: {reason}",
                      runtimes.is_transient(reason))
    if status == EXPORT_FAILED and export_status == runtimes.COMMAND_NOT_FOUND:
        # ssh on the target, or timeout on the holder (ctr's absence leaves the first line empty)
        return Copied(False, f"{target.name} could not run the export on {source.name} with its ssh "
                             f"(a command not found): {reason}")
    if status == EXPORT_FAILED:
        return ended("export", source, export_status if export_status is not None else -1, reason)
    if status != 0 and export_status not in (0, None):
        # the stream was cut: the import read a short tar, failed and removed what it left
        cut = import_ended(target, status, output, stderr)
        export_status = -1 if export_status == SSH_FAILED else export_status
        failed = ended("export", source, export_status, reason)
        failed.reason += "; " + cut.reason
        return failed
    return import_ended(target, status, output, stderr)
