"""Commands on this machine, for a worker that runs on its node (``transport = "local"``).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from typing import TYPE_CHECKING

from ..errors import (
    CommandTimedOut,
    NodeError,
)

if TYPE_CHECKING:
    pass
from .base import CommandResult, OutputTail, Stream, Transport, _text


class _PipeStream(Stream):
    """A local command's pipes. Its stderr is read by a thread, so it never fills up."""

    def __init__(self, node: str, process: subprocess.Popen[bytes]) -> None:
        self.node = node
        self.process = process
        self._stderr = bytearray()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := self.process.stderr.read1(65536):  # type: ignore[attr-defined]
            self._stderr += chunk

    def _timed_out(self, timeout: float) -> CommandTimedOut:
        return CommandTimedOut(self.node, f"stream made no progress within {timeout:g} s", timeout)

    def read(self, size: int, timeout: float) -> bytes:
        assert self.process.stdout is not None
        poller = select.poll()
        poller.register(self.process.stdout.fileno(), select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1000):
            raise self._timed_out(timeout)
        return self.process.stdout.read1(size)  # type: ignore[attr-defined,no-any-return]

    def write(self, data: bytes, timeout: float) -> None:
        assert self.process.stdin is not None
        fd = self.process.stdin.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        try:
            while view:
                if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    raise self._timed_out(timeout)
                view = view[os.write(fd, view[:65536]):]
        except OSError as exc:  # the command closed its stdin or ended
            raise NodeError(self.node, f"the command stopped reading its input: {exc}") from exc

    def close_input(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._timed_out(timeout) from None

    def stderr(self) -> str:
        if self.process.poll() is not None:
            # the command has ended, but its last words may still be in the pipe: read them all
            self._reader.join(timeout=5)
        return _text(bytes(self._stderr))

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.close_input()
        self.process.wait()
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


class LocalTransport(Transport):
    """Runs commands on this machine, for a worker that runs on the node itself."""

    def __init__(self, node: str, env: dict[str, str] | None = None) -> None:
        self.node = node
        self.env = {**os.environ, **(env or {})}

    def run(self, command: str, timeout: float, tail: int | None = None) -> CommandResult:
        process = self._spawn(command, stdin=subprocess.DEVNULL, text=False)
        try:
            stdout, stderr = _collect(process, timeout, tail)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise CommandTimedOut(
                self.node, f"command did not finish within {timeout:g} s", timeout
            ) from None
        finally:
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
        return CommandResult(_text(stdout), _text(stderr), process.returncode)

    def open(self, command: str) -> Stream:
        return _PipeStream(self.node, self._spawn(command, stdin=subprocess.PIPE, text=False))

    def _spawn(self, command: str, stdin: int, text: bool) -> subprocess.Popen:
        """``command`` under ``/bin/sh``, in a session of its own so that stopping it
        stops the whole pipeline."""
        return subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=stdin, env=self.env, start_new_session=True, text=text)


def _collect(process: subprocess.Popen[bytes], timeout: float, tail: int | None) -> tuple[bytes, bytes]:
    """``process``'s stdout and stderr (their last ``tail`` bytes, if given), read as they come
    until both end and the process exits; TimeoutExpired past ``timeout``."""
    assert process.stdout is not None and process.stderr is not None
    deadline = time.monotonic() + timeout
    stdout, stderr = OutputTail(tail), OutputTail(tail)
    outputs = {process.stdout.fileno(): stdout, process.stderr.fileno(): stderr}
    poller = select.poll()
    for fd in outputs:
        poller.register(fd, select.POLLIN)
    while outputs:
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(process.args, timeout)
        for fd, _ in poller.poll(left * 1000):
            chunk = os.read(fd, 65536)
            if chunk:
                outputs[fd].add(chunk)
            else:  # that pipe has ended
                poller.unregister(fd)
                del outputs[fd]
    process.wait(max(0.0, deadline - time.monotonic()))
    return stdout.value(), stderr.value()
