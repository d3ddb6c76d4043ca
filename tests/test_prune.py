"""Pruning on the real cluster: retired images leave the nodes, an image a container uses
stays, and nothing outside what imagesync manages is touched.

Two nodes: node-1 lists images with crictl, node-2 with ctr; both carry the label
``gpu`` at first. ``bcm11`` is a plain prefix, ``nvidia`` one for ``gpu`` nodes; two
``tools`` images are declared, and ``team/own:1`` lies outside every prefix (an
operator's own image). A first run brings everything to both nodes (and Redis
remembers what it declared). Then a container is made on each node from
``tools/used:1``, and the configuration retires, in each of prune's three ways:
``bcm11/scratch`` is excluded (and so is ``team``, which imagesync never managed),
the ``tools`` images are no longer declared, and node-2 loses its ``gpu`` label.
The tests go on from one another, in order.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import Deployment
from helpers import measured, started_run, wait_for

from imagesync import keys
from imagesync.planning.labels import NOT_FOR_LABELS
from testcluster.cluster import Cluster

pytestmark = pytest.mark.cluster

NODES = ("node-1", "node-2")
APP, SCRATCH, CUDA = "bcm11/app:1", "bcm11/scratch:1", "nvidia/cuda:12"
OLD, USED, LATE, OWN = "tools/old:1", "tools/used:1", "tools/late:1", "team/own:1"


def configure(d: Deployment, *, declared: tuple[str, ...], exclude: tuple[str, ...] = (),
              gpu: tuple[str, ...] = NODES, prune: bool = False) -> None:
    """node-2 on ctr with its hosts dir; ``gpu``: the nodes that carry the label."""
    ref = d.cluster.ref
    extra = {name: {"labels": ["gpu"] if name in gpu else []} for name in NODES}
    extra["node-2"] |= {"runtime": "ctr", "hosts_dir": str(d.cluster.node("node-2").workdir / "certs.d")}
    d.configure(prefixes=[ref("bcm11"), {"name": ref("nvidia"), "nodes": ["gpu"]}],
                images=[ref(image) for image in declared], exclude=[ref(pattern) for pattern in exclude],
                nodes_extra=extra, prune=prune)


def held(d: Deployment, node: str) -> set[str]:
    """The tags a node's containerd holds, short (``bcm11/app:1``)."""
    ours = f"{d.cluster.registry_address}/"
    return {ref.removeprefix(ours) for ref in d.cluster.node(node).images() if "@" not in ref}


def make_container(d: Deployment, node: str, image: str, name: str) -> None:
    """A container made from ``image`` with ctr, as nerdctl or a kubelet's runtime keeps one."""
    d.cluster.node(node).run(["ctr", "-n", "k8s.io", "containers", "create", d.cluster.ref(image), name])


def cli_json(d: Deployment, *args: str, code: int = 0):
    result = d.cli(*args, "--json")
    assert result.returncode == code, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prune")
    began = time.monotonic()
    with Cluster(workdir / "cluster", nodes=2) as cluster:
        deployment = Deployment(cluster, workdir)
        with deployment.services:
            cluster.push_many([OLD, USED, LATE])
            cluster.seed({"node-1": [APP, SCRATCH, CUDA, OWN], "node-2": [OWN]})
            configure(deployment, declared=(OLD, USED, LATE))
            deployment.start()
            result = deployment.cli("sync", "--wait")
            assert result.returncode == 0, result.stdout + result.stderr
            deployment.first_run = started_run(result)
            for node in NODES:
                make_container(deployment, node, USED, "web")
            measured("cluster, images, first run and containers ready", f"{time.monotonic() - began:.1f} s")
            yield deployment


def test_the_first_run_brings_everything_everywhere(d):
    for node in NODES:
        assert held(d, node) >= {APP, SCRATCH, CUDA, OLD, USED, LATE, OWN}, node


