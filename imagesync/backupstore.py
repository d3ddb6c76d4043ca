"""The record of a run's backup, beside its run record, and where each of its outcomes is told.

A run's backup (:mod:`imagesync.backup`) reports one :class:`BackupOutcome` per
image it had to copy: into the record (:class:`BackupStore`, read by
``imagesync history RUN``), the day's ``backup_images.log`` and the log; the
outcome that completes the record also logs the summary (:func:`summary_lines`).

A record goes ``pending`` (the run is planned) -> ``running`` (the backup
started, with the copies it expects and a deadline) -> ``done`` (every
outcome is in) or ``abandoned`` (the deadline passed first: the backup's
worker, or the worker of a node asked to push, stopped or never took it).
Only the first delivery of a backup starts its record; a second one finds it
started and changes nothing. The deadline is kept by whoever looks: a reader
(``history``) and beat's ``finalize`` (:func:`abandon_overdue`). Times are
Redis's own clock (``TIME``), unless a caller passes one (tests).
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
#: states of a run's backup record
PENDING, RUNNING, DONE, ABANDONED = "pending", "running", "done", "abandoned"
#: the day's log of backup outcomes
BACKUP_LOG = "backup_images.log"

# ``now``: ARGV[N] when the caller passes it, else Redis's clock.
_NOW = """
local now = tonumber(ARGV[N])
if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
"""

# The first delivery starts the record, atomically: 1; any later one changes nothing: 0.
# ARGV: expected, held, the images expected (JSON), seconds until the deadline, [now].
_START = _NOW.replace("ARGV[N]", "ARGV[5]") + """
if redis.call('HSETNX', KEYS[1], 'started', tostring(now)) == 0 then return 0 end
if tonumber(ARGV[1]) > 0 then
    redis.call('HSET', KEYS[1], 'expected', ARGV[1], 'held', ARGV[2], 'todo', ARGV[3],
               'deadline', tostring(now + tonumber(ARGV[4])), 'status', 'running')
else
    redis.call('HSET', KEYS[1], 'expected', 0, 'held', ARGV[2], 'status', 'done', 'finished', tostring(now))
end
return 1
"""

# A running record past its deadline becomes abandoned, with the images that never
# reported: 1; otherwise nothing changes: 0. ARGV: [now].
_ABANDON = _NOW.replace("ARGV[N]", "ARGV[1]") + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline'))
if not deadline or now < deadline then return 0 end
local missing = {}
for _, image in ipairs(cjson.decode(redis.call('HGET', KEYS[1], 'todo') or '[]')) do
    if redis.call('HEXISTS', KEYS[2], image) == 0 then table.insert(missing, image) end
end
redis.call('HSET', KEYS[1], 'status', 'abandoned', 'finished', tostring(now),
           'missing', #missing > 0 and cjson.encode(missing) or '[]')
return 1
"""

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
        self._start = redis.register_script(_START)
        self._abandon = redis.register_script(_ABANDON)

    def remember(self, run_id: str, wanted: Mapping[str, Mapping[str, Any]]) -> None:
        """What the run's backup is to check, written when the run is planned."""
        self.redis.hset(keys.run_backup(run_id), mapping={
            "status": "pending", "candidates": json.dumps(wanted, separators=(",", ":"))})

    def candidates(self, run_id: str) -> dict[str, dict[str, Any]] | None:
        raw = self.redis.hget(keys.run_backup(run_id), "candidates")
        return None if raw is None else json.loads(as_text(raw))

    def start(self, run_id: str, todo: list[str], held: int, seconds: float, now: float | None = None) -> bool:
        """Mark the backup running with an outcome to come for each image of ``todo``, due
        within ``seconds``; False, changing nothing, if it already started (a redelivery)."""
        return bool(self._start(keys=[keys.run_backup(run_id)],
                                args=[len(todo), held, json.dumps(todo), seconds, *_now(now)]))

    def pushing(self, run_id: str, image: str, node: str) -> None:
        """Note that ``node`` was asked to push ``image``: an abandoned record names it."""
        self.redis.hset(keys.run_backup(run_id), f"push {image}", node)

    def abandon_if_overdue(self, run_id: str, now: float | None = None) -> bool:
        """Mark the record abandoned if it is still running past its deadline; whether it did."""
        return bool(self._abandon(keys=[keys.run_backup(run_id), keys.run_backup_results(run_id)],
                                  args=[*_now(now)]))

    def record(self, run_id: str, outcome: BackupOutcome) -> int:
        return int(self._record(keys=[keys.run_backup(run_id), keys.run_backup_results(run_id)],
                                args=[outcome.image, json.dumps(asdict(outcome)), repr(time.time())]))

    def get(self, run_id: str) -> dict[str, Any] | None:
        """The backup record as ``history`` shows it (abandoned first if overdue); None for a
        run without a backup."""
        self.abandon_if_overdue(run_id)
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
            "deadline": float(data["deadline"]) if data.get("deadline") else None,
            "reason": _abandoned(data) if data.get("status") == ABANDONED else "",
            "results": sorted(results, key=lambda r: r["image"]),
        }


def _now(now: float | None) -> list[float]:
    return [] if now is None else [now]


def _abandoned(data: Mapping[str, str]) -> str:
    """Why a record was abandoned: which outcomes never came, and from whom."""
    missing = json.loads(data.get("missing") or "[]") or []
    nodes = sorted({data[f"push {image}"] for image in missing if f"push {image}" in data})
    copies = sum(f"push {image}" not in data for image in missing)
    whose = [f"{copies} {'copy' if copies == 1 else 'copies'} by the control worker"] if copies else []
    whose += [f"pushes from {', '.join(nodes)}"] if nodes else []
    return (f"no outcome by its deadline for {len(missing)} of {data.get('expected', '?')} images"
            f" ({' and '.join(whose) or 'none missing'}): that worker stopped or never took them;"
            " the next run's backup copies what the backup still lacks")


def abandon_overdue(redis: Redis, now: float | None = None) -> list[str]:
    """Abandon every backup record of the runs in the history that is still running past its
    deadline, logging each one's summary; the run ids. Beat's ``finalize`` calls it."""
    store = BackupStore(redis)
    closed = [run_id for run_id in (as_text(r) for r in redis.lrange(keys.HISTORY, 0, -1))
              if store.abandon_if_overdue(run_id, now)]
    for run_id in closed:
        record = store.get(run_id)
        for text in summary_lines(run_id, record) if record else ():
            log.warning(text)
    return closed


def summary_lines(run_id: str, record: Mapping[str, Any]) -> list[str]:
    """The backup's part of a run summary: one line, then one per failure."""
    counts = ", ".join(f"{n} {status}" for status, n in sorted(record["counts"].items()))
    lines = [f"run {run_id}: backup {record['status']}: {record['images']} images, {record['held']} already held"
             + (f"; {counts}" if counts else "")]
    if record.get("reason"):
        lines.append(f"run {run_id}: backup {record['status']}: {record['reason']}")
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
