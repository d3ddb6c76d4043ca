"""Host keys: the known_hosts files a connection checks, and accept-new's recording.

How known_hosts names a host (:func:`known_hosts_name`), the parsed files kept
between connections (:func:`read_known_hosts`) and OpenSSH's ``accept-new``
(:class:`AcceptNewPolicy`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import paramiko

_known_hosts_cache: dict[Path, tuple[tuple[int, int], paramiko.HostKeys]] = {}
_known_hosts_lock = threading.Lock()


def read_known_hosts(path: Path) -> paramiko.HostKeys:
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
