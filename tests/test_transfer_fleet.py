"""Node-to-node copies in a mixed fleet on the real cluster: node-1 is served by an
``imagesync agent`` (no sshd on it), node-2 and node-3 are SSH nodes of the
configuration. An agent's node can serve no copy: its pull of an image makes it
no holder for the others. Every assertion on images asks the nodes' containerd.
"""

from __future__ import annotations

import pytest
from helpers import started_run, wait_for, wait_for_run_end

from imagesync import keys
from imagesync.runs import pull_key

pytestmark = pytest.mark.cluster

AGENT, SEED, TARGET = "node-1", "node-2", "node-3"
#: long enough that the target still waits for its seed when the seed's worker starts
TIME_OUT = 60


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    from conftest import Deployment

    from testcluster.cluster import Cluster

    workdir = tmp_path_factory.mktemp("fleet")
    with Cluster(workdir / "cluster", nodes=3) as cluster:
        cluster.node(AGENT).stop_sshd()  # no SSH to an agent's node, ever
        deployment = Deployment(cluster, workdir)
        with deployment.services:
            yield deployment


def start_agent(d, name: str) -> None:
    node = d.cluster.node(name)
    environment = {**node.environment, "NODE_NAME": name}
    d.services.start_agent(name, environment, "--endpoint", f"unix://{node.socket}")

    def registered() -> bool:
        with d.cluster.redis.client() as client:
            return client.zscore(keys.AGENTS, name) is not None

    wait_for(registered, 30, f"agent {name} registered")


def reported(d, run_id: str, node: str, image: str) -> bool:
    with d.cluster.redis.client() as client:
        return bool(client.hexists(keys.run_results(run_id), pull_key(node, image)))


def test_an_agent_that_pulled_the_image_is_no_holder_for_the_ssh_nodes(d):
    ref = d.cluster.push("bcm11/fleet", "1")
    d.configure(nodes=[SEED, TARGET], agents=True, agent_heartbeat=0.5, agent_lapse=30.0,
                agent_inventory_timeout=5.0, source="peers-first", images=[ref], time_out=TIME_OUT, retries=0)
    # the seed's worker is not running yet: its pull waits in its queue
    d.services.start_control()
    d.services.start_worker(TARGET)
    start_agent(d, AGENT)
    run_id = started_run(d.cli("sync"))
    # the agent pulls the image from the registry while the target waits for its seed
    wait_for(lambda: reported(d, run_id, AGENT, ref), 60, "the agent's pull reported")
    d.services.start_worker(SEED)
    run = wait_for_run_end(d, run_id, 2 * TIME_OUT)
    results = {r["node"]: r for r in run["results"] if r["image"] == ref}
    assert results[AGENT]["status"] == "pulled", results
    assert results[SEED]["status"] == "pulled", results
    # the target copied from the seed, the one SSH node that holds it, and never tried the agent
    assert (results[TARGET]["status"], results[TARGET].get("source")) == ("copied", SEED), results[TARGET]
    for node in (AGENT, SEED, TARGET):
        assert d.held(node).get(ref) == d.cluster.digests[ref], node
