"""One head node for many SSH nodes: a worker whose pool is threads against one prefork worker per node.

``imagesync worker --all-nodes`` (pool: threads) serves every node's queue from
one process: a thread waits on each pull's SSH channel, one SSH connection per
node carries all of that node's pulls, node slots in Redis hold each node to
``max_parallel``. It is measured against the design's default, one
``imagesync worker --node`` per node (prefork, ``max_parallel`` pool
processes), side by side in one run, on a 50-node cluster (``--quick``: 10),
``max_parallel`` 4, the sleeping crictl of orchestration.py (the pulls cost
the machine next to nothing):

* makespan of a fill (every node lacks 8 images: two rounds of 4 pulls of
  5 s), from the trigger to the run's end, n=3 (``--quick``: 1); 400 pulls of
  1 s would measure this machine's 2 cores (the nodes' sshd and shell run on
  them too), not the orchestration;
* the most pulls at once on one node (the nodes' crictl logs);
* PSS per node, summed over every imagesync process (the pull workers' main
  and pool processes; with and without the control worker, one per deployment);
* CPU of imagesync per pull (user + system of those processes over the fills);
* per node: file descriptors, threads, SSH connections and Redis connections
  (sockets of the workers' processes, from /proc), Redis commands per pull
  (INFO ``total_commands_processed`` over the fills);
* for the worker whose pool is threads, its PSS again after each of three runs
  of 5,000 pulls of 0.2 s (every node lacks 100 of the 200 declared images):
  a leak grows by the same from one to the next, where warming up (buffers,
  the Redis connection pool reaching its size) does not.

The worker of threads runs with its default concurrency (one thread per slot
of every node) and with two, whose spare threads hold each node's next pull
ready for the moment a slot frees.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from testcluster.measure import max_concurrency, process_tree

from .common import Deployment, Report, Sample, progress, pull_intervals, remove_workdir, workdir
from .memory import SETTLE, smaps
from .orchestration import _forget_holdings, install_sleep_crictl, set_held

NODES = 50
MAX_PARALLEL = 4
PULL_SECONDS = 5.0
FILL = 8
#: images declared; half of them lacking on every node makes 5,000 pulls (50 x 100)
IMAGES = 200
LEAK_PULL_SECONDS = 0.2
#: (label, how the pull workers are started: None = one prefork worker per node, else
#: the arguments of one `imagesync worker --all-nodes`)
THREADS = ("one worker, threads (default: 1 per slot)", ("--pool", "threads"))
SETUPS = (THREADS,
          ("one prefork worker per node", None),
          ("one worker, threads, 2 per slot", ("--pool", "threads", "--concurrency", str(2 * NODES * MAX_PARALLEL))))


def _cpu(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` (their threads included)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _sockets_to(ports: set[int]) -> dict[str, int]:
    """Socket inode -> remote port, for TCP connections to one of ``ports``."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            port = int(fields[2].rsplit(":", 1)[1], 16)
            if port in ports and fields[3] == "01":  # ESTABLISHED
                found[fields[9]] = port
    return found


def _resources(pids: list[int], redis_port: int, ssh_ports: set[int]) -> dict[str, int]:
    """Descriptors, threads, and connections to Redis and to the nodes' sshd, over ``pids``."""
    sockets = _sockets_to({redis_port, *ssh_ports})
    counts = {"fds": 0, "threads": 0, "redis": 0, "ssh": 0}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        counts["fds"] += len(fds)
        counts["threads"] += int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            port = sockets.get(link[len("socket:["):-1]) if link.startswith("socket:[") else None
            if port is not None:
                counts["redis" if port == redis_port else "ssh"] += 1
    return counts


