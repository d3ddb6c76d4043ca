"""Node-to-node transfer on the real cluster: ``ctr export`` on a node that holds an image,
through imagesync, into ``ctr import`` on a node that lacks it.

One 4-node cluster for the module. A test that needs other settings than the
module's asks for them with :func:`use`, which restarts imagesync's processes only
when the settings change, so that each test runs under its own settings in any
order. Every assertion on images asks the nodes' containerd directly.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import finish, measured, start_cli, started_run, wait_for, wait_for_run_end
from nodecopies import kill_export, make_local_image, stall_exports, unstall

from imagesync.attempt import Attempt, NodeFailed
from imagesync.budgets import KILL_AFTER
from imagesync.celeryconfig import node_queue
from imagesync.config import load_settings
from imagesync.outcomes import COPIED
from imagesync.planning.plan import PEERS, Route
from imagesync.sync import plan_now
from imagesync.transfer import copy, from_peers
from imagesync.transport import close_all

pytestmark = pytest.mark.cluster

NODES = 4
#: the module's settings; a test adds to them with use()
SETTINGS = {"time_out": 30, "max_parallel": 2, "retries": 0}


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    from conftest import Deployment

    from testcluster.cluster import Cluster
    from testcluster.install import ensure_system_packages

    ensure_system_packages()
    workdir = tmp_path_factory.mktemp("transfer")
    began = time.monotonic()
    with Cluster(workdir / "cluster", nodes=NODES) as cluster:
        deployment = Deployment(cluster, workdir)
        with deployment.services:
            deployment.configure(**SETTINGS)
            deployment.start()
            deployment.settings = SETTINGS
            measured("cluster and workers started (s)", round(time.monotonic() - began, 1))
            yield deployment
    close_all()


def use(d, **overrides) -> None:
    """Run imagesync with the module's settings and ``overrides``; restarted only if they change."""
    wanted = {**SETTINGS, **overrides}
    if d.settings != wanted:
        d.services.kill_all()  # between tests no pull is under way: nothing to finish or hand back
        d.configure(**wanted)
        d.start()
        d.settings = wanted


def digest_on(d, node: str, ref: str) -> str | None:
    return d.cluster.node(node).images().get(ref)


def history_results(d, run_id):
    return {(r["node"], r["image"]): r for r in d.history(run_id)["results"]}


def sync(d):
    result = d.cli("sync", "--wait", timeout=120)
    run_id = next(line.split()[1].rstrip(":") for line in result.stdout.splitlines()
                  if line.startswith("run ") and " started" in line)
    return result, run_id


# -- one copy, stopped mid-stream ---------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["ctr", "sshd"])
def test_a_source_killed_mid_stream_leaves_no_half_imported_image(d, what):
    ref = make_local_image(d, f"local/stalled-{what}:1", ["node-1"], size=4 * 1024 * 1024)
    digest = digest_on(d, "node-1", ref)
    source, target = d.cluster.node("node-1"), d.cluster.node("node-4")
    flag = d.workdir / f"stalled-{what}"
    stall_exports(source, flag)
    settings = load_settings(d.config_path)
    result = {}
    worker = threading.Thread(target=lambda: result.update(copied=copy(
        settings, settings.node("node-1"), settings.node("node-4"), ref, digest, "linux/amd64", 30)))
    try:
        worker.start()
        wait_for(flag.exists, 20, "the export stalled after its first MB")
        wait_for(lambda: target.processes(r"images import"), 20, "the import running on the target")
        kill_export(source, what)
        worker.join(30)
    finally:
        flag.unlink(missing_ok=True)  # what is left of the export writes again, into a closed channel
        unstall(source)
    copied = result["copied"]
    assert not copied.ok
    assert "export on node-1" in copied.reason
    assert copied.transient  # a killed source may serve again
    assert ref not in target.images()  # nothing under the name: not even a half-imported image
    wait_for(lambda: not target.processes(r"images import"), 10, "no import left on node-4")
    wait_for(lambda: not source.processes(r"images export"), 10, "no export left on node-1")
    measured(f"source {what} killed: {copied.reason}", "")


