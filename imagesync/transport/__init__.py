"""Transports: how a command reaches a node.

One small interface, :class:`Transport`, with two implementations chosen per
node by configuration:

* :class:`SSHTransport` (Fabric, :mod:`.ssh`): one connection per node per process, opened
  lazily, reopened when it drops; host keys checked against the configured
  known_hosts file (unknown keys refused unless ``accept-new``). Host, port,
  user, keys, known_hosts and the jump host (ProxyJump, one hop) are those of
  ``Settings.ssh_target``: imagesync's settings, then the operator's OpenSSH
  client configuration. A handshake sshd drops (past its MaxStartups, as when
  every pool process connects at once) is retried with jittered backoff
  within the connect timeout.
* :class:`LocalTransport` (:mod:`.local`): the worker runs on the node itself.

The interface is :mod:`.base`; this module picks a node's transport and keeps
one per node per process.

Library errors (paramiko, socket) are translated here into
:mod:`imagesync.errors`, so nothing above this module sees them.

:mod:`.ssh` (Fabric and paramiko, a tenth of a second to import) is imported
when the first SSH transport is made, not with this package: ``imagesync
sync`` or an agent, which reach no node over SSH in their own process, never
load it.  ``SSHTransport`` and ``HANDSHAKE_RETRIES`` are still names of this
package (:func:`__getattr__`).
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import TYPE_CHECKING, Any

from ..errors import NodeError
from .base import PROGRESS_TAIL, CommandResult, Stream, Transport
from .local import LocalTransport

if TYPE_CHECKING:
    from ..config import Node, Settings, SSHTarget
    from .ssh import HANDSHAKE_RETRIES, SSHTransport

#: the names of :mod:`.ssh` this package gives, looked up there on first use
_FROM_SSH = ("HANDSHAKE_RETRIES", "SSHTransport")


def __getattr__(name: str) -> Any:
    if name not in _FROM_SSH:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".ssh", __name__), name)
    globals()[name] = value
    return value

_cache: dict[tuple[int, str], Transport] = {}
_cache_lock = threading.Lock()
# jump hosts' transports, shared by the nodes behind them in one process: one
# connection to the jump host carries a channel per node
_jumps: dict[tuple[object, ...], SSHTransport] = {}
_jumps_lock = threading.Lock()


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
    # host, port, user, keys, known_hosts, timeout and jump host as imagesync's
    # settings and the OpenSSH client configuration give them (config.sshconfig)
    target = settings.ssh_target(node)
    from .ssh import SSHTransport

    return SSHTransport(
        node.name,
        host=target.host,
        port=target.port,
        user=target.user,
        key_file=target.key_files,
        known_hosts=target.known_hosts,
        host_key_policy=settings.ssh.host_key_policy,
        connect_timeout=target.connect_timeout,
        jump=_jump_transport(target.jump, settings.ssh.host_key_policy, node.name) if target.jump else None,
    )


def _jump_transport(jump: SSHTarget, host_key_policy: str, node: str) -> SSHTransport:
    """The transport of a jump host, shared by the nodes behind it in this process."""
    key = (os.getpid(), jump.host, jump.port, jump.user, jump.key_files, jump.known_hosts, host_key_policy,
           jump.connect_timeout)
    from .ssh import SSHTransport

    with _jumps_lock:
        transport = _jumps.get(key)
        if transport is None:
            transport = _jumps[key] = SSHTransport(
                node, host=jump.host, port=jump.port, user=jump.user, key_file=jump.key_files,
                known_hosts=jump.known_hosts, host_key_policy=host_key_policy,
                connect_timeout=jump.connect_timeout, role=f"jump host {jump.name}",
            )
        return transport


def close_all() -> None:
    with _cache_lock:
        for transport in _cache.values():
            transport.close()
        _cache.clear()
    with _jumps_lock:
        for jump in _jumps.values():
            jump.close()
        _jumps.clear()


__all__ = [
    "HANDSHAKE_RETRIES",
    "PROGRESS_TAIL",
    "CommandResult",
    "LocalTransport",
    "NodeError",
    "SSHTransport",
    "Stream",
    "Transport",
    "close_all",
    "make_transport",
    "transport_for",
]
