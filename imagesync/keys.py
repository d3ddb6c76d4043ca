"""Every Redis key imagesync uses, in one place."""

from __future__ import annotations

NAMESPACE = "imagesync"

#: the single-run lock; its value is the run id of the holder
LOCK = f"{NAMESPACE}:lock"
#: run ids, newest first, trimmed to the configured history length
HISTORY = f"{NAMESPACE}:runs"
#: runs still in progress, scored by the time after which they count as stuck
ACTIVE = f"{NAMESPACE}:active"
#: set: pushed images `imagesync webhook` received that no run has started for yet;
#: a sync task removes the ones it runs, atomically, once it holds the lock
WEBHOOK_PENDING = f"{NAMESPACE}:webhook:pending"


def sync_taken(task_id: str) -> str:
    """String: set by the control worker the moment it takes a sync task (its name)."""
    return f"{NAMESPACE}:sync-taken:{task_id}"


def run(run_id: str) -> str:
    """Hash: the run record (status, counts, plan summary)."""
    return f"{NAMESPACE}:run:{run_id}"


def run_done(run_id: str) -> str:
    """Set: the pulls of the run that have reported, one member per (node, image)."""
    return f"{NAMESPACE}:run:{run_id}:done"


def run_results(run_id: str) -> str:
    """Hash: (node, image) -> the pull's outcome as JSON."""
    return f"{NAMESPACE}:run:{run_id}:results"


def run_keys(run_id: str) -> list[str]:
    return [run(run_id), run_done(run_id), run_results(run_id)]