def test_the_next_holder_is_tried_when_a_source_dies(d):
    ref = make_local_image(d, "local/two-holders:1", ["node-1", "node-2"], size=4 * 1024 * 1024)
    digest = digest_on(d, "node-1", ref)
    assert digest == digest_on(d, "node-2", ref)
    source = d.cluster.node("node-1")
    flag = d.workdir / "stalled-next"
    stall_exports(source, flag)
    settings = load_settings(d.config_path)
    route = Route((PEERS,), ("node-1", "node-2"), digest, platform="linux/amd64")
    attempt = Attempt(settings, settings.node("node-3"), ref, route, check=False)
    result = {}
    worker = threading.Thread(target=lambda: result.update(outcome=from_peers(attempt)))
    try:
        worker.start()
        wait_for(flag.exists, 20, "the export on node-1 stalled")
        kill_export(source, "ctr")
        worker.join(30)
    finally:
        flag.unlink(missing_ok=True)
        unstall(source)
    outcome, _ = result["outcome"]
    assert (outcome.status, outcome.source) == (COPIED, "node-2"), outcome
    assert digest_on(d, "node-3", ref) == digest


def test_a_missing_digest_is_refused_and_the_import_removed(d):
    """A source whose image is not the one planned: nothing is copied, nothing is left."""
    ref = make_local_image(d, "local/other-digest:1", ["node-1"])
    settings = load_settings(d.config_path)
    wrong = "sha256:" + "0" * 64
    copied = copy(settings, settings.node("node-1"), settings.node("node-2"), ref, wrong, "linux/amd64", 30)
    assert not copied.ok
    assert f"node-1 now holds {ref} as" in copied.reason
    assert ref not in d.cluster.node("node-2").images()


def test_a_presence_check_that_hangs_ends_on_the_node(d):
    """A checked copy first asks its target whether it holds the image, under the node's
    ``timeout``: closing the SSH channel stops nothing on the node, so without it the check's
    ``sh`` and ``ctr`` stay there for as long as containerd does not answer."""
    settings = load_settings(d.config_path).model_copy(update={"time_out": 3})
    target = d.cluster.node("node-4")
    ref = d.cluster.ref("bcm11/never:1")
    route = Route((PEERS,), ("node-1",), platform="linux/amd64")
    attempt = Attempt(settings, settings.node("node-4"), ref, route, check=True)
    # a containerd that takes the connection and never answers: ctr waits as long as it must
    wrapper = target.bin_dir / "ctr"
    wrapper.write_text('#!/bin/sh\ncase "$*" in\n  *"images ls"*) sleep 600 ;;\n  *) exec /usr/bin/ctr "$@" ;;\nesac\n')
    wrapper.chmod(0o755)
    try:
        began = time.monotonic()
        try:
            answer: object = from_peers(attempt)
        except NodeFailed as exc:
            answer = exc
        took = time.monotonic() - began
        settle = time.monotonic() + 2  # killed processes take a moment to go
        while (left := target.processes(r"\bctr\b|\bsh -c\b|\btimeout\b|\bsleep\b")) and time.monotonic() < settle:
            time.sleep(0.1)
    finally:
        unstall(target)
    for process in left:  # the node for the next test
        os.kill(process.pid, signal.SIGKILL)
    assert left == [], left
    # the node's own failure: no other source could do better, the route ends here
    assert isinstance(answer, NodeFailed), answer
    reason = answer.outcome.reason
    assert answer.transient and reason.startswith("containerd on node-4 did not say within "), reason
    assert reason.endswith(f" s whether it holds {ref}"), reason
    assert took < 3 + KILL_AFTER + 3, took


# -- whole runs ---------------------------------------------------------------------------------------------


def test_images_no_registry_serves_are_copied_from_the_node_that_holds_them(d):
    use(d)
    # one built on node-1 alone, one node-1 pulled before the registry lost it
    local = make_local_image(d, "bcm11/built-here:1", ["node-1"])
    d.cluster.seed({"node-1": ["bcm11/lost:1"]})
    lost = d.cluster.ref("bcm11/lost:1")
    d.cluster.registry.delete_image("bcm11/lost", "1")
    plan = d.cli("plan", "--json")
    assert plan.returncode == 0, plan.stderr
    assert "registry, then node-1 if not found" in plan.stdout

    result, run_id = sync(d)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 copied from node-1" in result.stdout
    for ref in (local, lost):
        digests = {node: digest_on(d, node, ref) for node in ("node-1", "node-2", "node-3", "node-4")}
        assert len(set(digests.values())) == 1 and None not in digests.values(), digests
    results = history_results(d, run_id)
    for node in ("node-2", "node-3", "node-4"):
        for ref in (local, lost):
            outcome = results[(node, ref)]
            assert (outcome["status"], outcome["source"]) == ("copied", "node-1"), outcome
    success_log = "".join(p.read_text() for p in d.cluster.log_dir.glob("*/success_images.log"))
    assert f"image={local}" in success_log and "copied" in success_log
    # the kubelet's view: the CRI lists the copy
    with d.cluster.node("node-2").image_client() as client:
        assert any(local in image.repo_tags for image in client.list())


