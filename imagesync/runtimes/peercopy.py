"""The copy a node runs itself from a peer that holds the image (``peer_ssh = true``):
``ssh HOLDER <export> | <import>``, one command on the target, so that no byte of the
image passes through the worker that starts it.

The two ends are the same node-side scripts as a copy relayed by the worker
(:meth:`~imagesync.runtimes.Ctr.export_command` on the holder,
:meth:`~imagesync.runtimes.Ctr.import_script` on the target), joined on the target
by a few shell lines that read the export's first line (the digest the holder
holds the image under), refuse a holder that no longer holds it or holds another
digest than the plan's, and hand that digest to the import's check. The target's
own ``ssh`` reaches the holder, with its own keys, known hosts and host key
checking: imagesync adds only ``BatchMode=yes`` (no prompt: a key or host key
that is refused fails at once), no forwarding of any kind, and a connect timeout.

What the command prints, besides the import's own lines: ``PEER_MARKER held
DIGEST`` once the export's first line is read, ``IMPORT_MARKER ...`` after the
import (as :meth:`~imagesync.runtimes.Ctr.import_command`), and ``PEER_MARKER
export STATUS``, the exit status of the ``ssh`` that ran the export (255: ``ssh``
itself failed). It exits with the import's status, or one of :data:`NOT_HELD`,
:data:`EXPORT_FAILED`, :data:`OTHER_DIGEST` when nothing was imported.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import references
from ..budgets import KILL_AFTER
from . import EXPORT_MARKER, checked, ctr_for, under_timeout

if TYPE_CHECKING:
    from ..config import Node

#: the lines a peer copy adds to the import's: ``PEER_MARKER held DIGEST``, ``PEER_MARKER export STATUS``
PEER_MARKER = "imagesync-peer"
#: exit statuses of a peer copy that imported nothing: the holder no longer holds the image;
#: its export (or the ssh to it) failed before its first line; it holds another digest than planned
NOT_HELD, EXPORT_FAILED, OTHER_DIGEST = 66, 67, 68
#: the exit status of ``ssh`` when ssh itself failed (connection, authentication, host key)
SSH_FAILED = 255


@dataclass(frozen=True)
class PeerAddress:
    """How the other nodes' ``ssh`` reaches a holder: ``None`` leaves a value to their SSH config."""

    host: str
    port: int | None = None
    user: str | None = None

    def describe(self) -> str:
        return (f"{self.user}@" if self.user else "") + self.host + (f":{self.port}" if self.port else "")


def peer_address(node: Node) -> PeerAddress:
    """How the other nodes reach ``node``: its ``peer_host``, ``peer_port`` and ``peer_user``,
    else the ``host``, and the ``port`` and ``user`` its own table sets."""
    port = node.peer_port or (node.port if "port" in node.model_fields_set else None)
    return PeerAddress(node.peer_host or node.host, port, node.peer_user or node.user)


def ssh_to(address: PeerAddress, command: str, connect_timeout: float) -> str:
    """``ssh`` on a node to run ``command`` on a peer: its own client configuration, no prompt,
    no forwarding, stdin closed; every value quoted, the host after ``--``."""
    argv = ["ssh", "-n", "-T", "-o", "BatchMode=yes", "-o", "ForwardAgent=no", "-o", "ForwardX11=no",
            "-o", "ClearAllForwardings=yes", "-o", f"ConnectTimeout={max(1, math.ceil(connect_timeout))}"]
    if address.port is not None:
        argv += ["-p", str(address.port)]
    if address.user is not None:
        argv += ["-l", address.user]
    return shlex.join([*argv, "--", address.host, command])


def peer_of(nodes: list[Node], node: Node) -> Node | None:
    """The peer ``imagesync check`` has ``node`` reach over its own ssh: the next SSH node of
    the configuration, the last one's being the first (every node tried once, n checks in all)."""
    ring = [n for n in nodes if n.transport == "ssh"]
    if node not in ring or len(ring) < 2:
        return None
    return ring[(ring.index(node) + 1) % len(ring)]


def reach_command(holder: Node, connect_timeout: float) -> str:
    """What a node runs to show that its own ssh reaches ``holder`` as a peer copy would."""
    return ssh_to(peer_address(holder), "true", connect_timeout)


def peer_copy_command(holder: Node, target: Node, reference: str, expect: str | None, seconds: int,
                      platform: str | None, connect_timeout: float) -> str:
    """The command the target runs to copy ``reference`` from ``holder`` (see the module's
    docstring), whole under the target's ``timeout``; the holder's export under its own."""
    checked(reference)
    expected = shlex.quote(references.parse_digest(expect) if expect else "")
    export = ctr_for(holder).export_command(reference, seconds, platform)
    fetch = ssh_to(peer_address(holder), export, connect_timeout)
    receive = "; ".join([
        'IFS=" " read -r marker held rest',
        f'if [ "$marker" != {EXPORT_MARKER} ]; then exit {EXPORT_FAILED}; fi',
        f'echo "{PEER_MARKER} held ${{held:--}}"',
        f'if [ -z "$held" ]; then exit {NOT_HELD}; fi',
        # the digest reaches the import's check as a variable: only a digest passes
        f'case "${{held#sha256:}}" in *[!0-9a-f]*) exit {EXPORT_FAILED};; esac',
        f'if [ "${{#held}}" -ne 71 ] || [ "${{held%%:*}}" != sha256 ]; then exit {EXPORT_FAILED}; fi',
        f'if [ -n {expected} ] && [ "$held" != {expected} ]; then exit {OTHER_DIGEST}; fi',
        ctr_for(target).import_script(reference, '"$held"', seconds, platform),
    ])
    script = f'{{ {{ {fetch}; echo "{PEER_MARKER} export $?" >&3; }} | {{ {receive}; }}; }} 3>&1'
    return under_timeout(script, int(seconds) + KILL_AFTER)
