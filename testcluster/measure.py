"""How many things ran at once: pulls seen by the proxy or logged by crictl on a node."""

from __future__ import annotations

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


def tree_io(pid: int) -> int:
    """Bytes that process ``pid`` and its descendants have read and written so far
    (``rchar`` + ``wchar`` of /proc/PID/io: files, pipes and sockets alike)."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            with open(f"/proc/{current}/io") as f:
                fields = dict(line.split(": ") for line in f.read().splitlines())
            total += int(fields["rchar"]) + int(fields["wchar"])
        except (OSError, KeyError, ValueError):
            continue
    return total
