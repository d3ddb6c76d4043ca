"""How many things ran at once (pulls seen by the proxy or logged by crictl on a node), and
how many bytes a process's connections carried."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

_SOCKET_OWNER = re.compile(r"pid=(\d+),")
_SOCKET_BYTES = re.compile(r"\bbytes_(?:sent|received):(\d+)")


def max_concurrency(intervals: Iterable[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals open at one instant.

    An interval that ends exactly when another starts does not overlap it.
    """
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def tcp_bytes(pids: Iterable[int]) -> dict[tuple[str, str], int]:
    """The bytes each established TCP connection of the processes ``pids`` has sent and received
    since it opened, by (local address, peer address), as the kernel counts them (``ss -ti``).

    What a process moves over SSH or to Redis: its ``/proc/PID/io`` counts only ``read()``
    and ``write()``, not the ``recv()`` and ``send()`` that Python's sockets use. A
    connection counts while it is open: compare two looks at the same connections.
    """
    wanted = set(pids)
    out = subprocess.run(["ss", "-tinpH", "state", "established"], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    found: dict[tuple[str, str], int] = {}
    key = None  # the connection of the line before, if it is one of ``pids``'
    for line in out.splitlines():
        if not line[:1].isspace():  # a connection; its counters follow on an indented line
            fields = line.split()
            owners = {int(pid) for pid in _SOCKET_OWNER.findall(line)}
            key = (fields[2], fields[3]) if owners & wanted and len(fields) >= 4 else None
        elif key is not None:
            found[key] = sum(int(n) for n in _SOCKET_BYTES.findall(line))
    return found


def processes_in_groups(groups: Iterable[int]) -> set[int]:
    """The pids of every live process in the process groups ``groups`` (a service started in
    its own group, such as a Celery worker and its pool processes)."""
    wanted = set(groups)
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) in wanted:
            found.add(int(stat.parent.name))
    return found