def test_peers_first_the_registry_serves_each_blob_once(d):
    ref = d.cluster.push("bcm11/wide", "1", size=4 * 1024 * 1024, layers=2)
    use(d, source="peers-first", images=[ref])
    plan = d.cli("plan", "--json")
    assert "nodes that hold it (after node-1)" in plan.stdout, plan.stdout
    # the plan judged the image's platforms once (its manifest and config, kept in Redis):
    # from here on, only the image's copies are counted
    d.cluster.proxy.clear()

    began = time.monotonic()
    result, run_id = sync(d)
    assert result.returncode == 0, result.stdout + result.stderr
    measured("peers-first, 4 nodes, 4 MB image: run (s)", round(time.monotonic() - began, 1))
    gets = Counter(r.path for r in d.cluster.proxy.requests
                   if r.method == "GET" and "/bcm11/wide/blobs/" in r.path)
    assert len(gets) == 3 and set(gets.values()) == {1}, gets  # two layers and the config, once each
    digests = {digest_on(d, node, ref) for node in ("node-1", "node-2", "node-3", "node-4")}
    assert digests == {d.cluster.digests[ref]}
    results = history_results(d, run_id)
    statuses = Counter(results[(node, ref)]["status"] for node in ("node-1", "node-2", "node-3", "node-4"))
    assert statuses == {"pulled": 1, "copied": 3}, statuses
    for node in ("node-1", "node-2", "node-3", "node-4"):
        outcome = results[(node, ref)]
        measured(f"{node}: {outcome['status']} {outcome.get('source', '')}", f"{outcome['duration']} s")
    sources = Counter(results[(node, ref)].get("source") for node in ("node-2", "node-3", "node-4"))
    assert max(sources.values()) <= 2, sources  # the holders doubled: node-1 did not serve everyone


def test_a_seed_that_fails_sends_the_nodes_waiting_for_it_to_the_registry(d):
    ref = d.cluster.push("bcm11/seeded", "1")
    use(d, source="peers-first", images=[ref])
    with d.cluster.redis.client() as client:
        plan = plan_now(load_settings(d.config_path), redis=client)
    routes = {node.name: plan.route(node.name, ref) for node in d.cluster.nodes}
    (seed,) = {route.seed for route in routes.values() if route.seed}
    waiting = sorted(node for node, route in routes.items() if route.seed == seed)
    assert len(waiting) == NODES - 1, routes
    # the seed cannot reach the registry: its hosts.toml names a closed port
    hosts = d.cluster.node(seed).workdir / "certs.d" / d.cluster.registry_address / "hosts.toml"
    kept = hosts.read_text()
    hosts.write_text('server = "http://127.0.0.1:1"\n\n[host."http://127.0.0.1:1"]\n'
                     '  capabilities = ["pull", "resolve"]\n')
    try:
        result, run_id = sync(d)
    finally:
        hosts.write_text(kept)

    assert result.returncode == 1, result.stdout + result.stderr  # the seed's pull failed
    results = history_results(d, run_id)
    assert results[(seed, ref)]["status"] == "failed", results[(seed, ref)]
    assert digest_on(d, seed, ref) is None
    # the others did not wait out time_out for a holder: the seed's failure sent them to the
    # registry; one that looked for a holder after another had got it copies from that one
    outcomes = {node: results[(node, ref)] for node in waiting}
    pulled = [node for node, outcome in outcomes.items() if outcome["status"] == "pulled"]
    assert pulled, outcomes
    holders = {node for node, outcome in outcomes.items() if outcome["status"] in ("pulled", "copied")}
    for node, outcome in outcomes.items():
        if outcome["status"] == "pulled":
            assert outcome["reason"].startswith(f"peers: no node holds it: {seed}, which was to get it from the "
                                                "registry, failed: "), outcome
        else:
            assert (outcome["status"], outcome["source"]) in {("copied", h) for h in holders - {node}}, outcome
        assert digest_on(d, node, ref) == d.cluster.digests[ref]


