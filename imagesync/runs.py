"""Run records in Redis: what a run planned, what each pull reported, how it ended.

Completion is tracked here rather than with a Celery chord (chords over Redis
hang forever when one header task is lost). A run record knows how many pulls
it expects; each pull adds its (node, image) to a set, so a redelivered pull
counts once; the pull that completes the set marks the run completed and
releases the lock, in one atomic script. Runs that stop making progress are
finalized as abandoned by a periodic check (:func:`finalize_stale`).
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.exceptions import WatchError

from . import keys, runscripts
from .errors import ImagesyncError
from .outcomes import COPIED, NOT_FAILURES, OUTCOMES, SKIPPED, Outcome
from .redisvalues import as_text, server_time

RUNNING, COMPLETED, ABANDONED, CANCELLED = "running", "completed", "abandoned", "cancelled"

class RunCancelled(ImagesyncError):
    """The run was cancelled while it was being started."""


def new_run_id(now: float | None = None) -> str:
    """A sortable, readable run id: ``20261122-023015-3f9a1c``."""
    stamp = datetime.fromtimestamp(now or time.time(), UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def channel(run_id: str) -> str:
    """The pub/sub channel on which the run's scripts publish its status when it changes (a pull
    reported, the run ended): named as the run's record (channels and keys do not share a name space)."""
    return keys.run(run_id)


def pull_key(node: str, image: str) -> str:
    """A pull's field in a run's results hash and member of its done set."""
    # A space never occurs in a node name or a valid reference.
    return f"{node} {image}"


