"""How many things ran at once (pulls seen by the proxy or logged by crictl on a node),
and how many bytes processes moved over TCP."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterable


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



def process_tree(pid: int) -> set[int]:
    """``pid`` and its descendants, as /proc tells them now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo += children.get(current, [])
    return found


_SOCKET = re.compile(r"^\S+\s+\d+\s+\d+\s+(\S+)\s+(\S+)\s+users:\((.*)\)")
_PIDS = re.compile(r"pid=(\d+)")
_COUNTERS = re.compile(r"bytes_(sent|received):(\d+)")


def _sockets() -> dict[tuple[str, str], tuple[set[int], int]]:
    """Every TCP socket: (local, peer) -> (the pids holding it, bytes sent + received so far).
    Each socket's counters follow it on an indented line (a socket may have none)."""
    lines = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    found: dict[tuple[str, str], tuple[set[int], int]] = {}
    key: tuple[str, str] | None = None
    for line in lines:
        if not line[:1].isspace():
            match = _SOCKET.match(line)
            key = (match[1], match[2]) if match else None
            if match:
                found[key] = ({int(pid) for pid in _PIDS.findall(match[3])}, 0)
        elif key is not None:
            found[key] = (found[key][0], sum(int(n) for _, n in _COUNTERS.findall(line)))
    return found


class SocketBytes:
    """Bytes that the process trees of ``pids`` send and receive over TCP while it is open,
    from the kernel's counters of each socket (``ss -tinp``), read every ``interval``
    seconds: /proc/PID/io counts no socket send or receive. A socket opened and closed
    between two reads is missed: what is counted is a lower bound, exact for long transfers."""

    def __init__(self, pids: Iterable[int], interval: float = 0.2) -> None:
        self.roots, self.interval = list(pids), interval
        self.start: dict[tuple[str, str], int] = {}
        self.last: dict[tuple[str, str], int] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _read(self) -> dict[tuple[str, str], int]:
        ours = set().union(*(process_tree(pid) for pid in self.roots)) if self.roots else set()
        return {key: count for key, (pids, count) in _sockets().items() if pids & ours}

    def _watch(self) -> None:
        while not self.stopped.wait(self.interval):
            self.last.update(self._read())

    def __enter__(self) -> SocketBytes:
        self.start = self._read()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        self.last.update(self._read())

    @property
    def total(self) -> int:
        return sum(count - self.start.get(key, 0) for key, count in self.last.items())


def tcp_bytes(pids: Iterable[int]) -> dict[tuple[str, str], int]:
    """The bytes each TCP connection of the processes ``pids`` has sent and received since it
    opened, by (local address, peer address), as the kernel counts them (``ss -tinp``).

    What a process moves over SSH or to Redis: its ``/proc/PID/io`` counts only ``read()``
    and ``write()``, not the ``recv()`` and ``send()`` that Python's sockets use. A
    connection counts while it is open: compare two looks at the same connections.
    """
    wanted = set(pids)
    return {key: count for key, (owners, count) in _sockets().items() if owners & wanted}
