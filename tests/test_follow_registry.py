"""Following the registry and the fleet's shape on the real cluster: a tag pushed again
reaches every node that holds its old digest (at the next run, and at once through the
webhook), and a prefix that names a label reaches only the nodes that carry it.

Three crictl nodes; node-1 and node-2 carry the label ``gpu``, node-3 none at first.
``bcm11`` is a plain prefix (every node), ``nvidia`` one for ``gpu`` nodes only. The
module's cluster is set up once, up to the end of a first run; the tests then go on from
one another, in order (a label added, a tag pushed again, a push through the webhook).
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import Deployment
from helpers import measured, started_run, wait_for

from imagesync.planning.labels import NOT_FOR_LABELS
from testcluster.cluster import Cluster
from testcluster.process import free_port
from testcluster.registry import Registry

pytestmark = pytest.mark.cluster

SECRET = "follow-the-registry"
NODES = ("node-1", "node-2", "node-3")


def cli_json(d: Deployment, *args: str):
    result = d.cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def configure(d: Deployment, labelled: tuple[str, ...]) -> None:
    """The configuration with ``labelled`` nodes carrying ``gpu``; the control worker, which
    plans the runs, is started again to read it."""
    registry = d.cluster.registry_address
    d.configure(prefixes=[f"{registry}/bcm11", {"name": f"{registry}/nvidia", "nodes": ["gpu"]}],
                nodes_extra={node: {"labels": ["gpu"]} for node in labelled},
                webhook_secret=SECRET, webhook_port=d.webhook_port)


def sync(d: Deployment) -> dict:
    """A run to its end; its record."""
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    return d.history(started_run(result))


def digests(d: Deployment, ref: str) -> dict[str, str | None]:
    """node -> the digest its containerd holds ``ref`` under (None if it lacks it)."""
    return {node: d.cluster.node(node).images().get(ref) for node in NODES}


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("follow")
    began = time.monotonic()
    port = free_port()
    with Cluster(workdir / "cluster", nodes=3, registry_notify=(f"http://127.0.0.1:{port}/", SECRET)) as cluster:
        deployment = Deployment(cluster, workdir)
        deployment.webhook_port = port
        with deployment.services:
            deployment.app = cluster.ref("bcm11/app:latest")
            deployment.cuda = cluster.ref("nvidia/cuda:12")
            cluster.seed({"node-1": ["bcm11/app:latest", "nvidia/cuda:12"]})
            configure(deployment, labelled=("node-1", "node-2"))
            deployment.start()
            measured("cluster, images and workers ready", f"{time.monotonic() - began:.1f} s")
            deployment.first_plan = cli_json(deployment, "plan")
            deployment.first_run = sync(deployment)
            yield deployment


def test_a_labelled_prefix_reaches_only_the_nodes_that_carry_the_label(d):
    excluded = d.first_plan["excluded"]["node-3"][d.cuda]
    assert excluded["kind"] == "n/a" and excluded["reason"].startswith(NOT_FOR_LABELS), excluded
    assert "gpu" in excluded["reason"]
    assert d.cuda in d.first_plan["missing"]["node-2"]
    assert d.first_plan["labels"] == {"node-1": ["gpu"], "node-2": ["gpu"]}

    run = d.first_run
    pulls = {(r["node"], r["image"]): r["status"] for r in run["results"]}
    assert pulls == {("node-2", d.app): "pulled", ("node-2", d.cuda): "pulled", ("node-3", d.app): "pulled"}
    assert run["status"] == "completed" and run["excluded"]["node-3"][d.cuda]["kind"] == "n/a"
    held = digests(d, d.cuda)
    assert held["node-1"] == held["node-2"] is not None and held["node-3"] is None
    assert all(digests(d, d.app).values())

    # node-3 neither lacks it nor misses it: status shows n/a, and the next plan has nothing to do
    status = d.cli("status", env={"COLUMNS": "300"})
    row = next(line for line in status.stdout.splitlines() if "nvidia/cuda" in line)
    assert "n/a" in row and "missing" not in row, status.stdout
    assert status.stdout.count("ssh, gpu") == 2, status.stdout  # under each node, its labels
    assert cli_json(d, "plan")["missing"] == {}


def test_a_label_added_later_brings_the_images_at_the_next_run(d):
    configure(d, labelled=("node-1", "node-2", "node-3"))
    d.services.stop("control")
    d.services.start_control()
    run = sync(d)
    pulls = {(r["node"], r["image"]): r["status"] for r in run["results"]}
    assert pulls == {("node-3", d.cuda): "pulled"}, run["results"]
    assert len(set(digests(d, d.cuda).values())) == 1 and None not in digests(d, d.cuda).values()


def test_a_tag_pushed_again_reaches_every_node_at_the_next_run(d):
    before = digests(d, d.app)
    assert len(set(before.values())) == 1 and None not in before.values()
    old = before["node-1"]
    # the same tag, other content: the registry names another digest now
    new = d.cluster.registry.push_image("bcm11/app", "latest", size=2048)
    assert new != old

    plan = cli_json(d, "plan")
    for node in NODES:
        assert plan["moved"][node][d.app] == {"held": old, "now": new}
        assert plan["routes"][node][d.app]["replaces"] == old
    run = sync(d)
    results = {r["node"]: r for r in run["results"] if r["image"] == d.app}
    assert set(results) == set(NODES), run["results"]
    for result in results.values():
        assert (result["status"], result["replaced"], result["digest"]) == ("updated", old, new), result
    assert run["status"] == "completed" and run["counts"] == {"updated": 3}
    assert digests(d, d.app) == {node: new for node in NODES}
    # settled: nothing moves any more, and the tag is no drift
    plan = cli_json(d, "plan")
    assert plan["missing"] == {} and plan["moved"] == {} and plan["drift"] == []
    # the CRI keeps the old image under an untagged name: a node that lost it (its image GC) is not given it back
    leftover = f"{d.app.rsplit(':', 1)[0]}@{old}"
    assert leftover in d.cluster.node("node-1").images()
    node = d.cluster.node("node-3")
    node.run(["ctr", "-a", node.socket, "-n", "k8s.io", "images", "rm", leftover])
    plan = cli_json(d, "plan")
    assert plan["missing"] == {} and leftover not in plan["wanted"]


def test_a_tag_pushed_again_reaches_every_node_through_the_webhook(d):
    d.services.start_webhook(d.webhook_port)
    old = digests(d, d.app)["node-1"]
    # pushed through the proxy, as a client names images: the registry's notification
    # then names the host the nodes pull from, which is under the prefix
    through_proxy = Registry(d.cluster.workdir / "push-client", port=d.cluster.proxy.port)
    new = through_proxy.push_image("bcm11/app", "latest", size=4096)
    assert new != old
    wait_for(lambda: digests(d, d.app) == {node: new for node in NODES}, 60, "the new digest on every node")
    run = next(run for run in d.history() if run["trigger"] == f"webhook: {d.app}")
    wait_for(lambda: d.history(run["id"])["status"] == "completed", 30, "the webhook's run to complete")
    results = {r["node"]: r for r in d.history(run["id"])["results"]}
    assert {node: (r["status"], r["replaced"], r["digest"]) for node, r in results.items()} == {
        node: ("updated", old, new) for node in NODES}
    assert "Traceback" not in d.services.log("webhook")


def test_a_run_asks_about_its_tags_held_after_sending_the_pulls_that_need_no_answer(d):
    """The registry answering 2 s late: the pulls of an image two nodes lack start at once, and
    those of a tag the registry has moved follow, in the same run, once it has said so (before,
    no pull started before every tag held had its answer)."""
    old = digests(d, d.app)["node-1"]
    fresh = d.cluster.ref("bcm11/fresh:1")
    d.cluster.seed({"node-1": ["bcm11/fresh:1"]})
    new = d.cluster.registry.push_image("bcm11/app", "latest", size=1536)  # not through the proxy: no webhook
    assert new != old
    latency = 2.0
    began = time.time()
    d.cluster.proxy.latency(latency)
    try:
        run = sync(d)
    finally:
        d.cluster.proxy.latency(0)
    assert run["status"] == "completed" and run["counts"] == {"pulled": 2, "updated": 3}, run
    starts = {(node, p.ref): p.start for node in NODES for p in d.cluster.node(node).pulls() if p.start >= began}
    fresh_started = max(when for (_, ref), when in starts.items() if ref == fresh)
    moved_started = min(when for (_, ref), when in starts.items() if ref == d.app)
    measured("first pulls ahead of the moved tags' pulls", f"{moved_started - fresh_started:.2f} s")
    # the moved tags' pulls waited for the answers (one round trip of 2 s); the others did not
    assert moved_started - fresh_started > latency * 0.6, starts
    assert digests(d, d.app) == {node: new for node in NODES}
    assert set(digests(d, fresh).values()) == {d.cluster.digests[fresh]}