@dataclass
class Run:
    """A run record as read back from Redis."""

    id: str
    status: str
    trigger: str
    started: float
    finished: float | None
    expected: int
    counts: dict[str, int]
    expected_per_node: dict[str, int]
    skipped: dict[str, str]
    drift: list[dict[str, Any]]
    refused: list[dict[str, str]]
    wanted: int
    reason: str = ""
    #: who cancelled the run (user@host), for a cancelled run
    cancelled_by: str = ""
    #: images the plan kept off a node: node -> image -> {"kind", "reason"} (not applicable, no room, ...)
    excluded: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    #: images a node held at the end of the previous run and lacked at this one's start: node -> images
    evicted: dict[str, list[str]] = field(default_factory=dict)
    results: list[Outcome] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    @property
    def failures(self) -> int:
        return sum(n for status, n in self.counts.items() if status not in NOT_FAILURES)

    @property
    def duration(self) -> float:
        return (self.finished or time.time()) - self.started

    def unreported(self) -> dict[str, int]:
        """Per node, pulls that never reported (a dead worker or a run cut short)."""
        reported = Counter(outcome.node for outcome in self.results)
        return {
            node: count - reported.get(node, 0)
            for node, count in self.expected_per_node.items()
            if count > reported.get(node, 0)
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["results"] = [asdict(outcome) for outcome in self.results]
        return data


class RunStore:
    """Run records and history, on the Redis client it is given."""

    def __init__(self, redis: Redis, stale_after: int, lock_ttl: int, history: int = 200) -> None:
        self.redis = redis
        self.stale_after = int(stale_after)
        self.lock_ttl = int(lock_ttl)
        self.history = int(history)
        self._record = redis.register_script(runscripts.RECORD)
        self._abandon = redis.register_script(runscripts.ABANDON)
        self._touch = redis.register_script(runscripts.TOUCH)
        self._cancel = redis.register_script(runscripts.CANCEL)
        self._exclude = redis.register_script(runscripts.EXCLUDE)
        self._add = redis.register_script(runscripts.ADD)

    def create(
        self,
        run_id: str,
        *,
        trigger: str,
        pulls: list[tuple[str, str]],
        skipped: dict[str, str],
        drift: list[dict[str, Any]],
        refused: list[dict[str, str]],
        wanted: int,
        now: float | None = None,
        nodes: dict[str, dict[str, int]] | None = None,
        excluded: dict[str, dict[str, dict[str, str]]] | None = None,
        evicted: dict[str, list[str]] | None = None,
        more: bool = False,
    ) -> bool:
        """Record a new run; returns True if it expects no pulls and is already complete.

        With ``more``, the run is open: more pulls may follow (:meth:`add`), and it is not
        complete before they are added, whatever has reported.

        Raises :class:`RunCancelled` if the run was cancelled while it was
        listing images (its record, written by the cancel, is left as it is).
        """
        now = now or self.now()
        per_node = Counter(node for node, _ in pulls)
        complete = not pulls and not more
        record: dict[Any, Any] = {
            "id": run_id,
            "status": COMPLETED if complete else RUNNING,
            "trigger": trigger,
            "started": repr(now),
            "last_progress": repr(now),
            "expected": len(pulls),
            "expected_per_node": json.dumps(dict(sorted(per_node.items()))),
            "skipped": json.dumps(skipped),
            "drift": json.dumps(drift),
            "refused": json.dumps(refused),
            "wanted": wanted,
        }
        if more:
            record["open"] = 1
        if excluded:
            record["excluded"] = json.dumps(excluded, separators=(",", ":"))
        if evicted:
            record["evicted"] = json.dumps(evicted, separators=(",", ":"))
        if nodes is not None:
            # per reachable node at plan time: held/missing/drifted counts (read by the exporter)
            record["nodes"] = json.dumps(nodes, separators=(",", ":"))
        if complete:
            record["finished"] = repr(now)
        with self.redis.pipeline() as pipe:
            # A cancel writes the record of a run still listing images: WATCH
            # it, so that this never turns a cancelled run back into a running one.
            pipe.watch(keys.run(run_id))
            written = bool(pipe.exists(keys.run(run_id)))
            if not written:
                pipe.multi()
                pipe.hset(keys.run(run_id), mapping=record)
                if not complete:
                    pipe.zadd(keys.ACTIVE, {run_id: now + self.stale_after})
                pipe.lpush(keys.HISTORY, run_id)
                try:
                    pipe.execute()
                except WatchError:
                    written = True
        if written:
            self.redis.hsetnx(keys.run(run_id), "trigger", trigger)  # the cancel could not know it
            raise RunCancelled(f"run {run_id} was cancelled while it listed images; no pull was sent")
        self._trim()
        return complete

    def _trim(self) -> None:
        old = self.redis.lrange(keys.HISTORY, self.history, -1)
        if not old:
            return
        pipe = self.redis.pipeline()
        for run_id in old:
            pipe.delete(*keys.run_keys(as_text(run_id)))
        pipe.ltrim(keys.HISTORY, 0, self.history - 1)
        pipe.execute()

    def record(self, run_id: str, outcome: Outcome) -> int:
        """Record one pull's outcome; see _RECORD for the return values."""
        return int(
            self._record(
                keys=[keys.run(run_id), keys.run_done(run_id), keys.run_results(run_id),
                      keys.ACTIVE, keys.LOCK],
                args=[run_id, pull_key(outcome.node, outcome.image), outcome.to_json(),
                      outcome.status, "", self.stale_after, self.lock_ttl],
            )
        )

    def exclude(self, run_id: str, excluded: dict[str, dict[str, dict[str, str]]], now: float | None = None) -> int:
        """Leave out of a running run pulls it planned but never sent: node -> image -> {"kind",
        "reason"}. Returns 0 if the run is not running, 1 if it goes on, 2 if it is now complete."""
        return int(self._exclude(keys=[keys.run(run_id), keys.run_done(run_id), keys.run_results(run_id),
                                       keys.ACTIVE, keys.LOCK],
                                 args=[run_id, json.dumps(excluded, separators=(",", ":")), _given(now)]))

    def add(self, run_id: str, pulls: Iterable[tuple[str, str]], nodes: dict[str, dict[str, int]] | None = None,
            now: float | None = None) -> int:
        """Add ``pulls`` to an open run (see :meth:`create`) and close it; ``nodes``, the
        per-node counts, replace those recorded. Returns 0 if the run is not running, 1 if it
        goes on, 2 if it is now complete."""
        per_node = Counter(node for node, _ in pulls)
        return int(self._add(keys=[keys.run(run_id), keys.run_done(run_id), keys.run_results(run_id),
                                   keys.ACTIVE, keys.LOCK],
                             args=[run_id, json.dumps(dict(per_node), separators=(",", ":")), _given(now),
                                   json.dumps(nodes, separators=(",", ":")) if nodes is not None else ""]))

    def status(self, run_id: str) -> str | None:
        return as_text(self.redis.hget(keys.run(run_id), "status"))

    def state(self, run_id: str) -> tuple[str | None, float | None]:
        """The run's status and when it started (None, None for an unknown run)."""
        status, started = self.redis.hmget(keys.run(run_id), ["status", "started"])
        return as_text(status), float(started) if started else None

    def touch(self, run_id: str, now: float | None = None) -> bool:
        """Count a sign of life of a pull (a retry) as progress: the run is not
        stale, and its lock is renewed. False if the run is no longer running."""
        return bool(self._touch(keys=[keys.run(run_id), keys.ACTIVE, keys.LOCK],
                                args=[run_id, self.stale_after, self.lock_ttl, _given(now)]))

    def now(self) -> float:
        """Redis's clock: the one clock every host of a deployment shares."""
        return server_time(self.redis)

    def stale(self, now: float | None = None) -> list[str]:
        """Runs in progress that have made no progress for ``stale_after`` seconds."""
        now = now or self.now()
        return [as_text(r) for r in self.redis.zrangebyscore(keys.ACTIVE, "-inf", now)]

    def abandon(self, run_id: str, reason: str, now: float | None = None, force: bool = False) -> bool:
        """Mark a run abandoned and release its lock; True if this call did it.

        Unless ``force``, only a run that is still stale at this instant: the
        check and the change are one atomic step.
        """
        return bool(
            self._abandon(
                keys=[keys.run(run_id), keys.ACTIVE, keys.LOCK],
                args=[run_id, _given(now), reason, secrets.token_hex(8), "force" if force else ""],
            )
        )

    def cancel(self, run_id: str, by: str, reason: str = "", now: float | None = None) -> int:
        """Cancel a running run and release its lock; see _CANCEL for the return values."""
        return int(
            self._cancel(
                keys=[keys.run(run_id), keys.ACTIVE, keys.LOCK, keys.HISTORY],
                args=[run_id, _given(now), by, reason, secrets.token_hex(8)],
            )
        )

    def get(self, run_id: str, with_results: bool = True) -> Run | None:
        raw = self.redis.hgetall(keys.run(run_id))
        if not raw:
            return None
        data = {as_text(k): as_text(v) for k, v in raw.items()}
        counts = {status: int(data.get(f"n:{status}", 0)) for status in OUTCOMES}
        run = Run(
            id=data["id"],
            status=data.get("status", "unknown"),
            trigger=data.get("trigger", ""),
            started=float(data.get("started", 0)),
            finished=float(data["finished"]) if data.get("finished") else None,
            expected=int(data.get("expected", 0)),
            counts={status: n for status, n in counts.items() if n},
            expected_per_node=json.loads(data.get("expected_per_node", "{}")),
            skipped=json.loads(data.get("skipped", "{}")),
            drift=json.loads(data.get("drift", "[]")),
            refused=json.loads(data.get("refused", "[]")),
            wanted=int(data.get("wanted", 0)),
            reason=data.get("reason", ""),
            cancelled_by=data.get("cancelled_by", ""),
            excluded=json.loads(data.get("excluded", "{}")),
            evicted=json.loads(data.get("evicted", "{}")),
        )
        if with_results:
            run.results = sorted(
                (Outcome(**json.loads(v)) for v in self.redis.hvals(keys.run_results(run_id))),
                key=lambda o: (o.node, o.image),
            )
        return run

    def recent(self, limit: int = 20) -> list[Run]:
        ids = [as_text(r) for r in self.redis.lrange(keys.HISTORY, 0, limit - 1)]
        runs = (self.get(run_id, with_results=False) for run_id in ids)
        return [run for run in runs if run is not None]


def _given(now: float | None) -> str:
    """A time for a script: empty means Redis's own clock."""
    return "" if now is None else repr(now)


def _planned(run: Run) -> str:
    """What a run's expected count counts: pulls, or for a prune's run, the retired images it judged."""
    return "retired images" if run.trigger.startswith("prune") else "pulls planned"


def summary_lines(run: Run) -> list[str]:
    """The run's summary as log lines, the way the operator reads it."""
    counts = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in run.counts.items())
    if not counts:
        counts = "no pull reported" if run.status == CANCELLED else "nothing to pull"
    why = run.reason
    if run.status == CANCELLED:
        why = f"cancelled by {run.cancelled_by or 'unknown'}" + (f": {run.reason}" if run.reason else "")
    lines = [
        f"run {run.id} {run.status} in {run.duration:.1f} s: {run.expected} {_planned(run)}; {counts}"
        + (f" ({why})" if why else "")
    ]
    for node, reason in run.skipped.items():
        lines.append(f"run {run.id}: node {node} skipped: {reason}")
    for node, count in run.unreported().items():
        if run.status == CANCELLED:
            lines.append(f"run {run.id}: node {node}: {count} pulls not reported yet (the run was cancelled: "
                         "queued pulls are skipped, running ones finish)")
        else:
            lines.append(f"run {run.id}: node {node}: {count} pulls never reported (worker or node down?)")
    if run.status == CANCELLED:
        # one line per node for the pulls the cancel kept off it, not one per image
        not_run = Counter(outcome.node for outcome in run.results if outcome.status == SKIPPED)
        for node, count in sorted(not_run.items()):
            lines.append(f"run {run.id}: node {node}: {count} pulls skipped: the run was cancelled before they started")
    for outcome in run.results:
        if run.status == CANCELLED and outcome.status == SKIPPED:
            continue
        if not outcome.succeeded:
            lines.append(f"run {run.id}: {outcome.node}: {outcome.image} {outcome.describe()}: {outcome.reason}")
    # where copies came from: one line per source node, not one per pull
    copied = Counter(outcome.source for outcome in run.results if outcome.status == COPIED and outcome.source)
    for source, count in sorted(copied.items()):
        lines.append(f"run {run.id}: {count} copied from {source}")
    for node, images in sorted(run.excluded.items()):
        for image, exclusion in sorted(images.items()):
            lines.append(f"run {run.id}: {node}: {image} {exclusion['kind']}: {exclusion['reason']}")
    for node, evicted in sorted(run.evicted.items()):
        for image in evicted:
            lines.append(f"run {run.id}: {node}: {image} evicted by the node since the last run "
                         "(not by a prune: likely the kubelet's image GC)")
    for drift in run.drift:
        digests = ", ".join(f"{n}={d[:19]}" for n, d in drift["digests"].items())
        lines.append(f"run {run.id}: tag drift on {drift['reference']}: {digests}")
    for refusal in run.refused:
        lines.append(
            f"run {run.id}: refused image name from {refusal['node']}: {refusal['reference']!r} ({refusal['reason']})"
        )
    return lines
