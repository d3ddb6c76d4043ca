"""The record of a run's backup, beside its run record, and where each of its outcomes is told.

A run's backup (:mod:`imagesync.backup`) reports one :class:`BackupOutcome` per
image it had to copy: into the record (:class:`BackupStore`, read by
``imagesync history RUN``), the day's ``backup_images.log`` and the log; the
outcome that completes the record also logs the summary (:func:`summary_lines`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from . import keys, logs
from .redisvalues import as_text

if TYPE_CHECKING:
    from redis import Redis

    from .config import Settings

log = logging.getLogger("imagesync")

#: outcomes of backing up one image
BACKED_UP, BACKUP_FAILED = "backed-up", "failed"
#: the day's log of backup outcomes
BACKUP_LOG = "backup_images.log"

# An outcome reports; returns 0 if the backup is not running, 2 if this outcome
# completed it, 1 otherwise. An outcome reported twice counts once (HSET).
_RECORD = """
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HLEN', KEYS[2]) >= tonumber(redis.call('HGET', KEYS[1], 'expected')) then
    redis.call('HSET', KEYS[1], 'status', 'done', 'finished', ARGV[3])
    return 2
end
return 1
"""


@dataclass
class BackupOutcome:
    """What backing up one image did."""

    image: str
    name: str
    status: str
    #: where the copy came from: the upstream registry, or the node that pushed it
    source: str = ""
    reason: str = ""
    duration: float = 0.0
    finished: float = field(default_factory=time.time)

    def describe(self) -> str:
        return self.status + (f" from {self.source}" if self.source else "")


class BackupStore:
    """The backup record of each run, beside its run record."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._record = redis.register_script(_RECORD)

    def remember(self, run_id: str, wanted: Mapping[str, Mapping[str, Any]]) -> None:
        """What the run's backup is to check, written when the run is planned."""
        self.redis.hset(keys.run_backup(run_id), mapping={
            "status": "pending", "candidates": json.dumps(wanted, separators=(",", ":"))})

    def candidates(self, run_id: str) -> dict[str, dict[str, Any]] | None:
        raw = self.redis.hget(keys.run_backup(run_id), "candidates")
        return None if raw is None else json.loads(as_text(raw))

    def start(self, run_id: str, expected: int, held: int) -> bool:
        """Mark the backup running with ``expected`` outcomes to come; False if it already started."""
        with self.redis.pipeline() as pipe:
            pipe.hsetnx(keys.run_backup(run_id), "started", repr(time.time()))
            pipe.hset(keys.run_backup(run_id), mapping={"expected": expected, "held": held})
            first = pipe.execute()[0]
        if not first:
            return False
        self.redis.hset(keys.run_backup(run_id), mapping={
            "status": "running" if expected else "done",
            **({} if expected else {"finished": repr(time.time())})})
        return True

    def record(self, run_id: str, outcome: BackupOutcome) -> int:
        return int(self._record(keys=[keys.run_backup(run_id), keys.run_backup_results(run_id)],
                                args=[outcome.image, json.dumps(asdict(outcome)), repr(time.time())]))

    def get(self, run_id: str) -> dict[str, Any] | None:
        """The backup record as ``history`` shows it; None for a run without a backup."""
        raw = self.redis.hgetall(keys.run_backup(run_id))
        if not raw:
            return None
        data = {as_text(k): as_text(v) for k, v in raw.items()}
        results = [json.loads(as_text(v)) for v in self.redis.hvals(keys.run_backup_results(run_id))]
        counts: dict[str, int] = {}
        for result in results:
            counts[result["status"]] = counts.get(result["status"], 0) + 1
        return {
            "status": data.get("status", "pending"),
            "images": len(json.loads(data.get("candidates", "{}"))),
            "held": int(data.get("held", 0)),
            "expected": int(data.get("expected", 0)),
            "counts": counts,
            "started": float(data["started"]) if data.get("started") else None,
            "finished": float(data["finished"]) if data.get("finished") else None,
            "results": sorted(results, key=lambda r: r["image"]),
        }


def summary_lines(run_id: str, record: Mapping[str, Any]) -> list[str]:
    """The backup's part of a run summary: one line, then one per failure."""
    counts = ", ".join(f"{n} {status}" for status, n in sorted(record["counts"].items()))
    lines = [f"run {run_id}: backup {record['status']}: {record['images']} images, {record['held']} already held"
             + (f"; {counts}" if counts else "")]
    for result in record["results"]:
        if result["status"] != BACKED_UP:
            lines.append(f"run {run_id}: backup of {result['image']} {result['status']}: {result['reason']}")
    return lines


def report(settings: Settings, store: BackupStore, run_id: str, outcome: BackupOutcome) -> None:
    """Record ``outcome``, append it to the day's backup log and log it; the outcome that
    completes the record also logs the summary."""
    state = store.record(run_id, outcome)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(outcome.finished))
    line = (f"{stamp} run={run_id} image={outcome.image} backup={outcome.name} status={outcome.status}"
            f" duration={outcome.duration:.1f}s" + (f" source={outcome.source}" if outcome.source else ""))
    if outcome.reason:
        line += ' reason="{}"'.format(outcome.reason.replace("\n", " ").replace('"', "'"))
    try:
        logs.append(settings.log_dir, BACKUP_LOG, line, outcome.finished)
    except OSError as exc:
        logs.report_unwritable(settings.log_dir, exc)
    level = logging.INFO if outcome.status == BACKED_UP else logging.WARNING
    log.log(level, "run %s: backup of %s %s in %.1f s%s", run_id, outcome.image, outcome.describe(),
            outcome.duration, f": {outcome.reason}" if outcome.reason else "")
    if state == 2:
        record = store.get(run_id)
        if record is not None:
            for i, text in enumerate(summary_lines(run_id, record)):
                failed = any(r["status"] != BACKED_UP for r in record["results"])
                log.log(logging.WARNING if failed and i else logging.INFO, text)
