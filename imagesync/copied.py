"""How one copy of an image from one node to another ended, whichever way it went: relayed
by the worker (:func:`imagesync.transfer.copy`) or run by the target itself over the
nodes' own SSH (:mod:`imagesync.peerssh`). Both end in the same node-side import, whose
exit status and last line (``IMPORT_MARKER STATUS BEFORE AFTER REMOVED``) tell this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import runtimes

if TYPE_CHECKING:
    from .config import Node


@dataclass
class Copied:
    """How one copy from one source ended."""

    ok: bool
    reason: str = ""
    #: whether trying again may help (a connection dropped, a command was killed)
    transient: bool = False
    size: int = 0


def ended(what: str, node: Node, status: int, reason: str, removed: str = "") -> Copied:
    """A failed export or import, as its exit ``status`` tells it (retrying may help when it has none)."""
    if status == -1:
        return Copied(False, f"the {what} on {node.name} ended without an exit status: "
                             "the connection dropped or the node killed it", True)
    if status in runtimes.TIMEOUT_EXIT_CODES:
        return Copied(False, f"the {what} on {node.name} did not finish within time_out{removed}")
    if status == runtimes.COMMAND_NOT_FOUND:
        return Copied(False, f"ctr not found on {node.name}: install containerd's ctr there, or set transfer = false")
    return Copied(False, f"the {what} on {node.name} failed (exit {status}): {reason}{removed}", status < 0)


def import_ended(target: Node, status: int, output: str, stderr: str) -> Copied:
    """How the import on ``target`` ended (``ok`` if it did, under the right digest), from its
    exit ``status``, its ``output`` (the report line among it) and its ``stderr``."""
    report = [line for line in output.splitlines() if line.startswith(runtimes.IMPORT_MARKER)]
    fields = report[-1].split() if report else []
    removed = " (what it left under the name was removed)" if fields[-1:] == ["1"] else ""
    if status == 0:
        return Copied(True)
    if status == runtimes.WRONG_DIGEST:
        after = fields[3] if len(fields) > 3 else "?"
        return Copied(False, f"the image arrived on {target.name} as {after}, not as the source's digest{removed}")
    return ended("import", target, status, runtimes.failure_reason(stderr), removed)
