"""``imagesync exporter`` and deploy/prometheus/: the collector on a real Redis, the
alert rules with promtool, and a real Prometheus scraping the exporter during a sync."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import measured

from imagesync import keys
from imagesync.budgets import stale_after
from imagesync.config import Settings
from imagesync.exporter import registry_for, schedule_period
from imagesync.lock import RunLock
from imagesync.outcomes import Outcome
from imagesync.planning.planner import make_plan
from imagesync.runtimes import Image
from imagesync.sync import node_counts, run_store

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def settings_for(nodes, **extra):
    return Settings(nodes=[{"name": n, "transport": "local"} for n in nodes], prefixes=["registry.test"], **extra)


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def test_node_counts_from_a_plan():
    image = lambda *tags, digest="sha256:" + "a" * 64: Image(tags=list(tags), digests=[], id=digest)  # noqa: E731
    plan = make_plan(
        {"a": [image("registry.test/x:1"), image("registry.test/y:1")],
         "b": [image("registry.test/x:1", digest="sha256:" + "b" * 64)],
         "c": []},
        ["registry.test"], targets=["a", "b"],
    )
    counts = node_counts(plan)
    assert counts["a"]["missing"] == 0 and counts["a"]["held"] == 2
    assert counts["b"]["missing"] == 1 and counts["b"]["held"] == 1
    assert counts["c"] == {"held": 0, "missing": 2, "excluded": 0, "drifted": 0, "evicted": 0}  # reached, not a target


def test_registered_agents_have_their_node_metrics_too(redis_client):
    settings = settings_for(["a"], agents=True)
    redis_client.zadd(keys.AGENTS, {"edge-1": time.time()})
    redis_client.lpush("node.edge-1", "m1")
    run_store(settings, redis_client).create(
        "20260101-000000-abcdef", trigger="test", pulls=[("edge-1", "img:1")], skipped={}, drift=[], refused=[],
        wanted=1, nodes={"a": {"held": 1, "missing": 0, "drifted": 0}, "edge-1": {"held": 0, "missing": 1,
                                                                             "drifted": 0}})
    registry = registry_for(settings, redis_client)
    assert value(registry, "imagesync_node_queue_depth", node="edge-1") == 1
    assert value(registry, "imagesync_node_images_missing", node="edge-1") == 1
    assert value(registry, "imagesync_node_images_held", node="a") == 1
    # without agents = true, a registration is not a node
    assert value(registry_for(settings_for(["a"]), redis_client), "imagesync_node_queue_depth", node="edge-1") is None


def test_the_collector_follows_a_run(redis_client):
    settings = settings_for(["a", "b", "c"])
    store = run_store(settings, redis_client)
    registry = registry_for(settings, redis_client)
    assert value(registry, "imagesync_up") == 1
    assert value(registry, "imagesync_last_success_timestamp_seconds") is None  # no run yet
    assert value(registry, "imagesync_lock_held") == 0

    RunLock(redis_client, ttl=stale_after(settings)).acquire("20260101-000000-abcdef")
    redis_client.lpush("node.a", "m1", "m2")
    store.create("20260101-000000-abcdef", trigger="test", pulls=[("a", "img:1"), ("a", "img:2"), ("b", "img:2")],
                 skipped={"c": "unreachable"}, drift=[], refused=[], wanted=3,
                 nodes={"a": {"held": 1, "missing": 2, "drifted": 0},
                        "b": {"held": 2, "missing": 1, "drifted": 1, "evicted": 1}})
    assert value(registry, "imagesync_node_images_missing", node="a") == 2
    assert value(registry, "imagesync_node_images_held", node="b") == 2
    assert value(registry, "imagesync_node_images_drifted", node="b") == 1
    assert value(registry, "imagesync_node_images_not_applicable", node="a") == 0
    assert value(registry, "imagesync_node_images_evicted", node="b") == 1
    assert value(registry, "imagesync_node_images_evicted", node="a") == 0  # a record from before the count
    assert value(registry, "imagesync_node_reachable", node="c") == 0
    assert value(registry, "imagesync_node_images_missing", node="c") is None
    assert value(registry, "imagesync_node_queue_depth", node="a") == 2
    assert value(registry, "imagesync_node_queue_depth", node="b") == 0
    assert value(registry, "imagesync_last_run_status", status="running") == 1
    assert value(registry, "imagesync_last_run_pulls_expected", node="a") == 2
    assert value(registry, "imagesync_lock_held") == 1
    assert value(registry, "imagesync_lock_age_seconds") >= 0
    assert value(registry, "imagesync_last_run_end_timestamp_seconds") is None

    store.record("20260101-000000-abcdef", Outcome("a", "img:1", "pulled"))
    store.record("20260101-000000-abcdef", Outcome("b", "img:2", "present"))
    assert value(registry, "imagesync_node_images_missing", node="a") == 1
    assert value(registry, "imagesync_node_images_held", node="a") == 2
    assert value(registry, "imagesync_node_images_missing", node="b") == 0
    assert value(registry, "imagesync_last_run_pulls", node="a", status="pulled") == 1
    store.record("20260101-000000-abcdef", Outcome("a", "img:2", "failed", reason="boom"))
    assert value(registry, "imagesync_last_run_status", status="completed") == 1
    assert value(registry, "imagesync_last_run_pulls", node="a", status="failed") == 1
    assert value(registry, "imagesync_node_images_missing", node="a") == 1
    assert value(registry, "imagesync_lock_held") == 0
    assert value(registry, "imagesync_last_run_end_timestamp_seconds") > 0
    # completed, but with a failure: not a success
    assert value(registry, "imagesync_last_success_timestamp_seconds") == 0

    store.create("20260101-003000-abcdef", trigger="test", pulls=[], skipped={}, drift=[], refused=[], wanted=3,
                 nodes={n: {"held": 3, "missing": 0, "drifted": 0} for n in "abc"})
    finished = float(redis_client.hget(keys.run("20260101-003000-abcdef"), "finished"))
    assert value(registry, "imagesync_last_success_timestamp_seconds") == finished
    assert value(registry, "imagesync_node_images_missing", node="a") == 0

    # a run cancelled while it listed images has no counts: the previous run's stand
    RunLock(redis_client, ttl=60).acquire("20260101-010000-abcdef")
    store.cancel("20260101-010000-abcdef", by="test")
    assert value(registry, "imagesync_last_run_status", status="cancelled") == 1
    assert value(registry, "imagesync_node_images_held", node="c") == 3


def test_redis_down_is_a_metric_not_an_error():
    from redis import Redis

    from testcluster.process import free_port

    client = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    registry = registry_for(settings_for(["a"]), client)
    assert value(registry, "imagesync_up") == 0


def test_schedule_period():
    assert schedule_period(settings_for(["a"])) == 1800
    assert schedule_period(settings_for(["a"], schedule=120)) == 120
    assert schedule_period(settings_for(["a"], schedule="0 2 * * *")) == 86400
    assert schedule_period(settings_for(["a"], schedule="0 9-17 * * mon-fri")) == (24 + 24 + 16) * 3600


def _counting_client(redis_server):
    """A client of the test Redis and a list counting its round trips: each request the
    connection sends, a pipeline's commands together or a single command, is one."""
    from redis import ConnectionPool, Redis
    from redis.connection import Connection

    sent: list[int] = []

    class Counting(Connection):
        def send_packed_command(self, command, check_health=True):
            sent.append(1)
            return super().send_packed_command(command, check_health)

    client = Redis(connection_pool=ConnectionPool(host="127.0.0.1", port=redis_server.port, socket_timeout=5,
                                                  connection_class=Counting))
    client.ping()  # the connection's own handshake is not a scrape's
    sent.clear()
    return client, sent


