"""Transports: how a command reaches a node.

One small interface, :class:`Transport`, with two implementations chosen per
node by configuration:

* :class:`SSHTransport` (Fabric): one connection per node per process, opened
  lazily, reopened when it drops; host keys checked against the configured
  known_hosts file (unknown keys refused unless ``accept-new``).
* :class:`LocalTransport`: the worker runs on the node itself.

Library errors (paramiko, socket) are translated here into
:mod:`imagesync.errors`, so nothing above this module sees them.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
from fabric import Config, Connection
from paramiko.ssh_exception import NoValidConnectionsError

from .errors import (
    AuthenticationFailed,
    CommandTimedOut,
    HostKeyChanged,
    HostKeyUnknown,
    NodeError,
    NodeUnreachable,
)

if TYPE_CHECKING:
    from .config import Node, Settings


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


class LocalTransport(Transport):
    """Runs commands on this machine, for a worker that runs on the node itself."""

    def __init__(self, node: str, env: dict[str, str] | None = None) -> None:
        self.node = node
        self.env = {**os.environ, **(env or {})}

    def run(self, command: str, timeout: float) -> CommandResult:
        # A session of its own so that a timeout kills the whole pipeline.
        process = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
            text=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise CommandTimedOut(
                self.node, f"command did not finish within {timeout:g} s", timeout
            ) from None
        return CommandResult(stdout, stderr, process.returncode)


class _QuickAckSocket:
    """A TCP socket for paramiko that acknowledges what it receives at once.

    Both ends of an SSH command exchange send small packets. With Nagle's
    algorithm on our side (paramiko never turns it off), a request waits for
    the ACK of the previous one; on sshd's side (OpenSSH turns it off for
    interactive sessions only), an answer waits for our ACK of its previous
    packet, which Linux delays by 40 ms when we have nothing to send. Each stall
    cost 40 ms: a connection took ~140 ms to run its first command and each
    later command ~48 ms, against ~35 ms and ~9 ms without them
    (bench/README.md). So TCP_NODELAY is set, and TCP_QUICKACK after every
    read (Linux clears it by itself).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._quickack = getattr(socket, "TCP_QUICKACK", None)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # a socket that cannot take it still works, only slower
            pass

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        if self._quickack is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, self._quickack, 1)
            except OSError:
                self._quickack = None
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


_known_hosts_cache: dict[Path, tuple[tuple[int, int], paramiko.HostKeys]] = {}
_known_hosts_lock = threading.Lock()


def _known_hosts(path: Path) -> paramiko.HostKeys:
    """The parsed known_hosts file, read again only when it changes.

    Parsing it for every connection made inventory quadratic in the number
    of nodes (one line per node, read once per node).
    """
    stat = path.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    with _known_hosts_lock:
        cached = _known_hosts_cache.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
    keys = paramiko.HostKeys(str(path))
    with _known_hosts_lock:
        _known_hosts_cache[path] = (version, keys)
    return keys


