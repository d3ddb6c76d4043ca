"""``python -m bench peers``: copies between agent nodes against copies relayed by the head node.

An 8-node test cluster; one image of :data:`SIZE` bytes (:data:`LAYERS` layers of
random bytes) in the registry, which the test proxy sends at :data:`RATE` over all
its connections together. Three runs bring it to every node, none holding it:

* ``registry``: SSH workers on the head node, ``source = "registry"``;
* ``relayed``: the same workers, ``source = "peers-first"``: one node pulls it,
  the others copy it, ``ctr export`` relayed through the workers (today's copies);
* ``agents``: an ``imagesync agent`` per node with ``agent_peer_port`` set,
  ``source = "peers-first"``: the targets' containerd pull from the holders' agents.

For each: the makespan, the bytes the registry served, and the bytes the head
node's imagesync processes (the control worker and, for SSH, the node workers)
sent and received over TCP, from the kernel's per-socket counters.

Then an update: a new tag of a 5-layer image that shares its first 4 layers with
the tag the nodes hold. The bytes that bring it to a node: relayed
(``imagesync.transfer.copy``, what it streams) against an agent's pull (what the
holders' agents served, per node).
"""

from __future__ import annotations

from typing import Any

from .common import Deployment, Report, progress, remove_workdir, verdict, workdir

NODES = 8
SIZE = 100 * 1000 * 1000
LAYERS = 5
#: the registry's bandwidth, all connections together (bytes per second)
RATE = 10 * 1000 * 1000
UPDATE_LAYER = 10 * 1000 * 1000


def _forget(d: Deployment, ref: str) -> None:
    for node in d.cluster.nodes:
        if ref in node.images():
            node.remove(ref)


def _head_pids(d: Deployment) -> list[int]:
    """The head node's imagesync processes: the control worker and the SSH node workers (not the agents)."""
    return [process.pid for name, process in d.services.processes.items()
            if process.pid is not None and not name.startswith("agent-")]


def _served(d: Deployment) -> int:
    """Bytes of blobs every agent's server has served so far (its log lines)."""
    import re

    pattern = re.compile(r"served sha256:[0-9a-f]{64} to \S+: (\d+) bytes")
    total = 0
    for node in d.cluster.nodes:
        log = d.services.workdir / f"agent-{node.name}.log"
        if log.exists():
            total += sum(int(size) for size in pattern.findall(log.read_text()))
    return total


def _spread(d: Deployment, ref: str, size: int) -> dict[str, Any]:
    from testcluster.measure import SocketBytes

    d.cluster.proxy.throttle(RATE)
    before, served = d.cluster.proxy.bytes_sent, _served(d)
    with SocketBytes(_head_pids(d)) as head:
        run, makespan = d.sync(timeout=1800)
    d.cluster.proxy.throttle(None)
    for node in d.cluster.nodes:
        if ref not in node.images():
            raise RuntimeError(f"{ref} not on {node.name} after the run")
    counts = dict(run.counts)
    copies = counts.get("copied", 0)
    return {"makespan": makespan, "registry": d.cluster.proxy.bytes_sent - before, "head": head.total,
            "served": _served(d) - served, "counts": counts, "copies": copies}


def _start_agents(d: Deployment) -> None:
    d.services.start_control(wait=False)
    for node in d.cluster.nodes:
        d.services.start_agent(node.name, {**node.environment, "NODE_NAME": node.name},
                               "--endpoint", f"unix://{node.socket}", wait=False)
    for name in ["control", *(f"agent-{node.name}" for node in d.cluster.nodes)]:
        d.services.wait_ready(name)
    _wait_registered(d)


def _wait_registered(d: Deployment) -> None:
    import time

    from imagesync import keys

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(d.redis.hget(keys.agent(node.name), "peer") for node in d.cluster.nodes):
            return
        time.sleep(0.2)
    raise RuntimeError("not every agent registered its server")


def _relayed_update(d: Deployment, old: str, new: str) -> int:
    """Bytes ``imagesync.transfer.copy`` streams to bring ``new`` to a node that holds ``old``."""
    from imagesync.config import load_settings
    from imagesync.transfer import copy

    d.cluster.node("node-1").pull(new)
    d.cluster.node("node-2").pull(old)
    settings = load_settings(d.config_path)
    copied = copy(settings, settings.node("node-1"), settings.node("node-2"), new, d.cluster.digests[new],
                  "linux/amd64", 600)
    if not copied.ok:
        raise RuntimeError(f"copy failed: {copied.reason}")
    _forget(d, new)
    _forget(d, old)
    return copied.size


