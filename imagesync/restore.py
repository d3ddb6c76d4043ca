"""The ``backup`` source of a pull's route: an image restored from the backup registry.

Tried after the registry and before other nodes: the node pulls the backup
name (:func:`imagesync.references.backup_name`) with ``ctr``, checks its
digest, tags it with the original name and removes the backup name
(:meth:`imagesync.runtimes.Ctr.restore_command`). A node without ``ctr`` (a
crictl-only node) cannot do it: the CRI pulls, but has no call that gives an
image another name. What keeps the backup complete is :mod:`imagesync.backup`.
"""

from __future__ import annotations

import time

from . import references, runtimes
from .attempt import Attempt
from .budgets import KILL_AFTER, SSH_GRACE
from .errors import CommandTimedOut, NodeError, RefusedReference
from .outcomes import FAILED, RESTORED, TIMED_OUT, Outcome
from .transport import transport_for


def from_backup(attempt: Attempt) -> tuple[Outcome, bool]:
    """Restore the attempt's image on its node from the backup registry, under its original name.

    The outcome is ``restored`` with the backup registry as its source; a
    failure is permanent unless the node or the backup may answer later.
    """
    settings, node = attempt.settings, attempt.node
    started = time.monotonic()
    backup = settings.backup

    def outcome(status: str, reason: str = "") -> Outcome:
        return Outcome(node.name, attempt.image, status, round(time.monotonic() - started, 3), reason,
                       source=backup.registry if backup is not None and status == RESTORED else "")

    if backup is None:
        return outcome(FAILED, "no backup registry is configured ([backup] registry)"), False
    seconds = max(1, min(settings.time_out, attempt.remaining()))
    try:
        image = references.normalize(attempt.image)
        name = references.backup_name(backup.registry, image)
        if name is None:
            return outcome(FAILED, "the backup keeps tagged images only: this one has no tag"), False
        command = runtimes.ctr_for(node).restore_command(name, image, seconds, attempt.route.digest,
                                                         backup.insecure, backup.login())
    except RefusedReference as exc:
        return outcome(FAILED, f"refused: {exc.reason}"), False
    try:
        result = transport_for(settings, node).run(command, timeout=seconds + KILL_AFTER + SSH_GRACE)
    except CommandTimedOut as exc:
        return outcome(TIMED_OUT, exc.message), False
    except NodeError as exc:
        return outcome(FAILED, exc.message), exc.transient
    if result.exit_code in runtimes.TIMEOUT_EXIT_CODES:
        reason = f"restore from the backup did not finish within {seconds} s; stopped on the node"
        return outcome(TIMED_OUT, reason), False
    if result.exit_code == runtimes.COMMAND_NOT_FOUND:
        return outcome(FAILED, f"ctr is not installed on {node.name}: a crictl-only node can pull the backup name "
                               "but cannot give the image its original name back; install containerd's ctr"), False
    if not result.ok:
        reason = "backup: " + runtimes.failure_reason(result.stderr, result.stdout)
        return outcome(FAILED, reason), runtimes.is_transient(reason)
    marker = runtimes.RESTORED_MARKER
    line = next((line for line in result.stdout.splitlines() if line.startswith(marker)), "")
    digests = line.split()[1:]
    if len(digests) != 2 or not digests[0] or digests[0] != digests[1]:
        return outcome(FAILED, f"restored from {name}, but {image} does not point at the digest pulled "
                               f"({' vs '.join(digests) or 'no digest'})"), False
    return outcome(RESTORED), False
