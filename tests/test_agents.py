"""Agent mode on the real cluster, without Kubernetes and without sshd for the agents.

One cluster for the module: node-1, node-2 and node-3 are served by ``imagesync
agent`` processes started here, each in its node's environment (its own
containerd socket, the test crictl on PATH), as a DaemonSet pod would be on
its node; node-4 is an SSH node of the configuration (a mixed fleet). Every
assertion on images asks the nodes' containerd directly.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from imagesync import keys
from tests.conftest import Deployment
from tests.helpers import measured, wait_for

pytestmark = pytest.mark.cluster

AGENTS = ("node-1", "node-2", "node-3")
SSH_NODE = "node-4"
HEARTBEAT, LAPSE, INVENTORY_TIMEOUT = 0.5, 2.0, 5.0


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    from testcluster.cluster import Cluster

    workdir = tmp_path_factory.mktemp("agents")
    with Cluster(workdir / "cluster", nodes=4) as cluster:
        cluster.seed({"node-1": ["bcm11/a:1"], "node-2": ["nvidia/b:1"], "node-3": [], SSH_NODE: ["bcm11/ssh:1"]})
        for name in AGENTS:
            cluster.node(name).stop_sshd()  # no SSH to an agent's node, ever
        deployment = Deployment(cluster, workdir)
        deployment.configure(nodes=[SSH_NODE], agents=True, agent_heartbeat=HEARTBEAT, agent_lapse=LAPSE,
                             agent_inventory_timeout=INVENTORY_TIMEOUT)
        with deployment.services:
            deployment.services.start_control(wait=False)
            deployment.services.start_worker(SSH_NODE, wait=False)
            for name in AGENTS:
                start_agent(deployment, name, wait=False)
            for name in ["control", f"worker-{SSH_NODE}", *(f"agent-{name}" for name in AGENTS)]:
                deployment.services.wait_ready(name)
            yield deployment


def start_agent(d, name: str, wait: bool = True):
    node = d.cluster.node(name)
    # NODE_NAME, as the downward API sets it; the endpoint as a flag, the rest from the node's environment
    environment = {**node.environment, "NODE_NAME": name}
    return d.services.start_agent(name, environment, "--endpoint", f"unix://{node.socket}", wait=wait)


def registered(d) -> dict[str, dict[str, str]]:
    with d.cluster.redis.client() as client:
        names = [name.decode() for name in client.zrange(keys.AGENTS, 0, -1)]
        return {name: {k.decode(): v.decode() for k, v in client.hgetall(keys.agent(name)).items()}
                for name in names}


def server_now(d) -> float:
    with d.cluster.redis.client() as client:
        seconds, micros = client.time()
    return seconds + micros / 1e6


def alive(d, name: str) -> bool:
    record = registered(d).get(name)
    return bool(record) and server_now(d) - float(record["last_seen"]) < LAPSE


def sync(d) -> dict:
    result = d.cli("sync", "--wait", env={"COLUMNS": "1000"})
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = next(line.split()[1].rstrip(":") for line in result.stdout.splitlines()
                  if line.startswith("run ") and (" started" in line or "every node already holds" in line))
    return d.history(run_id)


def test_three_agents_register_with_their_node_facts(d):
    records = wait_for(lambda: (found := registered(d)) and set(found) == set(AGENTS) and found,
                       20, "3 agents registered")
    for name in AGENTS:
        record = records[name]
        assert json.loads(record["node"])["transport"] == "local"
        assert record["runtime"] == "crictl"
        assert record["platform"].startswith("linux/")
        assert record["containerd"], record
        assert int(record["images"]) == len(set(d.cluster.node(name).images().values()))  # one per image
    assert all(alive(d, name) for name in AGENTS)
    # check shows which node is which: the SSH node and the three agents
    check = d.cli("check", env={"COLUMNS": "1000"})
    assert check.returncode == 0, check.stdout + check.stderr
    rows = {line.split("│")[1].strip(): line for line in check.stdout.splitlines() if line.count("│") > 5}
    assert " ssh " in rows[SSH_NODE]
    for name in AGENTS:
        assert " agent " in rows[name] and "heartbeat" in rows[name], rows


def test_a_sync_converges_the_agents_and_the_ssh_node(d):
    run = sync(d)
    assert run["status"] == "completed", run
    assert not run["skipped"]
    # 3 images, each on one node: node-3 lacks all three, the others two each
    assert run["counts"] == {"pulled": 9}, run["counts"]
    wanted = {d.cluster.ref(image) for image in ("bcm11/a:1", "nvidia/b:1", "bcm11/ssh:1")}
    for name in (*AGENTS, SSH_NODE):
        assert set(d.held(name)) == wanted, name
    # the agents ran the pulls on their own node (their sshd is not even running)
    for name in AGENTS:
        assert "imagesync.pull" in d.services.log(f"agent-{name}")
    status = d.cli("status", env={"COLUMNS": "1000"})
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(", agent") == 3 and status.stdout.count(", ssh") == 1, status.stdout


def test_a_silent_agent_is_skipped_when_the_deadline_passes(d):
    # node-2's pool processes stopped: its heartbeat goes on (the main process), its inventory never answers
    pid = d.services.processes["agent-node-2"].pid
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for child in children:
        os.kill(child, signal.SIGSTOP)
    try:
        began = time.monotonic()
        run = sync(d)
        took = time.monotonic() - began
    finally:
        for child in children:
            os.kill(child, signal.SIGCONT)
    measured("sync with one silent agent (agent_inventory_timeout 5 s)", f"{took:.1f} s")
    assert "did not answer within 5 s" in run["skipped"]["node-2"], run["skipped"]
    assert took < INVENTORY_TIMEOUT + 20


def test_a_killed_agent_lapses_and_is_skipped_with_the_time_it_was_last_seen(d):
    process = d.services.processes.pop("agent-node-3")
    os.killpg(process.pid, signal.SIGKILL)  # the pod and its pool, at once
    process.kill()
    wait_for(lambda: not alive(d, "node-3"), LAPSE + 10, "node-3's heartbeat lapsed")
    d.cluster.seed({"node-1": ["bcm11/after:1"]})
    run = sync(d)
    reason = run["skipped"]["node-3"]
    assert "heartbeat lapsed: last seen 20" in reason, reason
    assert run["counts"] == {"pulled": 2}, run["counts"]  # node-2 and node-4
    after = d.cluster.ref("bcm11/after:1")
    assert after in d.held("node-2") and after in d.held(SSH_NODE)
    assert after not in d.held("node-3")


def test_a_restarted_agent_rejoins_and_is_synced(d):
    start_agent(d, "node-3")
    wait_for(lambda: alive(d, "node-3"), 20, "node-3 registered again")
    run = sync(d)
    assert not run["skipped"], run["skipped"]
    assert run["counts"] == {"pulled": 1}, run["counts"]
    assert d.cluster.ref("bcm11/after:1") in d.held("node-3")
    assert d.held("node-3") == d.held("node-1") == d.held(SSH_NODE)
