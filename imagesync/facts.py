"""What imagesync learns about a node besides its images, in the same round trip.

The inventory command is one shell line: a few probes, each printing one
``imagesync-fact KEY VALUE`` line, then ``exec`` of the runtime's listing, so
the listing's exit status is the command's. A probe that fails prints an empty
value; a fact nobody could learn is None, and whatever depends on it (the
platform check, the room check, transfer) says so rather than guess.

Adding a fact is one entry in :func:`probes` and one field here.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Node

#: the line that starts each fact, and the one that ends them
FACT = "imagesync-fact"
END = "imagesync-facts-end"

#: ``uname -m`` -> OCI platform (architecture and variant), as containerd maps them
MACHINES = {
    "x86_64": "amd64", "amd64": "amd64",
    "aarch64": "arm64/v8", "arm64": "arm64/v8", "armv8l": "arm64/v8",
    "armv7l": "arm/v7", "armv7": "arm/v7", "armv6l": "arm/v6",
    "i386": "386", "i486": "386", "i586": "386", "i686": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "mips64": "mips64",
}

PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")


def probes(node: Node) -> dict[str, str]:
    """KEY -> a shell command whose first line of output is the fact's value.

    None may hold up the inventory: ``ctr version`` waits for a containerd that
    does not answer (a socket elsewhere than it looks), so it gets 3 s at most,
    and the node's own endpoint when one is set.
    """
    address = f" --address {shlex.quote(node.endpoint.removeprefix('unix://'))}" if node.endpoint else ""
    return {
        "machine": "uname -m",
        # transfer and backup pushes need containerd's own client on the node
        "ctr": "command -v ctr",
        # the image filesystem: 1024-byte blocks, total and available
        "disk": f"df -Pk {shlex.quote(node.image_fs)} | awk 'NR==2 {{print $2, $4}}'",
        # containerd's version (the server's, else the binary's): pinning needs >= 1.7
        "containerd": f"{{ timeout 3 ctr{address} version 2>/dev/null"
                      " | awk '/^Server:/ {s=1} s && $1 == \"Version:\" {print $2; exit}'; "
                      "containerd --version 2>/dev/null | awk '{print $3}'; }",
    }


def wrap(node: Node, listing: str) -> str:
    """``listing`` preceded by the node's probes, in one shell command line."""
    lines = [f'echo "{FACT} {key} $({command} 2>/dev/null | head -n 1)"' for key, command in probes(node).items()]
    return "; ".join([*lines, f"echo {END}", f"exec {listing}"])


def split(output: str) -> tuple[dict[str, str], str]:
    """(the facts, the listing's own output) from a wrapped command's output.

    Output without the end line (a node answering something else altogether)
    is all the listing's.
    """
    head, sep, rest = output.partition(END + "\n")
    if not sep:
        return {}, output
    facts = {}
    for line in head.splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[0] == FACT:
            facts[parts[1]] = parts[2].strip() if len(parts) == 3 else ""
    return facts, rest


def platform_of(machine: str | None) -> str | None:
    """``linux/<arch>[/<variant>]`` for a ``uname -m`` answer; None if unknown."""
    arch = MACHINES.get((machine or "").strip())
    return f"linux/{arch}" if arch else None


@dataclass(frozen=True)
class NodeFacts:
    """One node's platform, image filesystem and abilities, as learned (or configured)."""

    #: ``os/arch[/variant]``, such as ``linux/amd64`` or ``linux/arm64/v8``
    platform: str | None = None
    #: where the platform came from: "node" (uname -m) or "config"
    platform_from: str = "node"
    #: bytes of the image filesystem, and how many are free
    disk_total: int | None = None
    disk_free: int | None = None
    #: whether ``ctr`` is on the node: needed to copy an image to or from it
    ctr: bool = False
    #: containerd's version on the node (``1.6.20~ds1``), None if neither ctr nor containerd told it
    containerd: str | None = None
    #: the node is served by its own agent (imagesync.agents): no other worker can
    #: open a command on it, so it copies only from and to other agent nodes, agent to agent
    via_agent: bool = False
    #: its agent serves the node's images to the other agents (imagesync.peerserve)
    serves: bool = False
    raw: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, node: Node, raw: Mapping[str, str], via_agent: bool = False) -> NodeFacts:
        total = free = None
        disk = raw.get("disk", "").split()
        if len(disk) == 2 and all(part.isdigit() for part in disk):
            total, free = int(disk[0]) * 1024, int(disk[1]) * 1024
        platform: str | None
        if node.platform:
            platform, source = node.platform, "config"
        else:
            platform, source = platform_of(raw.get("machine")), "node"
        return cls(platform=platform, platform_from=source, disk_total=total, disk_free=free,
                   ctr=bool(raw.get("ctr")), containerd=raw.get("containerd") or None, via_agent=via_agent,
                   raw=dict(raw))

    @property
    def can_copy(self) -> bool:
        """Whether an image can be copied to or from the node: ``ctr`` there, and a node
        the workers of other nodes reach (over SSH), or whose agent serves its images to
        the other agents (and pulls theirs: :mod:`imagesync.peerpull`)."""
        return self.ctr and (not self.via_agent or self.serves)

    @property
    def can_pin(self) -> bool | None:
        """Whether the node's containerd keeps the ``io.cri-containerd.pinned`` label
        from its CRI's image GC (>= 1.7); None when its version is unknown."""
        match = re.match(r"v?(\d+)\.(\d+)", self.containerd or "")
        return (int(match.group(1)), int(match.group(2))) >= (1, 7) if match else None

    @property
    def arch(self) -> str | None:
        """The architecture alone (``amd64``, ``arm64``), as per-architecture references name it."""
        return self.platform.split("/")[1] if self.platform else None

    def to_dict(self) -> dict:
        return {"platform": self.platform, "platform_from": self.platform_from,
                "disk_total": self.disk_total, "disk_free": self.disk_free, "ctr": self.ctr,
                "containerd": self.containerd, "via": "agent" if self.via_agent else "ssh"}
