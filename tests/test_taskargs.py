"""Messages that no part of imagesync writes, published straight to the broker.

Anyone who can publish to the broker (every agent holds the Redis URL) can
queue a task. On the real cluster (Redis, node workers, containerd, sshd, the
registry and a backup registry), forged pulls must reach no node's shell and
tag nothing; and the argument checks, one by one, without servers.
"""

from __future__ import annotations

import time

import pytest
from celery import Celery
from helpers import wait_for

from imagesync import references, taskargs
from imagesync.taskargs import RefusedTask

RUN = "20261204-101500-abcdef"
DIGEST = "sha256:" + "b" * 64


class _Settings:
    agents = False

    def __init__(self, arch_entries=None):
        self.nodes = [type("N", (), {"name": name}) for name in ("node-1", "node-2")]
        self._arch = arch_entries or {}

    def per_architecture(self):
        return self._arch


def test_the_grammar_of_each_argument():
    assert taskargs.run_id(RUN) == RUN
    for bad in ("x", "20261204-101500-ABCDEF", RUN + ";id", 7, None):
        with pytest.raises(RefusedTask):
            taskargs.run_id(bad)
    assert taskargs.reference("registry.test:5000/bcm11/app:1") == "registry.test:5000/bcm11/app:1"
    for bad in ("App:1", "a b", "$(id)", "r/a:1;id", None, ["r/a:1"]):
        with pytest.raises(RefusedTask):
            taskargs.reference(bad)
    for bad in ("$(touch /tmp/x)", "sha256:abc", DIGEST + "`id`", 5):
        with pytest.raises(RefusedTask, match="digest"):
            taskargs.digest(bad)
    assert taskargs.deadline(12.5) == 12.5 and taskargs.deadline(None) is None
    with pytest.raises(RefusedTask):
        taskargs.deadline("soon")
    with pytest.raises(RefusedTask):
        taskargs.trigger("x\n" * 3)
    with pytest.raises(RefusedTask, match="queue"):
        taskargs.delivered_to("node-1", "node.node-2", "node.node-1")
    taskargs.delivered_to("node-1", None, "node.node-1")  # a broker that does not say: no check


def test_a_route_is_checked_field_by_field():
    settings = _Settings({"r.test/a:1": {"amd64": "r.test/a-amd64:1", "arm64": "r.test/a-arm64:1"}})
    image = "r.test/a:1"
    good = {"sources": ["peers", "registry"], "peers": ["node-2"], "digest": DIGEST, "seed": "node-1",
            "platform": "linux/arm64/v8", "pull_as": "r.test/a-arm64:1", "pin": True}
    route = taskargs.route(settings, None, good, image)
    assert route.peers == ("node-2",) and route.pull_as == "r.test/a-arm64:1"
    assert taskargs.route(settings, None, None, image).sources == ("registry",)
    refused = {
        "a source no plan writes": {"sources": ["shell"]},
        "a peer that is no node": {"sources": ["peers"], "peers": ["node-9"]},
        "a seed that is no node": {"sources": ["peers"], "seed": "evil"},
        "a digest with a command": {"sources": ["backup"], "digest": "$(touch /tmp/x)"},
        "a platform with a command": {"platform": "linux/$(id)"},
        "pull_as onto a trusted name": {"pull_as": "r.test/evil:1"},
        "a field no plan writes": {"command": "id"},
        "pin that is no boolean": {"pin": "yes"},
        "sources that are no list": {"sources": "registry"},
    }
    for what, data in refused.items():
        try:
            taskargs.route(settings, None, data, image)
        except RefusedTask:
            continue
        pytest.fail(f"accepted a route with {what}")
    # pull_as of another image's entry
    with pytest.raises(RefusedTask, match="per-architecture"):
        taskargs.route(settings, None, {"pull_as": "r.test/a-arm64:1"}, "r.test/b:1")


# -- on the real cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    """A 2-node ctr cluster, its workers, a backup registry; and a Celery client of its broker."""
    from conftest import Deployment

    from testcluster.cluster import Cluster
    from testcluster.install import ensure_system_packages
    from testcluster.registry import Registry

    ensure_system_packages()
    workdir = tmp_path_factory.mktemp("forged")
    with Cluster(workdir / "cluster", nodes=2, runtime="ctr") as cluster, \
            Registry(workdir / "backup-registry") as registry:
        d = Deployment(cluster, workdir)
        d.backup = registry
        with d.services:
            d.configure(backup={"registry": f"{registry.address}/bk", "insecure": True,
                                "insecure_sources": [cluster.registry_address]})
            d.start()
            d.broker = Celery(broker=cluster.redis.url)
            yield d


def _send(d, node, image, route, queue=None):
    """Publish a pull as a forger would, and wait until the worker of ``queue`` has run it."""
    queue = queue or f"node.{node}"
    task = d.broker.send_task("imagesync.pull", args=(RUN, node, image),
                              kwargs={"route": route, "deadline": time.time() + 300}, queue=queue)
    worker = "worker-" + queue.removeprefix("node.")
    wait_for(lambda: f"imagesync.pull[{task.id}] succeeded" in d.services.log(worker), 120,
             f"{worker} to run the forged pull")
    return d.services.log(worker)


@pytest.mark.cluster
def test_a_forged_restore_digest_runs_nothing_on_the_node(forged, tmp_path):
    d, c = forged, forged.cluster
    c.push("bcm11/app", "1")
    image = c.ref("bcm11/app:1")
    # the backup holds the image, so a restore gets as far as comparing digests
    name = references.backup_name(f"{d.backup.address}/bk", image)
    d.backup.push_image(name.split("/", 1)[1].rsplit(":", 1)[0], "1")
    marker = tmp_path / "marker"
    log = _send(d, "node-1", image, {"sources": ["backup"], "digest": f"$(touch {marker})"})
    assert not marker.exists()
    assert "refused task arguments: digest" in log
    assert image not in c.node("node-1").images()


@pytest.mark.cluster
def test_a_forged_pull_as_tags_nothing_onto_a_trusted_name(forged):
    d, c = forged, forged.cluster
    c.push("bcm11/trusted", "1")
    c.push("bcm11/evil", "1", size=2048)
    trusted, evil = c.ref("bcm11/trusted:1"), c.ref("bcm11/evil:1")
    log = _send(d, "node-2", trusted, {"sources": ["registry"], "pull_as": evil})
    held = c.node("node-2").images()
    assert trusted not in held and evil not in held
    assert f"route pull_as '{evil}' is not a per-architecture entry" in log


@pytest.mark.cluster
def test_a_pull_for_one_node_on_another_nodes_queue_is_refused(forged):
    d, c = forged, forged.cluster
    c.push("bcm11/queue", "1")
    image = c.ref("bcm11/queue:1")
    log = _send(d, "node-2", image, None, queue="node.node-1")
    assert image not in c.node("node-2").images()
    assert "a message for node 'node-2' arrived on queue 'node.node-1'" in log
    # the same pull on its own queue runs
    _send(d, "node-2", image, None)
    wait_for(lambda: image in c.node("node-2").images(), 60, f"{image} on node-2")