def _execute(transport: paramiko.Transport | None, command: str, timeout: float) -> tuple[bytes, bytes, int]:
    """Run ``command`` on a new channel of ``transport``: (stdout, stderr, exit status).

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
        stdout, stderr = bytearray(), bytearray()
        # poll, not select: a worker may hold more than 1024 descriptors
        poller = select.poll()
        poller.register(channel.fileno(), select.POLLIN)
        while True:
            while channel.recv_ready():
                stdout += channel.recv(65536)
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(65536)
            if channel.eof_received or channel.closed:
                # paramiko closes both buffers on EOF: drain what is left
                stdout += _drain(channel.recv)
                stderr += _drain(channel.recv_stderr)
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            poller.poll(left * 1000)
        if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError
        return bytes(stdout), bytes(stderr), channel.recv_exit_status()
    finally:
        channel.close()


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _drain(read) -> bytes:  # type: ignore[no-untyped-def]
    data = bytearray()
    while chunk := read(65536):
        data += chunk
    return bytes(data)


class AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """OpenSSH's ``StrictHostKeyChecking=accept-new``: remember unknown keys, refuse changed ones."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts
        self._lock = threading.Lock()

    def missing_host_key(self, client, hostname, key):  # type: ignore[no-untyped-def]
        client.get_host_keys().add(hostname, key.get_name(), key)
        with self._lock:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with self.known_hosts.open("a") as handle:
                handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def known_hosts_name(host: str, port: int) -> str:
    """How known_hosts names a host: ``host`` on port 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


class SSHTransport(Transport):
    """Runs commands over SSH with Fabric; one connection, reopened when it drops."""

    def __init__(
        self,
        node: str,
        host: str,
        port: int = 22,
        user: str = "root",
        key_file: Path | None = None,
        known_hosts: Path | None = None,
        host_key_policy: str = "reject",
        connect_timeout: float = 10.0,
    ) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.user = user
        self.key_file = key_file
        self.known_hosts = known_hosts
        self.host_key_policy = host_key_policy
        self.connect_timeout = connect_timeout
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def _connect(self) -> Connection:
        if self._connection is not None and self._connection.is_connected:
            return self._connection
        self.close()
        connect_kwargs: dict[str, object] = {
            "banner_timeout": self.connect_timeout,
            "auth_timeout": self.connect_timeout,
            "channel_timeout": self.connect_timeout,
        }
        if self.key_file:
            connect_kwargs.update(key_filename=[str(self.key_file)], look_for_keys=False)
        connection = Connection(
            self.host,
            user=self.user,
            port=self.port,
            connect_timeout=max(1, round(self.connect_timeout)),
            connect_kwargs=connect_kwargs,
            config=Config(overrides={"load_ssh_configs": False}),
        )
        client = connection.client
        host_keys = client.get_host_keys()
        host_keys.clear()
        if self.known_hosts and self.known_hosts.exists():
            try:
                known = _known_hosts(self.known_hosts)
            except (OSError, paramiko.SSHException) as exc:
                raise HostKeyUnknown(self.node, f"cannot read known_hosts {self.known_hosts}: {exc}") from exc
            name = known_hosts_name(self.host, self.port)
            for key_type, key in (known.lookup(name) or {}).items():
                host_keys.add(name, key_type, key)
        if self.host_key_policy == "accept-new" and self.known_hosts:
            client.set_missing_host_key_policy(AcceptNewPolicy(self.known_hosts))
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            connect_kwargs["sock"] = _QuickAckSocket(sock)
            connection.open()
        except BaseException as exc:
            connection.close()
            raise self._translate_connect_error(exc) from exc
        transport = connection.client.get_transport()
        if transport is not None:
            transport.set_keepalive(30)
        self._connection = connection
        return connection

    def _translate_connect_error(self, exc: BaseException) -> BaseException:
        where = known_hosts_name(self.host, self.port)
        known = self.known_hosts or "~/.ssh/known_hosts"
        if isinstance(exc, paramiko.BadHostKeyException):
            return HostKeyChanged(
                self.node,
                f"host key of {where} does not match {known} (reinstalled node, or someone "
                f"in between): if the change is expected, run ssh-keygen -R '{where}' -f {known} "
                "and add the new key",
            )
        if isinstance(exc, paramiko.AuthenticationException):
            key = f" with key {self.key_file}" if self.key_file else ""
            return AuthenticationFailed(
                self.node,
                f"SSH authentication as {self.user} refused by {where}{key}: "
                f"install the key with ssh-copy-id -p {self.port} {self.user}@{self.host}",
            )
        if isinstance(exc, paramiko.SSHException) and "known_hosts" in str(exc):
            return HostKeyUnknown(
                self.node,
                f"host key of {where} is not in {known}: add it with "
                f"ssh-keyscan -p {self.port} {self.host} >> {known} (after checking it), "
                'or set ssh.host_key_policy = "accept-new"',
            )
        if isinstance(exc, (socket.timeout, TimeoutError)):
            reason = f"no answer within {self.connect_timeout:g} s"
        elif isinstance(exc, (NoValidConnectionsError, ConnectionRefusedError)):
            reason = "connection refused"
        elif isinstance(exc, socket.gaierror):
            reason = f"unknown host name {self.host!r}"
        elif isinstance(exc, (OSError, EOFError, paramiko.SSHException)):
            reason = str(exc) or type(exc).__name__
        else:
            return exc
        return NodeUnreachable(
            self.node,
            f"Cannot connect to {self.node} via SSH ({self.address}: {reason}): "
            "check that the node is up and sshd is running",
        )

    def run(self, command: str, timeout: float) -> CommandResult:
        with self._lock:
            # A connection found dead is reopened once; a command that started
            # and lost its connection is not re-run here (the caller decides).
            for attempt in (1, 2):
                connection = self._connect()
                try:
                    stdout, stderr, status = _execute(connection.client.get_transport(), command, timeout)
                    return CommandResult(_text(stdout), _text(stderr), status)
                except TimeoutError as exc:  # before OSError, of which it is one
                    self.close()
                    raise CommandTimedOut(
                        self.node, f"command did not finish within {timeout:g} s", timeout
                    ) from exc
                except (paramiko.ChannelException, paramiko.SSHException, EOFError, OSError) as exc:
                    self.close()
                    if attempt == 2:
                        raise NodeUnreachable(
                            self.node,
                            f"SSH connection to {self.node} ({self.address}) dropped: {exc or type(exc).__name__}",
                        ) from exc
            raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # closing a broken connection may fail; it is gone either way
                pass
            self._connection = None


_cache: dict[tuple[int, str], Transport] = {}
_cache_lock = threading.Lock()


def transport_for(settings: Settings, node: Node) -> Transport:
    """The transport of ``node`` for this process, kept open between calls.

    Keyed by process id as well, so that a prefork child never shares the
    parent's SSH connection.
    """
    key = (os.getpid(), node.name)
    with _cache_lock:
        transport = _cache.get(key)
        if transport is None:
            transport = _cache[key] = make_transport(settings, node)
        return transport


def make_transport(settings: Settings, node: Node) -> Transport:
    if node.transport == "local":
        env = {}
        if node.endpoint:
            env = {
                "CONTAINER_RUNTIME_ENDPOINT": node.endpoint,
                "IMAGE_SERVICE_ENDPOINT": node.endpoint,
                "CONTAINERD_ADDRESS": node.endpoint.removeprefix("unix://"),
            }
        return LocalTransport(node.name, env)
    return SSHTransport(
        node.name,
        host=node.host,
        port=node.port,
        user=settings.node_user(node),
        key_file=settings.node_key_file(node),
        known_hosts=settings.ssh.known_hosts,
        host_key_policy=settings.ssh.host_key_policy,
        connect_timeout=settings.ssh.connect_timeout,
    )


def close_all() -> None:
    with _cache_lock:
        for transport in _cache.values():
            transport.close()
        _cache.clear()


__all__ = [
    "CommandResult",
    "LocalTransport",
    "NodeError",
    "SSHTransport",
    "Transport",
    "close_all",
    "make_transport",
    "transport_for",
]
