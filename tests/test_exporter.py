"""``imagesync exporter`` and deploy/prometheus/: the collector on a real Redis, the
alert rules with promtool, and a real Prometheus scraping the exporter during a sync."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from imagesync import keys
from imagesync.config import Settings
from imagesync.exporter import registry_for, schedule_period
from imagesync.lock import RunLock
from imagesync.plan import make_plan
from imagesync.runs import Outcome
from imagesync.runtimes import Image
from imagesync.sync import node_counts, run_store, stale_after

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


def test_a_scrape_with_100_nodes_is_cheap(redis_client):
    """100 nodes x 50 pulls in the newest run, a full history of 200 runs."""
    nodes = [f"node-{i:03}" for i in range(100)]
    settings = settings_for(nodes)
    store = run_store(settings, redis_client)
    for n in range(199):
        store.create(f"20260101-{n:06}-aaaaaa", trigger="test", pulls=[], skipped={}, drift=[], refused=[],
                     wanted=500, nodes={node: {"held": 500, "missing": 0, "drifted": 0} for node in nodes})
    pulls = [(node, f"registry.test/img:{i}") for node in nodes for i in range(50)]
    store.create("20260102-000000-bbbbbb", trigger="test", pulls=pulls, skipped={}, drift=[], refused=[],
                 wanted=500, nodes={node: {"held": 450, "missing": 50, "drifted": 2} for node in nodes})
    for node, image in pulls[::2]:
        store.record("20260102-000000-bbbbbb", Outcome(node, image, "pulled"))
    for node in nodes:
        redis_client.rpush(f"node.{node}", *range(25))
    registry = registry_for(settings, redis_client)
    redis_client.config_resetstat()
    timings = []
    for _ in range(5):
        began = time.perf_counter()
        assert value(registry, "imagesync_node_images_missing", node="node-042") == 25
        timings.append(time.perf_counter() - began)
    calls = int(redis_client.info("stats")["total_commands_processed"])
    print(f"scrape with 100 nodes, 200 runs: best {min(timings) * 1000:.1f} ms, worst {max(timings) * 1000:.1f} ms; "
          f"{calls / 5:.0f} Redis commands per scrape")
    assert value(registry, "imagesync_node_queue_depth", node="node-099") == 25
    assert min(timings) < 0.5


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_the_rules_check_and_their_tests_pass():
    check = subprocess.run(["promtool", "check", "rules", "imagesync.rules.yml"], cwd=RULES_DIR,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 5 rules found" in check.stdout
    unit = subprocess.run(["promtool", "test", "rules", "imagesync.rules.test.yml"], cwd=RULES_DIR,
                          capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


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
    assert _query(prometheus_port, 'up{job="imagesync"}') and _query(prometheus_port, "imagesync_up")

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
