"""imagesync's own exceptions.

Library errors (paramiko, invoke, socket, redis) are translated into these at
the boundary where they happen, with ``raise ... from``, so that every caller
sees one tree and every message can be shown to an operator as it is::

    ImagesyncError
    ├── ConfigError                 the configuration is invalid (all problems listed)
    ├── RefusedReference            an image name fails the OCI reference grammar
    └── NodeError                   something went wrong with one node
        ├── NodeUnreachable         TCP/SSH connection failed or dropped
        ├── AuthenticationFailed    the node refused our key
        ├── HostKeyUnknown          the node's host key is not in known_hosts
        ├── HostKeyChanged          the node's host key differs from known_hosts
        ├── CommandTimedOut         a command ran past its time limit
        ├── RuntimeMissing          crictl/ctr is not installed on the node
        └── PullFailed              the runtime could not pull an image
"""

from __future__ import annotations


class ImagesyncError(Exception):
    """Base of every error imagesync raises on purpose."""


class ConfigError(ImagesyncError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}: " + "; ".join(self.problems))


class RefusedReference(ImagesyncError):
    """An image reference that is not a valid OCI reference; never executed."""

    def __init__(self, reference: str, reason: str) -> None:
        self.reference = reference
        self.reason = reason
        super().__init__(f"refused image reference {reference!r}: {reason}")


class NodeError(ImagesyncError):
    """Something went wrong with one node; the message names the node and a fix."""

    #: a transient error may go away if the same thing is tried again
    transient = False

    def __init__(self, node: str, message: str) -> None:
        self.node = node
        self.message = message
        super().__init__(f"{node}: {message}")


class NodeUnreachable(NodeError):
    transient = True


class AuthenticationFailed(NodeError):
    pass


class HostKeyUnknown(NodeError):
    pass


class HostKeyChanged(NodeError):
    pass


class CommandTimedOut(NodeError):
    def __init__(self, node: str, message: str, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(node, message)


class RuntimeMissing(NodeError):
    pass


class PullFailed(NodeError):
    """The runtime refused or failed a pull; ``reason`` is the runtime's own text."""

    def __init__(self, node: str, image: str, reason: str, transient: bool = False) -> None:
        self.image = image
        self.reason = reason
        self.transient = transient
        super().__init__(node, f"pull of {image} failed: {reason}")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, cut to ``limit`` characters, for a log line or a run record."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
