"""Every Redis key imagesync uses, in one place."""

from __future__ import annotations

NAMESPACE = "imagesync"

#: the single-run lock; its value is the run id of the holder
LOCK = f"{NAMESPACE}:lock"
#: run ids, newest first, trimmed to the configured history length
HISTORY = f"{NAMESPACE}:runs"
#: runs still in progress, scored by the time after which they count as stuck
ACTIVE = f"{NAMESPACE}:active"
#: set: pushed images `imagesync webhook` received that no run has sent the pulls of yet;
#: a run removes the ones it ran once their pulls are sent (imagesync.pending)
WEBHOOK_PENDING = f"{NAMESPACE}:webhook:pending"
#: pushed image -> how many times it was pushed, while pending (imagesync.pending)
WEBHOOK_PUSHES = f"{NAMESPACE}:webhook:pushes"
#: sorted set (a semaphore): the backups under way, each holding a process of the control worker
BACKUPS_RUNNING = f"{NAMESPACE}:backups-running"
#: hash: every image declared in some run (normalized) -> the id of the last run that declared it;
#: what `imagesync prune` may take back from a node once it is declared no more (imagesync.declared)
DECLARED = f"{NAMESPACE}:declared"
#: hash: "repo@digest" -> when (unix seconds) a run saw its registry move a tag away from that digest;
#: such an untagged name is a leftover of the tag, not an image to spread (planning.refresh)
MOVED = f"{NAMESPACE}:moved"


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


def run_backup(run_id: str) -> str:
    """Hash: the run's backup record (imagesync.backup): what to back up, status, counts."""
    return f"{NAMESPACE}:run:{run_id}:backup"


def run_backup_results(run_id: str) -> str:
    """Hash: image -> the outcome of backing it up, as JSON."""
    return f"{NAMESPACE}:run:{run_id}:backup:results"


def run_keys(run_id: str) -> list[str]:
    return [run(run_id), run_done(run_id), run_results(run_id), run_backup(run_id), run_backup_results(run_id)]


def node_pulls(node: str) -> str:
    """Sorted set: the pulls running on a node served by a shared worker (imagesync.semaphore),
    pull -> when its lease runs out."""
    return f"{NAMESPACE}:node:{node}:pulls"


def run_holders(run_id: str, image: str) -> str:
    """Hash: under ``source = "peers-first"``, the nodes that hold ``image`` in run ``run_id``
    and can serve a copy of it (each node whose pull of it succeeded and whose route lets it
    copy) -> its platform ("" when unknown)."""
    return f"{NAMESPACE}:run:{run_id}:holders:{image}"


def node_serves(node: str) -> str:
    """Sorted set: the copies a node is serving to other nodes (imagesync.semaphore),
    copy -> when its lease runs out."""
    return f"{NAMESPACE}:node:{node}:serves"


def node_held(node: str) -> str:
    """Set: the wanted images the node held at the end of the last run (imagesync.room)."""
    return f"{NAMESPACE}:node:{node}:held"


def node_evictions(node: str) -> str:
    """Hash: image -> {"count", "free"}: how many runs in a row found it evicted from the
    node, and the node's free bytes when the last one was seen (imagesync.room)."""
    return f"{NAMESPACE}:node:{node}:evictions"


def platforms(digest: str) -> str:
    """Hash: what is known of the platforms of the image manifest ``digest`` (imagesync.platforms):
    ``has`` -> the JSON list the registry gave; ``not:<platform>`` -> a pull found nothing for it."""
    return f"{NAMESPACE}:platforms:{digest}"


#: sorted set: the registered agents (``imagesync agent``), name -> the Redis time of its last heartbeat
AGENTS = f"{NAMESPACE}:agents"


#: string: the token an agent's peer server asks of the other agents (imagesync.peerserve.fleet_token)
PEER_TOKEN = f"{NAMESPACE}:peer-token"


def agent(name: str) -> str:
    """Hash: what an agent said of its node (imagesync.agents.Registration); expires
    ``agent_forget`` seconds after the last heartbeat."""
    return f"{NAMESPACE}:agent:{name}"


def inventory_answers(request: str) -> str:
    """List: the answers of the agents asked for their images by one inventory request."""
    return f"{NAMESPACE}:inventory:{request}"
