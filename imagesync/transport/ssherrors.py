"""paramiko's and the socket's errors in imagesync's words (:mod:`imagesync.errors`).

A failed connection becomes one :class:`~imagesync.errors.NodeError` whose text
says what to do (:func:`connect_error`); a handshake that sshd dropped is told
apart so that it can be tried again (:func:`handshake_dropped`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import paramiko
from paramiko.ssh_exception import NoValidConnectionsError

from ..errors import AuthenticationFailed, HostKeyChanged, HostKeyUnknown, NodeError, NodeUnreachable
from .hostkeys import known_hosts_name


class Connecting(Protocol):
    """What :func:`connect_error` reads of the transport that failed to connect
    (:class:`~imagesync.transport.ssh.SSHTransport`, its jump host one as well)."""

    node: str
    role: str | None
    host: str
    port: int
    user: str
    connect_timeout: float
    key_files: Sequence[Path]
    known_hosts_files: Sequence[Path]

    @property
    def jump(self) -> Connecting | None: ...

    @property
    def known_hosts(self) -> Path: ...

    @property
    def address(self) -> str: ...

    @property
    def subject(self) -> str: ...


def handshake_dropped(exc: BaseException) -> bool:
    """Whether sshd closed the connection before or during the key exchange.

    That is what sshd does to connections past ``MaxStartups`` (unauthenticated
    connections at once; ``10:30:100`` by default): paramiko then reads no
    banner ("Error reading SSH protocol banner") or loses the connection in the
    key exchange (reset, EOF). Refused connections, timeouts, refused keys and
    host key problems are not among them.
    """
    if isinstance(exc, (paramiko.AuthenticationException, paramiko.BadHostKeyException)):
        return False
    if isinstance(exc, paramiko.SSHException):
        return str(exc).startswith("Error reading SSH protocol banner") and not timed_out(exc.__context__)
    return isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError))


def timed_out(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a timeout (a socket's, or the deadline's)."""
    return isinstance(exc, (socket.timeout, TimeoutError))


def for_node(exc: NodeError, node: str) -> NodeError:
    """The same error, told about ``node`` (a jump host's errors are its nodes' errors)."""
    if exc.node == node:
        return exc
    try:
        error = type(exc)(node, exc.message)
    except TypeError:  # an error with other arguments: it is, in the end, an unreachable node
        error = NodeUnreachable(node, exc.message)
    return error


def connect_error(transport: Connecting, exc: BaseException, attempts: int = 1, took: float = 0.0) -> BaseException:
    """The NodeError for ``transport``'s failed connection (``exc`` itself if it is no
    connection's error); ``attempts`` handshakes in ``took`` seconds, when sshd dropped them."""
    where = known_hosts_name(transport.host, transport.port)
    named = f"{where} ({transport.role})" if transport.role else where
    known = ", ".join(str(path) for path in transport.known_hosts_files)
    first = transport.known_hosts
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyChanged(
            transport.node,
            f"host key of {named} does not match {known} (reinstalled node, or someone "
            f"in between): if the change is expected, run ssh-keygen -R '{where}' -f {first} "
            "and add the new key",
        )
    if isinstance(exc, paramiko.AuthenticationException):
        keys = ", ".join(str(path) for path in transport.key_files)
        key = f" with key {keys}" if keys else ""
        return AuthenticationFailed(
            transport.node,
            f"SSH authentication as {transport.user} refused by {named}{key}: "
            f"install the key with ssh-copy-id -p {transport.port} {transport.user}@{transport.host}",
        )
    if isinstance(exc, paramiko.SSHException) and "known_hosts" in str(exc):
        if all(str(path) == os.devnull for path in transport.known_hosts_files):
            return HostKeyUnknown(
                transport.node, f"host key of {named} is not in {known}: that file keeps no keys (UserKnownHostsFile "
                "/dev/null in the SSH config?): name a real file with ssh.known_hosts or UserKnownHostsFile, and add "
                "the key there")
        if transport.jump is not None:
            fix = (f"add it with ssh -p {transport.jump.port} {transport.jump.user}@{transport.jump.host} ssh-keyscan "
                   f"-p {transport.port} {transport.host} >> {first} (after checking it)")
        else:
            fix = (f"add it with ssh-keyscan -p {transport.port} {transport.host} >> {first} "
                   "(after checking it)")
        # accept-new records it in the first file, which keeps it (a file that keeps nothing is refused)
        return HostKeyUnknown(
            transport.node, f'host key of {named} is not in {known}: {fix}, or set ssh.host_key_policy = "accept-new"'
        )
    advice = "check that the node is up and sshd is running" if transport.role is None else \
        "check that it is up and sshd is running"
    if timed_out(exc) or (isinstance(exc, paramiko.SSHException) and timed_out(exc.__context__)):
        reason = f"no answer within {transport.connect_timeout:g} s"
    elif isinstance(exc, (NoValidConnectionsError, ConnectionRefusedError)):
        reason = "connection refused"
    elif isinstance(exc, socket.gaierror):
        reason = f"unknown host name {transport.host!r}"
    elif handshake_dropped(exc):
        cause = exc.__context__ if isinstance(exc, paramiko.SSHException) else exc
        detail = "reset" if isinstance(cause, (ConnectionResetError, BrokenPipeError)) else "closed"
        tries = f", {attempts} attempts in {took:.1f} s" if attempts > 1 else ""
        reason = f"sshd {detail} the connection during the SSH handshake{tries}"
        advice += (", and that its MaxStartups allows as many connections at once as imagesync opens "
                   "(docs/troubleshooting.md, SSH)")
    elif isinstance(exc, (OSError, EOFError, paramiko.SSHException)):
        reason = str(exc) or type(exc).__name__
    else:
        return exc
    return NodeUnreachable(
        transport.node,
        f"Cannot connect to {transport.subject} via SSH ({transport.address}"
        + (f" through {transport.jump.subject} {transport.jump.address}" if transport.jump else "")
        + f": {reason}): {advice}",
    )
