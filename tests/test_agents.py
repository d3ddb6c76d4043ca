"""Agent mode on the real cluster, without Kubernetes and without sshd for the agents.

One cluster for the module: node-1, node-2 and node-3 are served by ``imagesync
agent`` processes started here, each in its node's environment (its own
containerd socket, the test crictl on PATH), as a DaemonSet pod would be on
its node; node-4 is an SSH node of the configuration (a mixed fleet). Every
assertion on images asks the nodes' containerd directly. Each test starts with
the three agents serving (one a test killed is started again) and pushes
images of its own.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from imagesync import keys
from tests.conftest import Deployment
from tests.helpers import measured, wait_for

pytestmark = pytest.mark.cluster

AGENTS = ("node-1", "node-2", "node-3")
SSH_NODE = "node-4"
# a lapse far longer than a heartbeat: a busy machine never makes a live agent lapse;
# a test that needs a lapse moves the agent's last heartbeat back instead of waiting
HEARTBEAT, LAPSE, INVENTORY_TIMEOUT, FORGET = 0.5, 30.0, 5.0, 3600


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    from testcluster.cluster import Cluster

    workdir = tmp_path_factory.mktemp("agents")
    with Cluster(workdir / "cluster", nodes=4) as cluster:
        for name in AGENTS:
            cluster.node(name).stop_sshd()  # no SSH to an agent's node, ever
        deployment = Deployment(cluster, workdir)
        deployment.configure(nodes=[SSH_NODE], agents=True, agent_heartbeat=HEARTBEAT, agent_lapse=LAPSE,
                             agent_inventory_timeout=INVENTORY_TIMEOUT, agent_forget=FORGET)
        with deployment.services:
            deployment.services.start_control(wait=False)
            deployment.services.start_worker(SSH_NODE, wait=False)
            for name in AGENTS:
                start_agent(deployment, name, wait=False)
            for name in ["control", f"worker-{SSH_NODE}", *(f"agent-{name}" for name in AGENTS)]:
                deployment.services.wait_ready(name)
            yield deployment


@pytest.fixture(autouse=True)
def every_agent_serving(d):
    """The three agents running and heard from, whatever an earlier test did to them."""
    for name in AGENTS:
        process = d.services.processes.get(f"agent-{name}")
        if process is None or not process.running:
            start_agent(d, name)
    wait_for(lambda: all(alive(d, name) for name in AGENTS), 30, "every agent alive")


def start_agent(d, name: str, wait: bool = True):
    node = d.cluster.node(name)
    # NODE_NAME, as the downward API sets it; the endpoint as a flag, the rest from the node's environment
    environment = {**node.environment, "NODE_NAME": name}
    return d.services.start_agent(name, environment, "--endpoint", f"unix://{node.socket}", wait=wait)


def kill_agent(d, name: str) -> None:
    process = d.services.processes.pop(f"agent-{name}")
    os.killpg(process.pid, signal.SIGKILL)  # the pod and its pool, at once
    process.kill()


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


def unique(name: str) -> str:
    """An image name of this test alone, e.g. ``bcm11/after-3f9a1c:1``."""
    repo, tag = name.split(":")
    return f"{repo}-{uuid.uuid4().hex[:6]}:{tag}"


def sync(d) -> dict:
    result = d.cli("sync", "--wait", env={"COLUMNS": "1000"})
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = next(line.split()[1].rstrip(":") for line in result.stdout.splitlines()
                  if line.startswith("run ") and (" started" in line or "every node already holds" in line))
    return d.history(run_id)


def pulls_of(run: dict, refs) -> dict[tuple[str, str], str]:
    """(node, image) -> status, for the images of this test."""
    return {(r["node"], r["image"]): r["status"] for r in run["results"] if r["image"] in refs}


def test_three_agents_register_with_their_node_facts(d):
    # a record Redis lost (or forgot) is announced again at the next heartbeat, with the node's facts now
    with d.cluster.redis.client() as client:
        client.delete(*(keys.agent(name) for name in AGENTS))
    records = wait_for(lambda: (found := registered(d)) and all(found.get(name) for name in AGENTS) and found,
                       20, "3 agents registered again")
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
    names = {"node-1": unique("bcm11/a:1"), "node-2": unique("nvidia/b:1"), SSH_NODE: unique("bcm11/ssh:1")}
    seeded = d.cluster.seed({node: [name] for node, name in names.items()})
    refs = {ref for node_refs in seeded.values() for ref in node_refs}
    run = sync(d)
    assert run["status"] == "completed", run
    assert not run["skipped"]
    # 3 images, each on one node: node-3 lacks all three, the others two each
    assert pulls_of(run, refs) == {(node, ref): "pulled" for node in (*AGENTS, SSH_NODE)
                                   for ref in refs if ref not in seeded.get(node, [])}
    for name in (*AGENTS, SSH_NODE):
        assert refs <= set(d.held(name)), name
    # the agents ran the pulls on their own node (their sshd is not even running)
    for name in AGENTS:
        assert "imagesync.pull" in d.services.log(f"agent-{name}")
    status = d.cli("status", env={"COLUMNS": "1000"})
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(", agent") == 3 and status.stdout.count(", ssh") == 1, status.stdout
    # README: `status --json` has "via" in each node's facts
    status = d.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    facts = json.loads(status.stdout)["facts"]
    assert {node: facts[node]["via"] for node in facts} == {**{name: "agent" for name in AGENTS}, SSH_NODE: "ssh"}


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
    assert set(run["skipped"]) == {"node-2"}
    assert took >= INVENTORY_TIMEOUT  # it waited for the deadline, not for ever


def test_a_killed_agent_lapses_is_skipped_then_forgotten_and_rejoins_once_restarted(d):
    kill_agent(d, "node-3")
    with d.cluster.redis.client() as client:
        assert 0 < client.ttl(keys.agent("node-3")) <= FORGET  # forgotten agent_forget after its last heartbeat
        # its last heartbeat moved back past agent_lapse, as if the lapse had been waited for
        last_seen = server_now(d) - LAPSE - 1
        client.zadd(keys.AGENTS, {"node-3": last_seen})
        client.hset(keys.agent("node-3"), "last_seen", repr(last_seen))
    assert not alive(d, "node-3")
    [after] = d.cluster.seed({"node-1": [unique("bcm11/after:1")]})["node-1"]
    run = sync(d)
    reason = run["skipped"]["node-3"]
    assert "heartbeat lapsed: last seen 20" in reason, reason
    assert pulls_of(run, {after}) == {("node-2", after): "pulled", (SSH_NODE, after): "pulled"}
    assert after in d.held("node-2") and after in d.held(SSH_NODE)
    assert after not in d.held("node-3")

    # agent_forget later its record is gone (its TTL cut short here): no longer reported as skipped
    with d.cluster.redis.client() as client:
        client.pexpire(keys.agent("node-3"), 1)
    wait_for(lambda: "node-3" not in registered(d) or not registered(d)["node-3"], 10, "node-3 forgotten")
    plan = d.cli("plan", "--json")
    assert plan.returncode == 0, plan.stderr
    assert "node-3" not in json.loads(plan.stdout)["skipped"]
    assert "node-3" not in json.loads(plan.stdout)["nodes"]
    assert "node-3" not in registered(d)  # the forgotten name left the set of agents too

    start_agent(d, "node-3")
    wait_for(lambda: alive(d, "node-3"), 20, "node-3 registered again")
    run = sync(d)
    assert not run["skipped"], run["skipped"]
    assert pulls_of(run, {after}) == {("node-3", after): "pulled"}
    assert after in d.held("node-3")


def test_an_agent_node_is_never_a_source_or_a_target_of_a_copy(d):
    # README: node-to-node copies need a worker that opens commands on two
    # nodes; an agent node is never a source or a target of a copy, and plan says so
    [on_agent] = d.cluster.seed({"node-1": [unique("bcm11/peer-a:1")]})["node-1"]
    [on_ssh] = d.cluster.seed({SSH_NODE: [unique("bcm11/peer-s:1")]})[SSH_NODE]
    result = d.cli("plan", "--json", env={"IMAGESYNC_SOURCE": "peers-first", "IMAGESYNC_TRANSFER": "true"})
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    routes = plan["routes"]
    # node-4 lacks the image only an agent holds; the agents lack the one only node-4 holds
    assert routes[SSH_NODE][on_agent]["sources"][0] == "registry"
    assert "peers" not in routes[SSH_NODE][on_agent]
    for name in ("node-2", "node-3"):
        for ref in (on_agent, on_ssh):
            assert routes[name][ref]["sources"][0] == "registry" and "peers" not in routes[name][ref], routes[name]
    assert "peers" not in routes["node-1"][on_ssh]
    assert all(route.get("seed") in (None, SSH_NODE) for images in routes.values() for route in images.values())
    assert ("no node-to-node copies to or from node-1, node-2, node-3: their agents serve no copies "
            "(set agent_peer_port)") in plan["notes"]
