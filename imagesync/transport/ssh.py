"""Commands on a node over SSH (Fabric/paramiko): :class:`SSHTransport`.

One connection per node per process, opened lazily, reopened when it drops;
host keys checked against the configured known_hosts file (unknown keys refused
unless ``accept-new``); a jump host (ProxyJump, one hop); a handshake that sshd
drops retried with jittered backoff within the connect timeout. paramiko and
socket errors become :mod:`imagesync.errors` here, in the words of :mod:`.ssherrors`;
the known_hosts files and accept-new are :mod:`.hostkeys`.
"""

from __future__ import annotations

import logging
import os
import random
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import paramiko
from fabric import Config, Connection

from .. import timelimits
from ..config import forgetful_accept_new, keeps_nothing
from ..errors import CommandTimedOut, ConfigError, HostKeyUnknown, NodeError, NodeUnreachable
from .base import CommandResult, OutputTail, Stream, Transport, _text
from .hostkeys import AcceptNewPolicy, known_hosts_name, read_known_hosts
from .ssherrors import connect_error, for_node, handshake_dropped
from .tcp import QuickAckSocket

_T = TypeVar("_T")


class _ChannelStream(Stream):
    """A command on its own SSH channel. Closing the channel ends its stdin and
    stdout on the node, which stops the command (an export dies writing to
    a closed pipe; an import reads EOF); the node's ``timeout`` bounds the rest."""

    def __init__(self, node: str, channel: paramiko.Channel, on_close: Callable[[], None] = lambda: None) -> None:
        self.node = node
        self.channel = channel
        self._stderr = bytearray()
        self._on_close: Callable[[], None] | None = on_close

    def _drain_stderr(self) -> None:
        while self.channel.recv_stderr_ready():
            self._stderr += self.channel.recv_stderr(65536)

    def _timed_out(self, timeout: float) -> CommandTimedOut:
        return CommandTimedOut(self.node, f"stream made no progress within {timeout:g} s", timeout)

    def read(self, size: int, timeout: float) -> bytes:
        self._drain_stderr()
        self.channel.settimeout(max(0.001, timeout))
        try:
            return self.channel.recv(size)  # type: ignore[no-any-return]
        except TimeoutError:
            raise self._timed_out(timeout) from None

    def write(self, data: bytes, timeout: float) -> None:
        self._drain_stderr()
        self.channel.settimeout(max(0.001, timeout))
        try:
            self.channel.sendall(data)
        except TimeoutError:
            raise self._timed_out(timeout) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise NodeError(self.node, f"the command stopped reading its input: {exc or 'channel closed'}") from exc

    def close_input(self) -> None:
        try:
            self.channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while not self.channel.status_event.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            self._drain_stderr()
            if time.monotonic() >= deadline:
                raise self._timed_out(timeout)
        self._drain_stderr()
        return int(self.channel.exit_status)

    def stderr(self) -> str:
        self._drain_stderr()
        return _text(bytes(self._stderr))

    def close(self) -> None:
        self.channel.close()
        if self._on_close is not None:
            self._on_close, on_close = None, self._on_close
            on_close()


class _RecentChannels(OrderedDict):  # type: ignore[type-arg]
    """paramiko's record of the channels a connection has closed, bounded.

    paramiko keeps every channel id a connection ever used (``channels_seen``), so that
    a message arriving for a closed channel is ignored rather than taken for a protocol
    error (which ends the connection). A node's connection opens a channel per command
    for as long as the worker runs: without a bound, that record grows by one entry per
    pull. Late messages come within moments of the close, so the last few thousand do.
    """

    KEEP = 4096

    def __setitem__(self, key: object, value: object) -> None:
        super().__setitem__(key, value)
        if len(self) > self.KEEP:
            self.popitem(last=False)