def _fill_history(settings, client, nodes, newest_limited=0):
    """100 nodes x 50 pulls in the newest full run, half reported, a history of 200 runs; then
    ``newest_limited`` runs limited to some images (webhook runs), which plan no per-node counts."""
    store = run_store(settings, client)
    for n in range(199):
        store.create(f"20260101-{n:06}-aaaaaa", trigger="test", pulls=[], skipped={}, drift=[], refused=[],
                     wanted=500, nodes={node: {"held": 500, "missing": 0, "drifted": 0} for node in nodes})
    pulls = [(node, f"registry.test/img:{i}") for node in nodes for i in range(50)]
    store.create("20260102-000000-bbbbbb", trigger="test", pulls=pulls, skipped={}, drift=[], refused=[],
                 wanted=500, nodes={node: {"held": 450, "missing": 50, "drifted": 2} for node in nodes})
    for node, image in pulls[::2]:
        store.record("20260102-000000-bbbbbb", Outcome(node, image, "pulled"))
    for n in range(newest_limited):
        store.create(f"20260103-{n:06}-cccccc", trigger="webhook", pulls=[], skipped={}, drift=[], refused=[],
                     wanted=1)
    for node in nodes:
        client.rpush(f"node.{node}", *range(25))


@pytest.mark.parametrize(("agents", "newest_limited"), [(False, 0), (False, 6), (True, 6)],
                         ids=["full-run", "after-webhook-runs", "agents"])
