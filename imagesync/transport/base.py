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

#: what :meth:`Transport.run` keeps of a pull's or a push's stdout and of its stderr: the
#: end, where the runtime writes its result and why it failed (hundreds of lines)
PROGRESS_TAIL = 64 * 1024


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
    def run(self, command: str, timeout: float, tail: int | None = None) -> CommandResult:
        """Run ``command`` (a shell command line) and wait at most ``timeout`` seconds.

        Raises CommandTimedOut past the timeout and NodeUnreachable (or another
        NodeError) when the node cannot be reached; a command that runs and
        fails is a result with a non-zero exit code, not an exception.

        ``tail`` keeps only the last ``tail`` bytes of stdout and of stderr
        (:data:`PROGRESS_TAIL` for a pull or a push, which rewrite their progress
        every 100 ms: tens of MB over a long pull); None keeps all of it, as a
        listing of images needs.
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


class OutputTail:
    """A command's output as it arrives: all of it, or its last ``limit`` bytes."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._data = bytearray()

    def add(self, chunk: bytes) -> None:
        self._data += chunk
        # cut once it is twice the limit: each byte is moved at most once or twice
        if self.limit is not None and len(self._data) > 2 * self.limit:
            del self._data[:-self.limit]

    def value(self) -> bytes:
        return bytes(self._data if self.limit is None else self._data[-self.limit:])


def _text(data: bytes) -> str:
    """A command's output as text: UTF-8, whatever it cannot decode replaced."""
    return data.decode("utf-8", "replace")
