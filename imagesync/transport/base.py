"""The transport interface: a command run on a node (:class:`Transport`), its
result (:class:`CommandResult`), and a command streamed through this process
(:class:`Stream`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import (
    NodeError,
)

if TYPE_CHECKING:
    pass



@dataclass(frozen=True)
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Transport(ABC):
    """Runs shell commands on one node."""

    node: str

    @abstractmethod
    def run(self, command: str, timeout: float) -> CommandResult:
        """Run ``command`` (a shell command line) and wait at most ``timeout`` seconds.

        Raises CommandTimedOut past the timeout and NodeUnreachable (or another
        NodeError) when the node cannot be reached; a command that runs and
        fails is a result with a non-zero exit code, not an exception.
        """

    def close(self) -> None:  # noqa: B027 (optional: a transport without a connection keeps nothing)
        """Release the connection, if any."""

    def open(self, command: str) -> Stream:
        """Start ``command`` with its stdin and stdout left to the caller, to stream through.

        Raises NodeUnreachable (or another NodeError) when the node cannot be
        reached. The command runs until its output ends, :meth:`Stream.close`
        stops it, or its node-side ``timeout`` does.
        """
        raise NodeError(self.node, f"{type(self).__name__} cannot stream a command")


class Stream(ABC):
    """A command running on a node whose input and output are streamed by this process.

    Reads and writes block: a write waits while the node's side is full (the
    SSH window, a pipe), which is what gives a copy its backpressure. Each
    takes a ``timeout`` and raises CommandTimedOut past it; a stream whose
    connection dropped or whose command ended raises NodeError on a write.
    """

    node: str

    @abstractmethod
    def read(self, size: int, timeout: float) -> bytes:
        """Up to ``size`` bytes of the command's stdout; b"" once it has ended."""

    @abstractmethod
    def write(self, data: bytes, timeout: float) -> None:
        """All of ``data`` to the command's stdin."""

    @abstractmethod
    def close_input(self) -> None:
        """End the command's stdin (it reads EOF)."""

    @abstractmethod
    def wait(self, timeout: float) -> int:
        """The command's exit status, once it has exited: -1 when the connection
        dropped first (or the command was stopped), -N when signal N killed it
        locally. Raises CommandTimedOut past ``timeout``."""

    @abstractmethod
    def stderr(self) -> str:
        """What the command wrote to stderr so far."""

    @abstractmethod
    def close(self) -> None:
        """Stop the command if it still runs, and release what the stream holds."""


def _text(data: bytes) -> str:
    """A command's output as text: UTF-8, whatever it cannot decode replaced."""
    return data.decode("utf-8", "replace")
