"""What a pull can end in, and the record of one pull: the vocabulary that the
pull, its sources, the run store, the logs and the exporter share.

A leaf: it names outcomes and imports nothing of imagesync, so that a source
can answer an outcome without knowing where runs are kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

#: pull outcomes; the successes mean the node now holds the image: pulled from the
#: registry, found present, copied from another node, restored from the backup, or
#: updated (the node held the tag under a digest the registry has since moved from)
PULLED, PRESENT, COPIED, RESTORED, UPDATED = "pulled", "present", "copied", "restored", "updated"
FAILED, TIMED_OUT, EXPIRED, SKIPPED = "failed", "timed_out", "expired", "skipped"
#: the image has nothing for the node's platform: not pulled, and not a failure
NOT_APPLICABLE = "not_applicable"
#: prune outcomes (imagesync.prune): a retired image the node no longer holds; one it keeps, the reason said
REMOVED, KEPT = "removed", "kept"
SUCCESSES = (PULLED, PRESENT, COPIED, RESTORED, UPDATED)
OUTCOMES = (*SUCCESSES, NOT_APPLICABLE, REMOVED, KEPT, FAILED, TIMED_OUT, EXPIRED, SKIPPED)
#: outcomes that do not make a run fail
NOT_FAILURES = (*SUCCESSES, NOT_APPLICABLE, REMOVED, KEPT)


@dataclass
class Outcome:
    """What one pull did."""

    node: str
    image: str
    status: str
    duration: float = 0.0
    reason: str = ""
    attempts: int = 1
    finished: float = field(default_factory=time.time)
    #: where the image came from when not from its registry: a node, or the backup registry
    source: str = ""
    #: of an update: the digest the node held the tag under, and the one it holds now
    replaced: str = ""
    digest: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status in SUCCESSES

    @property
    def failed(self) -> bool:
        return self.status not in NOT_FAILURES

    def describe(self) -> str:
        """``copied from node-1``, ``timed out``: the status as the logs and summaries say it."""
        text = self.status.replace("_", " ")
        if self.source:
            text += f" {'from' if self.status in (COPIED, RESTORED, UPDATED) else 'via'} {self.source}"
        if self.replaced:
            text += f" ({short(self.replaced)} -> {short(self.digest) or 'new digest'})"
        return text

    def to_json(self) -> str:
        data = asdict(self)
        for name in ("source", "replaced", "digest"):
            if not data[name]:
                del data[name]
        return json.dumps(data, separators=(",", ":"))


def short(digest: str) -> str:
    """``sha256:0123456789ab``: a digest as a log line shows it, its first 12 hex digits."""
    algorithm, _, hex_digits = digest.partition(":")
    return f"{algorithm}:{hex_digits[:12]}" if hex_digits else digest
