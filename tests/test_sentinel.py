"""imagesync on Redis Sentinel, on the real test cluster: a master, a replica and three
sentinels (Debian's redis-server and redis-sentinel), real Celery workers, containerd
nodes over SSH. The broker, the result backend, the run lock, the run records, the
workers' and the CLI's clients all find the master through the sentinels.

The master is killed (SIGKILL) while a run's pulls are running and others wait in
their queue; the sentinels promote the replica. The run must complete, or be
abandoned by the stale-run check and the next run converge, checked on the nodes'
containerd.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
from conftest import Deployment
from helpers import measured, started_run, wait_for

from imagesync import keys
from imagesync.budgets import stale_after
from imagesync.config import load_settings
from imagesync.redisclient import connect
from imagesync.redisvalues import as_text
from imagesync.sync import finalize_stale
from testcluster.cluster import Cluster
from testcluster.process import free_port, port_open
from testcluster.sentinel import SentinelGroup

pytestmark = pytest.mark.cluster

MASTER_NAME = "imagesync-test"
PASSWORD = "sentinel-Pw-7f3a"  # found nowhere in the logs, however the processes report Redis
NODES = ("node-1", "node-2")
WEBHOOK_SECRET = "sentinel-hook-4e1b"


@pytest.fixture(scope="module")
def sentinel_deploy(tmp_path_factory):
    """The test cluster and a Sentinel group, started together; imagesync's workers on the sentinels."""
    workdir = tmp_path_factory.mktemp("sentinel")
    began = time.monotonic()
    with ExitStack() as stack:
        group = SentinelGroup(workdir / "redis", master_name=MASTER_NAME, password=PASSWORD)
        cluster = Cluster(workdir / "cluster", nodes=len(NODES))
        stack.callback(group.stop)
        stack.callback(cluster.stop)
        with ThreadPoolExecutor(max_workers=2) as pool:
            for started in [pool.submit(group.start), pool.submit(cluster.start)]:
                started.result()
        d = Deployment(cluster, workdir)
        stack.enter_context(d.services)
        d.configure(redis_url=group.url, redis_master_name=MASTER_NAME, time_out=20, max_parallel=2)
        d.start()
        measured("sentinel group, cluster and workers started (s)", round(time.monotonic() - began, 1))
        yield d, group


@pytest.fixture(scope="module")
def front(sentinel_deploy):
    """The exporter and the webhook receiver, on the sentinels too: their ports."""
    d, _ = sentinel_deploy
    exporter, webhook = free_port(), free_port()
    d.services._start("exporter", d.services._imagesync("exporter", "--port", str(exporter)), None)
    d.services._start("webhook", d.services._imagesync("webhook", "--address", "127.0.0.1", "--port", str(webhook)),
                      None, env={"IMAGESYNC_WEBHOOK_SECRET": WEBHOOK_SECRET})
    for name, port in (("exporter", exporter), ("webhook", webhook)):
        d.services.processes[name].wait_ready(lambda port=port: port_open(port), 30)
    return exporter, webhook


