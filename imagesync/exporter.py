"""``imagesync exporter``: Prometheus metrics on whether the cluster is in sync.

Flower's ``/metrics`` counts tasks; these say what the nodes hold, how the
last run went, whether the lock is stuck and whether node queues drain.
Everything is read from Redis at scrape time (a custom collector), in three
pipelined round trips at most, whatever the number of nodes; no node is ever
asked over SSH: per-node image counts come from the run record, written when
the run planned (``nodes``), minus what its pulls have since brought.

A process of its own rather than an endpoint of the control worker: a prefork
worker's main process should not serve HTTP, and a scrape must never queue
behind a sync task nor die with a worker restart.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from redis import Redis
from redis.exceptions import RedisError

from . import keys
from .agents import node_names
from .budgets import stale_after
from .celeryconfig import node_queue
from .outcomes import KEPT, NOT_APPLICABLE, OUTCOMES, REMOVED, SUCCESSES
from .redisvalues import as_text, seconds_of
from .runs import ABANDONED, CANCELLED, COMPLETED, RUNNING

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("imagesync")

RUN_STATUSES = (RUNNING, COMPLETED, ABANDONED, CANCELLED)
#: the outcomes that keep a run from counting as a success: a prune's removed and kept are no failures
_FAILURES = tuple(status for status in OUTCOMES if status not in (*SUCCESSES, REMOVED, KEPT))
#: fields read from every run of the history (small: no JSON)
_SUMMARY_FIELDS = ["status", "finished", "wanted", *(f"n:{status}" for status in _FAILURES)]
#: how many runs back the exporter looks for one that planned per-node counts
_NODES_LOOKBACK = 10


def schedule_period(settings: Settings) -> float:
    """Seconds between two scheduled runs; for a crontab, the longest gap over a week
    (minute, hour and day of week; a day-of-month or month restriction is not counted)."""
    if isinstance(settings.schedule, int):
        return float(settings.schedule)
    from .celeryconfig import schedule_of

    cron = schedule_of(settings)
    fires = sorted(day * 1440 + hour * 60 + minute
                   for day in range(7) if day in cron.day_of_week
                   for hour in cron.hour for minute in cron.minute)
    if not fires:
        return 7 * 86400.0
    gaps = [b - a for a, b in zip(fires, fires[1:], strict=False)] + [fires[0] + 7 * 1440 - fires[-1]]
    return max(gaps) * 60.0




def _number(value: Any, default: float = 0.0) -> float:
    try:
        return float(as_text(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _id_time(run_id: str) -> float | None:
    """When a run started, from its id (``20261122-023015-3f9a1c``)."""
    try:
        return datetime.strptime(run_id[:15], "%Y%m%d-%H%M%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


class ImagesyncCollector(Collector):
    """Reads imagesync's state from Redis at each scrape."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.redis = redis
        self.settings = settings
        self.history = settings.history
        self.stale_bound = float(stale_after(settings))
        self.period = schedule_period(settings)

    def collect(self) -> Iterator[Metric]:
        began = time.perf_counter()
        up = GaugeMetricFamily("imagesync_up", "1 if the exporter could read imagesync's state from Redis")
        try:
            families = list(self._collect())
        except RedisError as exc:
            log.warning("scrape: cannot read Redis: %s", exc)
            families = []
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        yield up
        yield from families
        yield _gauge("imagesync_scrape_duration_seconds", "Seconds this scrape took to read Redis",
                     time.perf_counter() - began)

    def _collect(self) -> Iterator[Metric]:
        # 1: what exists: the history, the lock, the registered agents, the clock
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(keys.HISTORY, 0, self.history - 1)
        pipe.get(keys.LOCK)
        pipe.time()
        if self.settings.agents:
            pipe.zrange(keys.AGENTS, 0, -1)
        history_raw, holder_raw, clock, *agents = pipe.execute()
        now = seconds_of(clock)
        history = [as_text(r) or "" for r in history_raw]
        holder = as_text(holder_raw)
        # the configured nodes, and with agents = true the registered agents
        nodes = node_names(self.settings, [as_text(name) or "" for name in agents[0]] if agents else [])

        # 2: the newest run in full, a summary of every run, the lock holder's times, the
        # queues, and which of the runs before the newest planned per-node counts
        pipe = self.redis.pipeline(transaction=False)
        if history:
            pipe.hgetall(keys.run(history[0]))
        for run_id in history:
            pipe.hmget(keys.run(run_id), _SUMMARY_FIELDS)
        if holder:
            pipe.hmget(keys.run(holder), ["started", "last_progress"])
        for node in nodes:
            pipe.llen(node_queue(node))
        earlier = history[1:_NODES_LOOKBACK]
        for run_id in earlier:
            pipe.hexists(keys.run(run_id), "nodes")
        answers = pipe.execute()
        newest = _decode(answers.pop(0)) if history else {}
        summaries = [[as_text(v) for v in answers.pop(0)] for _ in history]
        holder_times = answers.pop(0) if holder else [None, None]
        depths = [answers.pop(0) for _ in nodes]
        counted = [run_id for run_id, has_nodes in zip(earlier, answers, strict=True) if has_nodes]

        # 3 (rarely: after runs limited to some images): the newest run that planned per-node counts
        planned = newest
        if "nodes" not in planned:
            planned = _decode(self.redis.hgetall(keys.run(counted[0]))) if counted else {}

        yield from self._node_metrics(planned, nodes, depths)
        yield from self._run_metrics(newest, now)
        yield from self._success_metric(summaries)
        yield from self._lock_metrics(holder, holder_times, now)
        yield _gauge("imagesync_stale_bound_seconds",
                     "Seconds without progress after which a run is abandoned (time_out + 65 s)", self.stale_bound)
        yield _gauge("imagesync_schedule_period_seconds", "Seconds between two scheduled runs (the longest gap)",
                     self.period)

    def _node_metrics(self, planned: dict[str, str], nodes: list[str], depths: list[int]) -> Iterator[Metric]:
        counts: dict[str, dict[str, int]] = json.loads(planned.get("nodes", "{}"))
        skipped: dict[str, str] = json.loads(planned.get("skipped", "{}"))
        held = GaugeMetricFamily("imagesync_node_images_held", "Wanted images the node holds", labels=["node"])
        missing = GaugeMetricFamily("imagesync_node_images_missing", "Wanted images the node lacks",
                                    labels=["node"])
        drifted = GaugeMetricFamily("imagesync_node_images_drifted",
                                    "Tags the node holds that other nodes hold under another digest", labels=["node"])
        not_applicable = GaugeMetricFamily("imagesync_node_images_not_applicable",
                                           "Wanted images the node does not pull: nothing for its platform, "
                                           "no room, held back", labels=["node"])
        evicted = GaugeMetricFamily("imagesync_node_images_evicted",
                                    "Images the node held at the end of the run before and lacked at the start "
                                    "of this one: removed by the node (likely the kubelet's image GC)",
                                    labels=["node"])
        reachable = GaugeMetricFamily("imagesync_node_reachable",
                                      "1 if the run these counts come from reached the node, 0 if it skipped it",
                                      labels=["node"])
        depth = GaugeMetricFamily("imagesync_node_queue_depth", "Pulls waiting in the node's queue (LLEN node.NAME)",
                                  labels=["node"])
        for node, length in zip(nodes, depths, strict=True):
            depth.add_metric([node], length)
            if node in skipped:
                reachable.add_metric([node], 0)
            if node not in counts:
                continue
            reachable.add_metric([node], 1)
            # what the run's pulls brought since it planned
            brought = sum(int(planned.get(f"p:{node}:{status}", 0)) for status in SUCCESSES)
            # pulls that found the image has nothing for the node's platform: not missing after all
            found = int(planned.get(f"p:{node}:{NOT_APPLICABLE}", 0))
            lacks = max(0, counts[node]["missing"] - brought - found)
            held.add_metric([node], counts[node]["held"] + counts[node]["missing"] - lacks - found)
            missing.add_metric([node], lacks)
            drifted.add_metric([node], counts[node].get("drifted", 0))
            not_applicable.add_metric([node], counts[node].get("excluded", 0) + found)
            evicted.add_metric([node], counts[node].get("evicted", 0))
        yield from (held, missing, drifted, not_applicable, evicted, reachable, depth)

    def _run_metrics(self, run: dict[str, str], now: float) -> Iterator[Metric]:
        status = GaugeMetricFamily("imagesync_last_run_status", "1 for the newest run's status, 0 for the others",
                                   labels=["status"])
        expected = GaugeMetricFamily("imagesync_last_run_pulls_expected", "Pulls the newest run planned per node",
                                     labels=["node"])
        pulls = GaugeMetricFamily("imagesync_last_run_pulls", "Pulls of the newest run that reported, by outcome",
                                  labels=["node", "status"])
        if not run:
            yield from (status, expected, pulls)
            return
        current = run.get("status", "")
        for name in RUN_STATUSES:
            status.add_metric([name], 1 if name == current else 0)
        per_node: dict[str, int] = json.loads(run.get("expected_per_node", "{}"))
        for node, count in sorted(per_node.items()):
            expected.add_metric([node], count)
        reported = {name.split(":", 2)[1] for name in run if name.startswith("p:")}
        for node in sorted(set(per_node) | reported):
            for outcome in OUTCOMES:
                pulls.add_metric([node, outcome], int(run.get(f"p:{node}:{outcome}", 0)))
        yield from (status, expected, pulls)
        started = _number(run.get("started"))
        finished = _number(run.get("finished"), 0.0) or None
        yield _gauge("imagesync_last_run_start_timestamp_seconds", "When the newest run started", started)
        if finished is not None:
            yield _gauge("imagesync_last_run_end_timestamp_seconds", "When the newest run ended", finished)
        yield _gauge("imagesync_last_run_duration_seconds", "How long the newest run took (so far, if running)",
                     (finished or now) - started)

    def _success_metric(self, summaries: list[list[str | None]]) -> Iterator[Metric]:
        for status, finished, _wanted, *failures in summaries:
            if status == COMPLETED and not any(int(n or 0) for n in failures):
                yield _gauge("imagesync_last_success_timestamp_seconds",
                             "When the last run that completed without a failed pull ended", _number(finished))
                return
        if summaries:  # runs, none successful as far as the history goes
            yield _gauge("imagesync_last_success_timestamp_seconds",
                         "When the last run that completed without a failed pull ended", 0)

    def _lock_metrics(self, holder: str | None, times: list[Any], now: float) -> Iterator[Metric]:
        yield _gauge("imagesync_lock_held", "1 if a run holds the single-run lock", 1 if holder else 0)
        if not holder:
            return
        started = _number(times[0], 0.0) or _id_time(holder) or now
        progress = _number(times[1], 0.0) or started
        yield _gauge("imagesync_lock_age_seconds", "Seconds since the run holding the lock started", now - started)
        yield _gauge("imagesync_lock_idle_seconds", "Seconds since the run holding the lock last made progress",
                     now - progress)


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {as_text(k) or "": as_text(v) or "" for k, v in raw.items()}


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def registry_for(settings: Settings, redis: Redis) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ImagesyncCollector(settings, redis))
    return registry


def serve(settings: Settings, redis: Redis, address: str | None = None, port: int | None = None) -> None:
    """Serve ``/metrics`` until SIGTERM or SIGINT."""
    from prometheus_client import start_http_server

    address = address or settings.exporter_address
    port = port or settings.exporter_port
    server, thread = start_http_server(port, addr=address, registry=registry_for(settings, redis))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"imagesync exporter: serving http://{address}:{port}/metrics", flush=True)
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