def _pss(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += smaps(pid)["Pss"]
        except OSError:
            pass
    return total / 1024.0


def _start(d: Deployment, args: tuple[str, ...] | None) -> list[str]:
    d.services.stop_all()
    d.services.start_control(wait=False)
    if args is None:
        names = [f"worker-{n.name}" for n in d.cluster.nodes]
        for n in d.cluster.nodes:
            d.services.start_worker(n.name, wait=False)
    else:
        names = ["shared"]
        d.services.start_shared_worker("shared", "--all-nodes", *args, wait=False)
    for name in ["control", *names]:
        d.services.wait_ready(name, timeout=900)
    time.sleep(SETTLE)
    return names


def _pids(d: Deployment, names: list[str]) -> list[int]:
    return [p for name in names for p in process_tree(d.services.processes[name].pid or 0)]


def _commands(d: Deployment) -> int:
    return int(d.redis.info("stats")["total_commands_processed"])


def _fill(d: Deployment, images: list[str], missing: int) -> tuple[float, int]:
    """One run in which every node lacks ``missing`` images: (makespan, most pulls at once on a node)."""
    for node in d.cluster.nodes:
        set_held(node, images[missing:])
        node.pull_log.write_text("")
    _forget_holdings(d)
    _, makespan = d.sync(timeout=1800)
    per_node: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for node, start, end in pull_intervals(d.cluster.nodes):
        per_node[node].append((start, end))
    assert sum(len(v) for v in per_node.values()) == missing * len(d.cluster.nodes), per_node
    return makespan, max(max_concurrency(v) for v in per_node.values())


def _measure(d: Deployment, images: list[str], names: list[str], repeats: int, leak: bool) -> dict[str, Any]:
    ssh_ports = {n.ssh_port for n in d.cluster.nodes}
    pids, control = _pids(d, names), _pids(d, ["control"])
    figures: dict[str, Any] = {"makespan": [], "peak_per_node": 0, "processes": len(pids)}
    cpu, commands = _cpu(pids + control), _commands(d)
    for _ in range(repeats):
        makespan, peak = _fill(d, images, FILL)
        figures["makespan"].append(makespan)
        figures["peak_per_node"] = max(figures["peak_per_node"], peak)
    pulls = repeats * FILL * len(d.cluster.nodes)
    figures["cpu_per_pull_ms"] = (_cpu(_pids(d, names) + control) - cpu) / pulls * 1000
    figures["redis_commands_per_pull"] = (_commands(d) - commands) / pulls
    time.sleep(SETTLE)
    figures["pss"], figures["control_pss"] = _pss(_pids(d, names)), _pss(control)
    figures.update(_resources(_pids(d, names), d.cluster.redis.port, ssh_ports))
    if leak:
        for node in d.cluster.nodes:
            install_sleep_crictl(node, LEAK_PULL_SECONDS)
        figures["leak"] = []
        for _ in range(3):
            began = time.monotonic()
            _fill(d, images, len(images) // 2)
            took = time.monotonic() - began
            time.sleep(SETTLE)
            figures["leak"].append({"pulls": len(images) // 2 * len(d.cluster.nodes), "seconds": took,
                                    "pss": _pss(_pids(d, names)),
                                    **_resources(_pids(d, names), d.cluster.redis.port, ssh_ports)})
        for node in d.cluster.nodes:
            install_sleep_crictl(node, PULL_SECONDS)
    return figures


def run(report: Report, quick: bool = False) -> None:
    nodes = 10 if quick else NODES
    repeats = 1 if quick else 3
    root = workdir("head")
    results: dict[str, Any] = {}
    try:
        with Deployment(root, nodes=nodes) as d:
            for node in d.cluster.nodes:
                install_sleep_crictl(node, PULL_SECONDS)
            images = [f"{d.cluster.registry_address}/bcm11/bench/head{i:03d}:1" for i in range(IMAGES)]
            d.configure(images=images, max_parallel=MAX_PARALLEL, time_out=120)
            for label, args in SETUPS:
                if quick and label != THREADS[0] and args is not None:
                    continue
                if args is not None and "--concurrency" in args:
                    args = (*args[:-1], str(2 * nodes * MAX_PARALLEL))
                progress(f"headnode: {label}, {nodes} nodes")
                names = _start(d, args)
                results[label] = _measure(d, images, names, repeats, leak=label == THREADS[0] and not quick)
            d.services.stop_all()
    finally:
        remove_workdir(root)
    _show(report, results, nodes)


def _show(report: Report, results: dict[str, Any], nodes: int) -> None:
    report.say(f"{nodes} SSH nodes, max_parallel={MAX_PARALLEL}, fill = {FILL} pulls of {PULL_SECONDS:g} s on every "
               f"node (sleeping crictl); per node = over {nodes}")
    base = results.get("one prefork worker per node")
    for label, r in results.items():
        spans = Sample.of(r["makespan"])
        ratio = f"x{spans.median / Sample.of(base['makespan']).median:.3f}" if base else ""
        per = {k: r[k] / nodes for k in ("pss", "fds", "threads", "redis", "ssh")}
        report.say(f"  {label}: {r['processes']} processes")
        ideal = FILL // MAX_PARALLEL * PULL_SECONDS
        report.say(f"    fill makespan {spans.show('.2f', ' s')} {ratio} (ideal {ideal:g} s); most pulls at once "
                   f"on one node {r['peak_per_node']}")
        report.say(f"    PSS per node {per['pss']:.2f} MiB ({r['pss']:.1f} MiB in all); with the control worker "
                   f"{(r['pss'] + r['control_pss']) / nodes:.2f} MiB")
        report.say(f"    CPU of imagesync per pull {r['cpu_per_pull_ms']:.1f} ms; Redis commands per pull "
                   f"{r['redis_commands_per_pull']:.1f}")
        report.say(f"    per node: {per['fds']:.2f} fds, {per['threads']:.2f} threads, {per['ssh']:.2f} SSH "
                   f"connections, {per['redis']:.2f} Redis connections ({r['redis']} in all)")
        done = FILL * len(r["makespan"]) * nodes
        for after in r.get("leak", []):
            done += after["pulls"]
            report.say(f"    after {done} pulls ({after['pulls']} more of {LEAK_PULL_SECONDS:g} s in "
                       f"{after['seconds']:.0f} s): PSS per node {after['pss'] / nodes:.2f} MiB "
                       f"(x{after['pss'] / r['pss']:.3f}), {after['fds']} fds, {after['threads']} threads, "
                       f"{after['redis']} Redis connections")
    report.figure("results", results)