def metrics(port) -> dict[str, float]:
    """The exporter's samples: ``name{labels}`` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def notify(port, ref):
    """POST the registry's push notification of ``ref`` (host/repo:tag) to the webhook receiver."""
    host, rest = ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    digest = "sha256:" + "0" * 64
    payload = {"events": [{"id": "1", "action": "push", "request": {"host": host, "method": "PUT"},
                           "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": repo,
                                      "tag": tag, "digest": digest, "size": 1,
                                      "url": f"http://{host}/v2/{repo}/manifests/{digest}"}}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {WEBHOOK_SECRET}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


def pushed_and_synced(d, webhook, name):
    """Push ``name``, notify the webhook receiver, and wait for every node to hold it: the run's record."""
    ref = d.cluster.push(*name.split(":"))
    status, answer = notify(webhook, ref)
    assert (status, answer["accepted"]) == (202, [ref]), answer
    wait_for(lambda: every_node_holds(d, [ref]), 60, f"{ref} on every node")
    return wait_for(lambda: [run for run in d.history()
                             if run["trigger"] == f"webhook: {ref}" and run["status"] != "running"],
                    30, f"the end of the run of {ref}")[0]


@pytest.fixture
def redis(sentinel_deploy):
    """imagesync's own client of the master, through the sentinels."""
    d, _ = sentinel_deploy
    client = connect(load_settings(d.config_path), socket_timeout=5, socket_connect_timeout=5)
    yield client
    client.close()


def run_status(redis, run_id):
    status = redis.hget(keys.run(run_id), "status")
    return as_text(status) if status else None


def poll(check, timeout, interval=0.2):
    """``check()`` once it is true, or None after ``timeout`` (the caller decides what that means)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    return None


def every_node_holds(d, refs):
    held = {name: d.held(name) for name in NODES}
    return all(ref in held[name] and held[name][ref] == d.cluster.digests[ref] for name in NODES for ref in refs)


def test_the_cli_and_the_workers_reach_redis_through_the_sentinels(sentinel_deploy, redis):
    d, group = sentinel_deploy
    (ref,) = d.cluster.seed({"node-1": ["bcm11/through-sentinel:1"]})["node-1"]
    shown = d.cli("config", "show", env={"COLUMNS": "400"})
    assert shown.returncode == 0, shown.stderr
    assert "sentinel://:****@127.0.0.1:" in shown.stdout and PASSWORD not in shown.stdout
    assert MASTER_NAME in shown.stdout

    result = d.cli("sync", "--wait", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = started_run(result)
    assert run_status(redis, run_id) == "completed"
    assert every_node_holds(d, [ref])
    # the client wrote to the master the sentinels name, and the replica has it too
    with group.master.client() as master, group.replica.client() as replica:
        assert master.hget(keys.run(run_id), "status") == b"completed"
        wait_for(lambda: replica.hget(keys.run(run_id), "status") == b"completed", 10, "the run on the replica")


def test_the_exporter_and_the_webhook_reach_redis_through_the_sentinels(sentinel_deploy, redis, front):
    # README: every Redis client of imagesync, the exporter's and the webhook receiver's among them,
    # asks the sentinels where the master is
    d, group = sentinel_deploy
    exporter, webhook = front
    run = pushed_and_synced(d, webhook, "bcm11/hooked:1")
    assert run["status"] == "completed", run
    assert run_status(redis, run["id"]) == "completed"
    server = group.master if group.master_port() == group.master.port else group.replica
    with server.client() as master:
        assert master.hget(keys.run(run["id"]), "status") == b"completed"  # written on the master the sentinels name
    sample = wait_for(lambda: (m := metrics(exporter)).get('imagesync_last_run_status{status="completed"}') == 1
                      and m, 30, "the exporter to read the run")
    assert sample["imagesync_up"] == 1


def test_the_master_killed_mid_run_the_run_completes_or_the_next_one_converges(sentinel_deploy, redis, front):
    d, group = sentinel_deploy
    images = [f"bcm11/failover{i}:1" for i in range(6)]
    refs = d.cluster.seed({"node-1": images})["node-1"]
    settings = load_settings(d.config_path)
    workers = {name: d.services.processes[name].pid for name in d.services.processes}
    node = d.cluster.node("node-2")
    # 6 pulls on node-2, 2 at a time, 2 s each: the master dies with 2 running and 4 queued
    d.cluster.proxy.delay(2)
    try:
        run_id = started_run(d.cli("sync"))
        wait_for(lambda: len(node.processes(r"crictl.* pull ")) >= 2, 30, "two pulls running on node-2")
        old_port = group.master.port
        group.master.kill()
        killed = time.monotonic()
        failover = group.wait_for_failover(old_port, 30)
        measured("failover after SIGKILL of the master (s)", round(failover, 2))
        assert group.master_port() == group.replica.port

        ended = poll(lambda: run_status(redis, run_id) not in (None, "running"), 45)
        measured("run end after the kill (s)", round(time.monotonic() - killed, 1) if ended else "none in 45 s")
    finally:
        d.cluster.proxy.passthrough()
    # The record was written seconds before the kill: replication on loopback had it.
    assert run_status(redis, run_id) is not None, "the run record was lost with the master"
    if not ended:
        # A lost outcome: the run waits for a report that never comes. Beat's
        # stale-run check ends it once it made no progress for stale_after
        # seconds; the same check, with the clock moved on instead of waiting.
        assert not node.processes(r"crictl.* pull "), "a pull is still running"
        assert finalize_stale(settings, redis, now=time.time() + stale_after(settings) + 1) == [run_id]
    run = d.history(run_id)
    measured("run across the failover", f"{run['status']} {run['counts']} in {run['finished'] - run['started']:.1f} s")
    if run["status"] == "completed":
        assert sorted((r["node"], r["image"]) for r in run["results"]) == sorted(("node-2", ref) for ref in refs)
        assert {r["status"] for r in run["results"]} <= {"pulled", "present"}, run["results"]
    else:
        assert run["status"] == "abandoned", run
    assert redis.get(keys.LOCK) is None, "the lock outlived the run"

    again = d.cli("sync", "--wait", timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    measured("the next run", again.stdout.splitlines()[0] if again.stdout else "")
    assert every_node_holds(d, refs), {name: sorted(d.held(name)) for name in NODES}
    # The exporter and the webhook receiver lost the master too, and asked the sentinels again.
    exporter, webhook = front
    hooked = pushed_and_synced(d, webhook, "bcm11/after-failover:1")
    assert hooked["status"] == "completed", hooked
    wait_for(lambda: (m := metrics(exporter)).get("imagesync_up") == 1
             and m.get('imagesync_last_run_status{status="completed"}') == 1, 30, "the exporter on the new master")
    # The workers, the exporter and the webhook receiver rode out the failover: none was restarted.
    assert {name: d.services.processes[name].pid for name in d.services.processes} == workers
    assert all(d.services.processes[name].running for name in workers)
    # However Celery, kombu and imagesync reported losing the master, no log shows the password.
    logs = [*d.services.workdir.glob("*.log"), *d.cluster.log_dir.glob("*/*.log")]
    assert logs and not [path.name for path in logs if PASSWORD in path.read_text(errors="replace")]
