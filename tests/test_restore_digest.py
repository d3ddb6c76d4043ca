"""A restore from the backup checks the digest the cluster runs, whoever holds it.

Two nodes: node-1 is served by its agent (it holds the image, but agent nodes take no
part in node-to-node copies), node-2 over SSH. Upstream lost the image and the backup
holds another digest under its name: node-2's restore must refuse it, although no holder
could export the image to it.
"""

from __future__ import annotations

import json

import pytest
from conftest import Deployment
from helpers import started_run

from imagesync.outcomes import FAILED
from testcluster.cluster import Cluster
from testcluster.registry import Registry

pytestmark = pytest.mark.cluster


def test_a_restore_refuses_a_stale_backup_when_only_an_agent_holds_the_image(tmp_path):
    with Cluster(tmp_path / "cluster", nodes=2) as cluster, Registry(tmp_path / "backup-registry") as registry:
        ref = cluster.seed({"node-1": ["bcm11/app:1"]})["node-1"][0]
        agent = cluster.node("node-1")
        agent.stop_sshd()  # the agent's node: no SSH
        d = Deployment(cluster, tmp_path)
        d.configure(nodes=["node-2"], agents=True, backup={
            "registry": f"{registry.address}/bk", "insecure": True, "insecure_sources": [cluster.registry_address]})
        # the backup's name for the image holds another digest than node-1 runs; upstream lost it
        stale = registry.push_image(f"bk/{cluster.registry_address.replace(':', '_')}/bcm11/app", "1", size=2048)
        cluster.registry.delete_image("bcm11/app", "1")
        with d.services:
            d.services.start_control(wait=False)
            d.services.start_worker("node-2", wait=False)
            d.services.start_agent("node-1", {**agent.environment, "NODE_NAME": "node-1"},
                                   "--endpoint", f"unix://{agent.socket}", wait=False)
            for name in ("control", "worker-node-2", "agent-node-1"):
                d.services.wait_ready(name)
            plan = d.cli("plan", "--json", "--node", "node-2")
            assert plan.returncode == 0, plan.stderr
            route = json.loads(plan.stdout)["routes"]["node-2"][ref]
            assert (route["sources"], route["digest"]) == (["registry", "backup"], cluster.digests[ref])
            run_id = started_run(d.cli("sync", "--node", "node-2", "--wait"))
            outcome = next(r for r in d.history(run_id)["results"] if r["image"] == ref)
            assert outcome["status"] == FAILED, outcome
            assert (f"the backup holds {stale}, not the digest the cluster runs ({cluster.digests[ref]})"
                    in outcome["reason"]), outcome
            assert ref not in cluster.node("node-2").images()