# -- waiting for a holder ---------------------------------------------------------------------------------


def copies_first(d, nodes) -> None:
    """Put the queued copies of ``nodes`` before their seeds' pulls, as retries, slot requeues and
    take-backs can leave them: each node's worker takes a copy that waits for the other's seed first."""
    def seeds_first(message: bytes) -> bool:
        kwargs = json.loads(base64.b64decode(json.loads(message)["body"]))[1]
        return (kwargs.get("route") or {}).get("sources", ["registry"])[0] != "peers"

    with d.cluster.redis.client() as client:
        for node in nodes:
            queue = node_queue(node)
            messages = client.lrange(queue, 0, -1)
            # a worker takes from the right end: the seeds to the left, behind the copies
            ordered = sorted(messages, key=seeds_first, reverse=True)
            pipe = client.pipeline()
            pipe.delete(queue)
            pipe.rpush(queue, *ordered)
            pipe.execute()


def test_copies_waiting_on_each_others_seeds_give_way_to_them(d):
    x, y = d.cluster.push("bcm11/mutual-x", "1"), d.cluster.push("bcm11/mutual-y", "1")
    use(d, source="peers-first", images=[x, y], max_parallel=1)
    nodes = [node.name for node in d.cluster.nodes]
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(d.services.stop, [f"worker-{node}" for node in nodes]))
    try:
        run_id = started_run(d.cli("sync"))  # the pulls wait in their queues
        seeds = {route.seed for route in routes_of(d, x).values()} | {route.seed for route in routes_of(d, y).values()}
        assert seeds == {"node-1", "node-2", None}, seeds  # node-1 seeds x, node-2 y: each waits for the other
        copies_first(d, nodes)
    finally:
        for node in nodes:
            d.services.start_worker(node, wait=False)
        for node in nodes:
            d.services.wait_ready(f"worker-{node}")
    began = time.monotonic()
    run = wait_for_run_end(d, run_id, 2 * SETTINGS["time_out"])
    took = time.monotonic() - began
    measured("two nodes, one process each, each taking first a copy of what the other seeds: run (s)",
             round(took, 1))
    results = {(r["node"], r["image"]): r for r in run["results"] if r["image"] in (x, y)}
    statuses = Counter(r["status"] for r in results.values())
    # the seeds pulled while the copies waited in their queues, and the copies then copied
    assert statuses == {"pulled": 2, "copied": 6}, results
    assert results[("node-1", x)]["status"] == results[("node-2", y)]["status"] == "pulled"
    assert took < SETTINGS["time_out"] / 2, took  # no copy held its node's one process until it gave up waiting


def routes_of(d, ref):
    with d.cluster.redis.client() as client:
        plan = plan_now(load_settings(d.config_path), redis=client)
    return {node.name: plan.route(node.name, ref) for node in d.cluster.nodes}


def test_a_copy_that_waits_half_of_time_out_for_a_holder_goes_to_the_registry(d):
    ref = d.cluster.push("bcm11/slow-seed", "1")
    use(d, source="peers-first", images=[ref])
    (seed,) = {route.seed for route in routes_of(d, ref).values() if route.seed}
    d.cluster.proxy.hold("bcm11/slow-seed")
    try:
        process = start_cli(d, "sync", "--wait")
        wait_for(lambda: d.cluster.proxy.held >= 1, 30, "the seed's pull held at the registry")
        # half of time_out later, the others give up waiting for a holder: at the registry too
        wait_for(lambda: d.cluster.proxy.held >= NODES, SETTINGS["time_out"], "every node's pull at the registry")
    finally:
        d.cluster.proxy.release()
    result = finish(process)
    assert result.returncode == 0, result.stdout + result.stderr
    results = history_results(d, started_run(result))
    for node in d.cluster.nodes:
        outcome = results[(node.name, ref)]
        assert outcome["status"] == "pulled", outcome
        if node.name != seed:
            limit = SETTINGS["time_out"] / 2
            assert outcome["reason"] == f"peers: no node came to hold it within {limit:g} s (half of time_out)"
            assert limit <= outcome["duration"] < SETTINGS["time_out"], outcome