def _execute(transport: paramiko.Transport | None, command: str, timeout: float,
             tail: int | None = None) -> tuple[bytes, bytes, int]:
    """Run ``command`` on a new channel of ``transport``: (stdout, stderr, exit status),
    each cut to its last ``tail`` bytes if given.

    Straight on paramiko rather than through Fabric's runner, which polls
    every 10 ms for the end of the command and starts three threads per
    command: ~7 ms and ~2 ms of CPU per command (bench/README.md). Both
    streams are read as they come, so neither can fill the channel's window
    and stall the other. Raises TimeoutError past ``timeout``.
    """
    if transport is None or not transport.is_active():
        raise paramiko.SSHException("SSH session not active")
    deadline = time.monotonic() + timeout
    channel = transport.open_session(timeout=timeout)
    try:
        channel.exec_command(command)
        channel.shutdown_write()  # no input: the command sees EOF on stdin
        stdout, stderr = OutputTail(tail), OutputTail(tail)
        # poll, not select: a worker may hold more than 1024 descriptors
        poller = select.poll()
        poller.register(channel.fileno(), select.POLLIN)
        while True:
            while channel.recv_ready():
                stdout.add(channel.recv(65536))
            while channel.recv_stderr_ready():
                stderr.add(channel.recv_stderr(65536))
            if channel.eof_received or channel.closed:
                # paramiko closes both buffers on EOF: drain what is left
                _drain(channel.recv, stdout)
                _drain(channel.recv_stderr, stderr)
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            poller.poll(left * 1000)
        if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError
        return stdout.value(), stderr.value(), channel.recv_exit_status()
    finally:
        channel.close()


def _drain(read, into: OutputTail) -> None:  # type: ignore[no-untyped-def]
    while chunk := read(65536):
        into.add(chunk)


#: paramiko logs a failed handshake at ERROR, with a traceback, from its own thread. The
#: failure reaches the caller as one NodeError, and a retried one is no failure at all, so
#: during the handshake paramiko logs here, where those records are dropped (DEBUG and INFO
#: still pass, for whoever turns them on).
_HANDSHAKE_LOG = "paramiko.transport.handshake"
logging.getLogger(_HANDSHAKE_LOG).addFilter(lambda record: record.levelno < logging.ERROR)

#: handshakes tried again after sshd dropped the connection (past its MaxStartups), all
#: within connect_timeout; the first pause, doubled each time up to the cap, is jittered ±50 %
HANDSHAKE_RETRIES = 6
_RETRY_FIRST, _RETRY_CAP = 0.1, 2.0