def run(report: Report, quick: bool = False) -> None:
    size = SIZE * 2 // 5 if quick else SIZE
    root = workdir("peers")
    try:
        with Deployment(root, nodes=NODES) as d:
            progress(f"peers: pushing a {size / 1e6:.0f} MB image and a 5-layer update")
            ref = d.cluster.push("bcm11/big", "1", size=size, layers=LAYERS)
            old = d.cluster.push("bcm11/framework", "1", size=5 * UPDATE_LAYER, layers=5,
                                 layer_seeds=["framework"] * 4 + ["old"])
            new = d.cluster.push("bcm11/framework", "2", size=5 * UPDATE_LAYER, layers=5,
                                 layer_seeds=["framework"] * 4 + ["new"])
            results = {}
            for name, source in (("registry", "registry"), ("relayed", "peers-first")):
                progress(f"peers: {name}, registry at {RATE / 1e6:.0f} MB/s")
                d.services.stop_all()
                d.configure(source=source, images=[ref], time_out=1200, max_parallel=2, retries=0)
                d.start_workers()
                _forget(d, ref)
                results[name] = _spread(d, ref, size)
            relayed_update = _relayed_update(d, old, new)

            progress("peers: agents serving their nodes' images")
            d.services.stop_all()
            d.configure(nodes=[], agents=True, agent_heartbeat=1.0, agent_lapse=30.0, source="peers-first",
                        images=[ref], time_out=1200, max_parallel=2, retries=0,
                        agent_peer_port=0, agent_peer_address="127.0.0.1")
            _forget(d, ref)
            _start_agents(d)
            results["agents"] = _spread(d, ref, size)

            for name, r in results.items():
                per_copy = r["head"] / r["copies"] if r["copies"] else 0
                report.say(f"{name:8}: makespan {r['makespan']:.1f} s; registry served {r['registry'] / 1e6:.0f} MB "
                           f"({r['registry'] / size:.2f} images); head node sent+received {r['head'] / 1e6:.1f} MB"
                           f" = {per_copy / size:.2f} images per copy; agents served {r['served'] / 1e6:.0f} MB; "
                           f"outcomes {r['counts']}")
                report.figure(f"peers_{name}_makespan_s", round(r["makespan"], 2))
                report.figure(f"peers_{name}_head_bytes", r["head"])
                report.figure(f"peers_{name}_registry_bytes", r["registry"])
            agents, relayed, registry = results["agents"], results["relayed"], results["registry"]
            report.say(f"makespan agents / registry: {agents['makespan'] / registry['makespan']:.2f}; "
                       f"agents / relayed: {agents['makespan'] / relayed['makespan']:.2f}")
            head_share = agents["head"] / agents["copies"] / size if agents["copies"] else 1.0
            report.say(f"head node per agent copy: {head_share:.4f} images (goal 0: "
                       f"{verdict(head_share < 0.01)}); relayed: "
                       f"{relayed['head'] / max(1, relayed['copies']) / size:.2f} images")

            progress("peers: an update whose node holds 4 of its 5 layers")
            for node in d.cluster.nodes:
                node.pull(old)
            d.cluster.node("node-1").pull(new)  # under the prefix bcm11: the run spreads it
            served = _served(d)
            run, _ = d.sync(timeout=600)
            per_node = (_served(d) - served) / max(1, dict(run.counts).get("copied", 0))
            report.say(f"update of a {5 * UPDATE_LAYER / 1e6:.0f} MB image whose node holds 4 of 5 layers "
                       f"({UPDATE_LAYER / 1e6:.0f} MB each): relayed {relayed_update / 1e6:.1f} MB, "
                       f"from an agent {per_node / 1e6:.2f} MB per node (goal about one layer: "
                       f"{verdict(per_node < 1.1 * UPDATE_LAYER)}); outcomes {dict(run.counts)}")
            report.figure("peers_update_relayed_bytes", relayed_update)
            report.figure("peers_update_agent_bytes_per_node", round(per_node))
    finally:
        remove_workdir(root)