def test_a_scrape_with_100_nodes_is_three_round_trips_at_most(redis_server, redis_client, agents, newest_limited):
    """README: every scrape reads Redis in three pipelined round trips at most, whatever the
    number of nodes; here 100 nodes (half of them registered agents), 200 runs of history."""
    nodes = [f"node-{i:03}" for i in range(100)]
    settings = settings_for(nodes[:50] if agents else nodes, agents=agents)
    if agents:
        redis_client.zadd(keys.AGENTS, {node: time.time() for node in nodes[50:]})
    _fill_history(settings, redis_client, nodes, newest_limited)
    client, sent = _counting_client(redis_server)
    registry = registry_for(settings, client)
    timings, trips = [], []
    for _ in range(5):
        began = time.perf_counter()
        samples = {(s.name, s.labels.get("node")): s.value for m in registry.collect() for s in m.samples}
        timings.append(time.perf_counter() - began)
        trips.append(len(sent))
        sent.clear()
    measured(f"scrape with 100 nodes, 200 runs ({'agents, ' if agents else ''}{newest_limited} webhook runs)",
             f"best {min(timings) * 1000:.1f} ms, worst {max(timings) * 1000:.1f} ms, round trips {trips}")
    assert samples[("imagesync_up", None)] == 1
    assert samples[("imagesync_node_images_missing", "node-042")] == 25
    assert samples[("imagesync_node_images_missing", "node-099")] == 25  # an agent's, with agents = true
    assert samples[("imagesync_node_queue_depth", "node-099")] == 25
    assert max(trips) <= 3, trips


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_the_rules_check_and_their_tests_pass():
    check = subprocess.run(["promtool", "check", "rules", "imagesync.rules.yml"], cwd=RULES_DIR,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 5 rules found" in check.stdout
    unit = subprocess.run(["promtool", "test", "rules", "imagesync.rules.test.yml"], cwd=RULES_DIR,
                          capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def _scrape(settings, client) -> tuple[dict[str, float], set[str]]:
    """The exporter's ``/metrics`` text (what Prometheus reads): its unlabelled samples by name,
    and the names of all its samples."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry_for(settings, client)).decode()
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    return {sample.name: sample.value for sample in samples if not sample.labels}, {s.name for s in samples}


def _humanize_duration(seconds: float) -> str:
    """Prometheus's ``humanizeDuration`` of a whole number of seconds (at least 60)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes}m {secs}s"
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
@pytest.mark.parametrize(("config", "stale_bound", "period"), [
    ({}, 1865, 1800),  # the sample: time_out = 1800, schedule "*/30 * * * *"
    ({"time_out": 600, "schedule": "0 2 * * *"}, 665, 86400),
], ids=["sample", "nightly"])
def test_the_alerts_compare_with_the_bounds_the_exporter_serves(redis_client, tmp_path, config, stale_bound, period):
    """README: imagesync_stale_bound_seconds is time_out + 65 s and imagesync_schedule_period_seconds
    the longest gap of schedule, "what the alerts compare with": the values the exporter serves,
    fed to the rules file by promtool, fire ImagesyncLockHeldTooLong and ImagesyncNoSuccessfulRun
    once past them, not before."""
    import yaml

    from imagesync.config import load_settings

    settings = load_settings(RULES_DIR.parent.parent / "imagesync.sample.toml",
                             environ={f"IMAGESYNC_{key.upper()}": str(value) for key, value in config.items()})
    RunLock(redis_client, ttl=stale_after(settings)).acquire("20260101-000000-abcdef")
    node = settings.nodes[0].name
    run_store(settings, redis_client).create("20260101-000000-abcdef", trigger="test", pulls=[(node, "img:1")],
                                             skipped={}, drift=[], refused=[], wanted=1,
                                             nodes={node: {"held": 0, "missing": 1, "drifted": 0}})
    redis_client.lpush(f"node.{node}", "m1")
    served, names = _scrape(settings, redis_client)
    assert (served["imagesync_stale_bound_seconds"], served["imagesync_schedule_period_seconds"]) == (
        stale_bound, period)
    # every imagesync metric the rules read is one the exporter serves
    named = set(re.findall(r"\bimagesync_\w+", (RULES_DIR / "imagesync.rules.yml").read_text()))
    assert named and named <= names, named - names

    lock_fires = int(stale_bound // 60) + 2  # the lock ages 60 s a minute; past the bound, then for: 1m
    success_fires = int(3 * period // 60) + 6  # no success since 0; past 3 periods, then for: 5m
    horizon = max(lock_fires, success_fires) + 2
    test = {"rule_files": [str(RULES_DIR / "imagesync.rules.yml")], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": "imagesync_stale_bound_seconds",
             "values": f"{served['imagesync_stale_bound_seconds']:g}x{horizon}"},
            {"series": "imagesync_lock_age_seconds", "values": f"0+60x{horizon}"},
            {"series": "imagesync_schedule_period_seconds",
             "values": f"{served['imagesync_schedule_period_seconds']:g}x{horizon}"},
            {"series": "imagesync_last_success_timestamp_seconds", "values": f"0x{horizon}"},
        ],
        "alert_rule_test": [
            {"eval_time": f"{lock_fires - 1}m", "alertname": "ImagesyncLockHeldTooLong", "exp_alerts": []},
            {"eval_time": f"{lock_fires}m", "alertname": "ImagesyncLockHeldTooLong", "exp_alerts": [{
                "exp_labels": {"severity": "warning"},
                "exp_annotations": {
                    "summary": f"the imagesync lock has been held for {_humanize_duration(lock_fires * 60)}",
                    "description": "See `imagesync history`; `imagesync cancel` ends the run."}}]},
            {"eval_time": f"{success_fires - 1}m", "alertname": "ImagesyncNoSuccessfulRun", "exp_alerts": []},
            {"eval_time": f"{success_fires}m", "alertname": "ImagesyncNoSuccessfulRun", "exp_alerts": [{
                "exp_labels": {"severity": "critical"},
                "exp_annotations": {
                    "summary": f"no successful imagesync run for {_humanize_duration(success_fires * 60)}",
                    "description": "See `imagesync history`: failed pulls, skipped nodes, abandoned or "
                                   "cancelled runs."}}]},
        ]}]}
    (tmp_path / "bounds.test.yml").write_text(yaml.safe_dump(test))
    result = subprocess.run(["promtool", "test", "rules", str(tmp_path / "bounds.test.yml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- a real Prometheus on loopback, scraping the exporter during a real sync ---

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def _query(port, promql):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with _LOCAL.open(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in body["data"]["result"]}


def _wait_for(port, promql, expected, timeout=40.0):
    """Until the query's only result equals ``expected``; returns how long it took."""
    began, seen = time.monotonic(), None
    while time.monotonic() - began < timeout:
        try:
            result = _query(port, promql)
        except OSError as exc:  # Prometheus still starting
            seen = exc
        else:
            seen = result
            if len(result) == 1 and next(iter(result.values())) == expected:
                return time.monotonic() - began
        time.sleep(0.25)
    raise AssertionError(f"{promql}: expected {expected}, last seen {seen}")


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (apt-get install prometheus)")
def test_prometheus_sees_missing_images_fall_to_zero(deploy, tmp_path):
    from testcluster.process import free_port, port_open

    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/app:1", "bcm11/lib:2", "nvidia/cuda:12"], "node-2": []})
    d.configure()
    # node-2's worker is not started yet: its pulls wait in its queue
    d.services.start_control()
    d.services.start_worker("node-1")

    exporter_port, prometheus_port = free_port(), free_port()
    d.services._start("exporter", d.services._imagesync("exporter", "--port", str(exporter_port)), None)
    d.services.processes["exporter"].wait_ready(lambda: port_open(exporter_port), 30)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES_DIR / 'imagesync.rules.yml'}']\n"
        "scrape_configs:\n"
        f"  - job_name: imagesync\n    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n"
    )
    d.services._start("prometheus", [
        "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
    ], None)
    d.services.processes["prometheus"].wait_ready(lambda: port_open(prometheus_port), 30)

    result = d.cli("sync")
    assert result.returncode == 0, result.stderr + result.stdout
    # node-2 lacks all three; node-1 holds them, and its pulls queue stays empty
    waited = _wait_for(prometheus_port, 'imagesync_node_images_missing{node="node-2"}', 3)
    _wait_for(prometheus_port, 'imagesync_node_images_missing{node="node-1"}', 0)
    _wait_for(prometheus_port, 'imagesync_node_queue_depth{node="node-2"}', 3)
    _wait_for(prometheus_port, 'imagesync_last_run_status{status="running"}', 1)
    _wait_for(prometheus_port, "imagesync_lock_held", 1)
    assert list(_query(prometheus_port, 'up{job="imagesync"}').values()) == [1]
    assert list(_query(prometheus_port, "imagesync_up").values()) == [1]

    d.services.start_worker("node-2")
    drained = _wait_for(prometheus_port, 'imagesync_node_images_missing{node="node-2"}', 0)
    _wait_for(prometheus_port, 'imagesync_node_images_held{node="node-2"}', 3)
    _wait_for(prometheus_port, 'imagesync_node_queue_depth{node="node-2"}', 0)
    _wait_for(prometheus_port, 'imagesync_last_run_status{status="completed"}', 1)
    _wait_for(prometheus_port, 'sum(imagesync_last_run_pulls{node="node-2", status="pulled"})', 3)
    _wait_for(prometheus_port, "imagesync_lock_held", 0)
    _wait_for(prometheus_port, "count(imagesync_last_success_timestamp_seconds > 0)", 1)
    # what Prometheus says is what containerd holds
    assert len(d.held("node-2")) == 3
    print(f"missing=3 seen after {waited:.1f} s; missing=0 after {drained:.1f} s once node-2's worker started")