def _pause(attempt: int) -> float:
    """Seconds to wait before handshake ``attempt + 1``: exponential, capped, jittered."""
    return min(_RETRY_CAP, _RETRY_FIRST * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def _paths(value: Path | Sequence[Path] | None) -> tuple[Path, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        return (Path(value),)
    return tuple(Path(item) for item in value)


class SSHTransport(Transport):
    """Runs commands over SSH with Fabric; one connection, reopened when it drops.

    ``key_file`` and ``known_hosts`` may each be several files: every key is
    offered, every known_hosts file is read, and accept-new records new keys
    in the first (``~/.ssh/known_hosts`` when none is given); a first file that
    keeps nothing (/dev/null) would let accept-new take any key on every
    connection, so that combination is a ConfigError. ``jump`` is the transport of a jump host (ProxyJump): the
    connection then goes through a "direct-tcpip" channel of the jump host's
    connection, as ``ssh -J`` does, and the node's host key is checked all
    the same. A handshake sshd drops (past its MaxStartups) is tried again,
    up to ``handshake_retries`` times with jittered backoff, within
    ``connect_timeout``. ``role`` names what this connects to in messages
    when it is not the node itself ("jump host bastion").
    """

    def __init__(
        self,
        node: str,
        host: str,
        port: int = 22,
        user: str = "root",
        key_file: Path | Sequence[Path] | None = None,
        known_hosts: Path | Sequence[Path] | None = None,
        host_key_policy: str = "reject",
        connect_timeout: float = 10.0,
        jump: SSHTransport | None = None,
        handshake_retries: int = HANDSHAKE_RETRIES,
        role: str | None = None,
    ) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.user = user
        self.key_files = _paths(key_file)
        # none given: where ssh itself looks, and records
        self.known_hosts_files = _paths(known_hosts) or (Path(os.path.expanduser("~/.ssh/known_hosts")),)
        if host_key_policy == "accept-new" and keeps_nothing(self.known_hosts_files[0]):
            raise ConfigError([forgetful_accept_new(f"known_hosts {self.known_hosts_files[0]} of {role or node}")])
        self.host_key_policy = host_key_policy
        self.connect_timeout = connect_timeout
        self.jump = jump
        self.handshake_retries = handshake_retries
        self.role = role
        #: handshakes the last connection took (1 unless sshd dropped some)
        self.attempts = 0
        self._connection: Connection | None = None
        self._lock = threading.Lock()
        self._using = 0  # commands and streams on the connection, of every thread

    @property
    def key_file(self) -> Path | None:
        return self.key_files[0] if self.key_files else None

    @property
    def known_hosts(self) -> Path:
        """The known_hosts file accept-new records keys in."""
        return self.known_hosts_files[0]

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def subject(self) -> str:
        """What this connects to, in messages: its role, else the node."""
        return self.role or self.node

    def _connect(self) -> Connection:
        if self._connection is not None and self._connection.is_connected:
            return self._connection
        self.close()
        began = time.monotonic()
        deadline = began + self.connect_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                connection = self._open(deadline)
                break
            except NodeError:  # from the jump host, or known_hosts: already in words
                raise
            except BaseException as exc:
                pause = _pause(attempt)
                if (not handshake_dropped(exc) or attempt > self.handshake_retries
                        or time.monotonic() + pause >= deadline):
                    raise connect_error(self, exc, attempt, time.monotonic() - began) from exc
                time.sleep(pause)
        self.attempts = attempt
        self._connection = connection
        return connection

    def _open(self, deadline: float) -> Connection:
        """One handshake: a new socket (or a channel of the jump host), host keys, authentication."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        connect_kwargs: dict[str, object] = {
            "banner_timeout": left,
            "auth_timeout": self.connect_timeout,
            "channel_timeout": self.connect_timeout,
        }
        if self.key_files:
            connect_kwargs.update(key_filename=[str(path) for path in self.key_files], look_for_keys=False)
        connection = Connection(
            self.host,
            user=self.user,
            port=self.port,
            connect_timeout=max(1, round(left)),
            connect_kwargs=connect_kwargs,
            # imagesync applies the OpenSSH client configuration itself (config.sshconfig)
            config=Config(overrides={"load_ssh_configs": False}),
        )
        client = connection.client
        self._load_host_keys(client)
        client.set_log_channel(_HANDSHAKE_LOG)
        try:
            if self.jump is not None:
                connect_kwargs["sock"] = self.jump.open_tunnel(self.host, self.port, left, self.node)
            else:
                sock = socket.create_connection((self.host, self.port), timeout=left)
                connect_kwargs["sock"] = QuickAckSocket(sock)
            connection.open()
        except BaseException:
            connection.close()
            raise
        transport = client.get_transport()
        if transport is not None:
            transport.set_log_channel("paramiko.transport")
            transport.set_keepalive(30)
            transport.channels_seen = _RecentChannels(transport.channels_seen)
        return connection

    def _load_host_keys(self, client: paramiko.SSHClient) -> None:
        host_keys = client.get_host_keys()
        host_keys.clear()
        name = known_hosts_name(self.host, self.port)
        for path in self.known_hosts_files:
            if not path.exists():
                continue
            try:
                known = read_known_hosts(path)
            except (OSError, paramiko.SSHException) as exc:
                raise HostKeyUnknown(self.node, f"cannot read known_hosts {path}: {exc}") from exc
            for key_type, key in (known.lookup(name) or {}).items():
                host_keys.add(name, key_type, key)
        if self.host_key_policy == "accept-new":
            client.set_missing_host_key_policy(AcceptNewPolicy(self.known_hosts))
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())

    def open_tunnel(self, host: str, port: int, timeout: float, node: str) -> paramiko.Channel:
        """A channel to ``host:port`` opened by this host (a jump host), for ``node``'s connection.

        This host's connection is opened first if need be; its errors and the
        channel's are ``node``'s errors.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    connection = self._connect()
                except NodeError as exc:
                    raise for_node(exc, node) from exc
                try:
                    return connection.client.get_transport().open_channel(
                        "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout)
                except paramiko.ChannelException as exc:  # the jump host answered: it cannot, or may not
                    raise NodeUnreachable(
                        node,
                        f"Cannot connect to {node} via SSH ({host}:{port} through {self.subject} {self.address}: "
                        f"{exc.text or exc}): check that the node is up and sshd is running, and that "
                        f"{self.subject} can reach it and allows TCP forwarding (AllowTcpForwarding)",
                    ) from exc
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    self.close()
                    if attempt == 2:
                        raise NodeUnreachable(
                            node, f"SSH connection to {self.subject} ({self.address}) dropped: "
                            f"{exc or type(exc).__name__}") from exc
            raise AssertionError("unreachable")

    def _on_connection(self, use: Callable[[paramiko.Transport | None], _T]) -> _T:
        """``use`` the node's connection. A connection found dead is reopened once;
        a command that started and lost its connection is not re-run here (the caller decides).
        The lock covers opening it only: a worker's threads share it, each command on a
        channel of its own, so a node's pulls run at once. A command that times out
        closes its channel, and the connection (maybe dead: a vanished node sends no
        reset) only when no other command uses it."""
        for attempt in (1, 2):
            with self._lock:
                connection = self._connect()
                self._using += 1
            try:
                return use(connection.client.get_transport())
            except TimeoutError:  # before OSError, of which it is one: the command's, not the connection's
                self._drop(connection, only_if_idle=True)
                raise
            except (paramiko.ChannelException, paramiko.SSHException, EOFError, OSError) as exc:
                self._drop(connection)
                if attempt == 2:
                    raise NodeUnreachable(
                        self.node,
                        f"SSH connection to {self.node} ({self.address}) dropped: {exc or type(exc).__name__}",
                    ) from exc
            finally:
                with self._lock:
                    self._using -= 1
        raise AssertionError("unreachable")

    def _drop(self, connection: Connection, only_if_idle: bool = False) -> None:
        """Close ``connection`` if still ours (not reopened by another thread) and, if ``only_if_idle``, unused."""
        with self._lock:
            if self._connection is connection and not (only_if_idle and self._using > 1):
                self.close()

    def run(self, command: str, timeout: float, tail: int | None = None) -> CommandResult:
        timeout = timelimits.clamp(timeout)  # in a thread pool, no longer than the task's time limit
        try:
            stdout, stderr, status = self._on_connection(lambda transport: _execute(transport, command, timeout, tail))
        except TimeoutError as exc:
            raise CommandTimedOut(self.node, f"command did not finish within {timeout:g} s", timeout) from exc
        return CommandResult(_text(stdout), _text(stderr), status)

    def open(self, command: str) -> Stream:
        def start(transport: paramiko.Transport | None) -> Stream:
            if transport is None or not transport.is_active():
                raise paramiko.SSHException("SSH session not active")
            channel = transport.open_session(timeout=self.connect_timeout)
            channel.exec_command(command)
            with self._lock:
                self._using += 1  # until the stream is closed: its connection is in use
            return _ChannelStream(self.node, channel, self._stream_closed)

        return self._on_connection(start)

    def _stream_closed(self) -> None:
        with self._lock:
            self._using -= 1

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # closing a broken connection may fail; it is gone either way
                pass
            self._connection = None
