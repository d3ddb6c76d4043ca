"""peers-first in a mixed-architecture cluster: one seed per platform, on the real cluster.

Three ctr nodes; node-3 is configured as ``platform = "linux/arm64"``, so its pulls take
the arm64 manifest of an index (``ctr images pull --platform``) and it can copy only from
a node of its platform. A new multi-platform image no node holds is then fetched from the
registry by one amd64 node and by node-3 at once; the other amd64 node copies it.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import Deployment
from helpers import finish, start_cli, started_run, wait_for

from imagesync.outcomes import COPIED, PULLED
from testcluster.cluster import Cluster
from testcluster.image import write_oci_index

pytestmark = pytest.mark.cluster

IMAGE = "bcm11/both:1"


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seeds")
    with Cluster(workdir / "cluster", nodes=3, runtime="ctr") as cluster:
        deployment = Deployment(cluster, workdir)
        with deployment.services:
            layout = workdir / "both"
            deployment.digest = write_oci_index(layout, "bcm11/both", "1", ["linux/amd64", "linux/arm64"])
            subprocess.run(["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:1",
                            f"docker://{cluster.registry.address}/{IMAGE}"], check=True, capture_output=True,
                           timeout=60)
            # a long time_out: a node that waits for a seed of another platform waits for minutes
            deployment.configure(runtime="ctr", source="peers-first", images=[cluster.ref(IMAGE)], time_out=600,
                                 nodes_extra={"node-3": {"platform": "linux/arm64"}})
            deployment.start()
            yield deployment


def test_each_platform_gets_its_own_seed_and_neither_waits_for_the_other(d):
    image = d.cluster.ref(IMAGE)
    plan = d.cli("plan", "--json")
    assert plan.returncode == 0, plan.stderr
    routes = {node: by_image[image] for node, by_image in json.loads(plan.stdout)["routes"].items()}
    assert routes["node-3"]["sources"][0] == "registry" and "seed" not in routes["node-3"]
    amd_seeds = [node for node in ("node-1", "node-2") if routes[node]["sources"][0] == "registry"]
    assert len(amd_seeds) == 1
    waiting = ({"node-1", "node-2"} - set(amd_seeds)).pop()
    assert routes[waiting]["seed"] == amd_seeds[0]

    # the registry holds every download: both seeds are downloading at once, neither waits
    d.cluster.proxy.hold(match="/bcm11/both/")
    process = start_cli(d, "sync", "--wait")
    try:
        wait_for(lambda: d.cluster.proxy.held >= 2, 60, "the amd64 seed and the arm64 node downloading at once")
    finally:
        d.cluster.proxy.release()
    result = finish(process)
    assert result.returncode == 0, result.stdout + result.stderr
    outcomes = {r["node"]: r for r in d.history(started_run(result))["results"]}
    assert outcomes["node-3"]["status"] == PULLED and outcomes[amd_seeds[0]]["status"] == PULLED
    assert (outcomes[waiting]["status"], outcomes[waiting]["source"]) == (COPIED, amd_seeds[0])
    for node in ("node-1", "node-2", "node-3"):
        assert d.cluster.node(node).images()[image] == d.digest