def test_a_dry_run_shows_what_would_go_and_removes_nothing(d):
    configure(d, declared=(LATE,), exclude=("bcm11/scratch", "team"), gpu=("node-1",))
    before = {node: held(d, node) for node in NODES}
    pruned = cli_json(d, "prune", "--dry-run")
    ref = d.cluster.ref
    verdicts = {(v["node"], v["image"]): v for v in pruned["images"]}
    going = {key for key, v in verdicts.items() if v["remove"]}
    assert going == {("node-1", ref(SCRATCH)), ("node-1", ref(OLD)),
                     ("node-2", ref(SCRATCH)), ("node-2", ref(OLD)), ("node-2", ref(CUDA))}, verdicts
    assert verdicts[("node-1", ref(SCRATCH))]["reason"] == f"matches exclude {ref('bcm11/scratch')!r}"
    assert verdicts[("node-1", ref(OLD))]["reason"] == f"no longer declared (last declared by run {d.first_run})"
    assert verdicts[("node-2", ref(CUDA))]["reason"].startswith(NOT_FOR_LABELS)
    for node in NODES:
        kept = verdicts[(node, ref(USED))]
        assert not kept["remove"] and kept["reason"].startswith("in use by container web"), kept
        # never imagesync's: neither judged nor touched, though it matches exclude
        assert (node, ref(OWN)) not in verdicts
    assert {node: held(d, node) for node in NODES} == before
    assert pruned["run"] is None
    only = cli_json(d, "prune", "--dry-run", "--node", "node-2")
    assert {v["node"] for v in only["images"]} == {"node-2"} and len(only["images"]) == 4


def test_a_prune_while_a_run_holds_the_lock_does_nothing_and_says_so(d):
    holder = "20261204-000000-abcdef"
    with d.cluster.redis.client() as client:
        client.set(keys.LOCK, holder, ex=60)
        try:
            result = d.cli("prune")
        finally:
            client.delete(keys.LOCK)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"run {holder} holds the lock" in result.stderr
    assert SCRATCH in held(d, "node-1")


def test_prune_removes_retired_images_keeps_one_a_container_uses_and_everything_outside_the_prefixes(d):
    began = time.monotonic()
    result = d.cli("prune", env={"COLUMNS": "300"})
    measured("prune of 6 retired images on 2 nodes", f"{time.monotonic() - began:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert held(d, "node-1") == {APP, CUDA, USED, LATE, OWN}
    assert held(d, "node-2") == {APP, USED, LATE, OWN}
    # the image a container uses is still whole: the container's image can be read
    for node in NODES:
        d.cluster.node(node).run(["ctr", "-n", "k8s.io", "images", "check", f"name=={d.cluster.ref(USED)}"])
    # ...and a crictl node's CRI no longer lists what went
    cri = {tag for image in d.cluster.node("node-1").image_client().list() for tag in image.repo_tags}
    assert d.cluster.ref(SCRATCH) not in cri and d.cluster.ref(USED) in cri

    run_id = next(line.split()[1] for line in result.stdout.splitlines() if line.strip().startswith("prune "))
    run = d.history(run_id)
    assert run["trigger"] == "prune" and run["status"] == "completed"
    ours = f"{d.cluster.registry_address}/"
    outcomes = {(r["node"], r["image"].removeprefix(ours)): r["status"] for r in run["results"]}
    assert outcomes == {("node-1", SCRATCH): "removed", ("node-1", OLD): "removed", ("node-1", USED): "kept",
                        ("node-2", SCRATCH): "removed", ("node-2", OLD): "removed", ("node-2", CUDA): "removed",
                        ("node-2", USED): "kept"}, run["results"]
    log = "".join(path.read_text() for path in d.cluster.log_dir.glob("*/pruned_images.log"))
    assert log.count(f"run={run_id}") == 7 and "status=kept" in log and "in use by container web" in log

    # the next prune finds only what is kept, and says so again; the next run takes nothing for evicted
    again = cli_json(d, "prune")
    assert {(v["node"], v["remove"]) for v in again["images"]} == {("node-1", False), ("node-2", False)}
    assert cli_json(d, "plan")["evicted"] == {}


def test_with_prune_on_a_completed_scheduled_run_is_followed_by_a_prune(d):
    configure(d, declared=(), exclude=("bcm11/scratch", "team"), gpu=("node-1",), prune=True)
    # every process reads the configuration anew: the pull that completes a run may be the one to send the prune
    d.services.stop_all()
    d.start()
    d.services.start_beat(due=("sync",))
    wait_for(lambda: all(LATE not in held(d, node) for node in NODES), 60, "tools/late:1 pruned after beat's run")
    assert all(USED in held(d, node) and OWN in held(d, node) for node in NODES)
    runs = d.history()
    prunes = [run for run in runs if run["trigger"].startswith("prune after run ")]
    assert prunes, [run["trigger"] for run in runs]
    after = prunes[0]["trigger"].removeprefix("prune after run ")
    assert next(run for run in runs if run["id"] == after)["trigger"] == "beat"
