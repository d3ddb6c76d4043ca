"""``python -m bench transfer``: one image onto 4 nodes through a slow registry, and the copy path alone.

A 4-node test cluster; one image of about 200 MB (4 layers of random bytes)
in the registry, which the test proxy sends at a fixed total bandwidth
(:data:`RATE`, standing in for a registry behind a WAN link). The image is
declared, no node holds it, and a run brings it everywhere:

* ``source = "registry"``: every node pulls it from the registry;
* ``source = "peers-first"``: one node pulls it, the others copy it node to
  node (each node serving one copy at a time).

For each: the makespan (trigger to the run record's end) and the bytes the
registry served (counted by the proxy).

Then the copy path alone, node-1 to node-2, with the registry out of it:
``imagesync.transfer.copy`` (``ctr export`` over one SSH channel, through
this process, ``ctr import`` over another) against a direct
``ssh node-1 ctr export | ssh node-2 ctr import`` pipe, taking turns; MB/s
and the CPU seconds the middle spends (this process, or the two ``ssh``
clients).

``python -m bench peerssh`` (:func:`run_peer_ssh`): copies the nodes run
themselves over their own SSH (``peer_ssh = true``), on an 8-node cluster whose
nodes trust each other. First the bytes through the head node per copy, node-1
to node-2, relayed by ``imagesync.transfer.copy`` against run by node-2 itself,
as the kernel counts them on this process's TCP connections. Then one image
onto 8 nodes through the throttled registry, side by side in one run:
registry-only, peers-first relayed, peers-first with ``peer_ssh``; the makespan,
the registry's bytes, and the bytes the workers' connections carried.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time

from testcluster.measure import process_tree, tcp_bytes

from .common import Deployment, Report, Sample, cpu_seconds_used, progress, remove_workdir, verdict, workdir

NODES = 4
SIZE = 200 * 1000 * 1000
LAYERS = 4
#: the registry's bandwidth, all connections together (bytes per second)
RATE = 10 * 1000 * 1000


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _spread(d: Deployment, ref: str, source: str, size: int, peer_ssh: bool = False) -> dict[str, float]:
    """One run that brings ``ref`` to every node under ``source``; its makespan, the registry's
    bytes, and the bytes the workers' TCP connections carried (``workers``)."""
    d.services.stop_all()
    d.configure(source=source, images=[ref], time_out=1200, max_parallel=2, retries=0, peer_ssh=peer_ssh)
    d.start_workers()
    d.cluster.proxy.throttle(RATE)
    before = d.cluster.proxy.bytes_sent
    pids = {pid for p in d.services.processes.values() if p.running and p.pid for pid in process_tree(p.pid)}
    carried = tcp_bytes(pids)
    run, makespan = d.sync(timeout=1800)
    after = tcp_bytes(pids)
    workers = sum(count - carried.get(connection, 0) for connection, count in after.items())
    served = d.cluster.proxy.bytes_sent - before
    d.cluster.proxy.throttle(None)
    counts = dict(run.counts)
    for node in d.cluster.nodes:
        if ref not in node.images():
            raise RuntimeError(f"{ref} not on {node.name} after the {source} run")
    return {"makespan": makespan, "served": served, "copies": served / size, "counts": counts,  # type: ignore[dict-item]
            "workers": workers}


def _forget(d: Deployment, ref: str, nodes: list[str]) -> None:
    """Take ``ref`` off ``nodes``, as containerd and its CRI (what a run's inventory asks) both see
    it, and what imagesync remembers they held: an image a node lost twice in a row counts as
    evicted by the kubelet, and is not pulled again until the node has more room."""
    from imagesync import keys

    d.redis.delete(*(key for name in nodes for key in (keys.node_held(name), keys.node_evictions(name))))
    for name in nodes:
        node = d.cluster.node(name)
        if ref in node.images():
            node.remove(ref)
        deadline = time.monotonic() + 30
        while _cri_holds(node, ref) or ref in node.images():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ref} is still on {name} after its removal")
            node.remove(ref)
            time.sleep(0.2)


def _cri_holds(node, ref: str) -> bool:  # type: ignore[no-untyped-def]
    with node.image_client() as client:
        return any(ref in image.repo_tags for image in client.list())


def _through_imagesync(d: Deployment, ref: str, digest: str) -> tuple[float, float]:
    from imagesync.config import load_settings
    from imagesync.transfer import copy

    settings = load_settings(d.config_path)
    cpu, began = os.times(), time.monotonic()
    copied = copy(settings, settings.node("node-1"), settings.node("node-2"), ref, digest, "linux/amd64", 600)
    took = time.monotonic() - began
    after = os.times()
    if not copied.ok:
        raise RuntimeError(f"copy failed: {copied.reason}")
    return took, (after.user + after.system) - (cpu.user + cpu.system)


def _direct_pipe(d: Deployment, ref: str) -> tuple[float, float]:
    one, two = d.cluster.node("node-1"), d.cluster.node("node-2")
    export = one.ssh_argv(f"ctr -n k8s.io images export --platform linux/amd64 - {shlex.quote(ref)}",
                          d.cluster.known_hosts)
    imported = two.ssh_argv("ctr -n k8s.io images import --platform linux/amd64 -", d.cluster.known_hosts)
    cpu, began = _children_cpu(), time.monotonic()
    subprocess.run(f"set -o pipefail; {shlex.join(export)} | {shlex.join(imported)}", shell=True,
                   executable="/bin/bash", check=True, capture_output=True, timeout=600)
    return time.monotonic() - began, _children_cpu() - cpu


def run(report: Report, quick: bool = False) -> None:
    size = SIZE // 4 if quick else SIZE
    root = workdir("transfer")
    try:
        with Deployment(root, nodes=NODES) as d:
            progress(f"transfer: pushing a {size / 1e6:.0f} MB image")
            ref = d.cluster.push("bcm11/big", "1", size=size, layers=LAYERS)
            digest = d.cluster.digests[ref]
            names = [node.name for node in d.cluster.nodes]
            results = {}
            for source in ("registry", "peers-first"):
                progress(f"transfer: source = {source}, registry at {RATE / 1e6:.0f} MB/s")
                _forget(d, ref, names)
                results[source] = _spread(d, ref, source, size)
                r = results[source]
                report.say(f"source = {source}: makespan {r['makespan']:.1f} s; registry served "
                           f"{r['served'] / 1e6:.0f} MB = {r['copies']:.2f} copies; outcomes {r['counts']}")
                report.figure(f"transfer_{source}_makespan_s", round(r["makespan"], 2))
                report.figure(f"transfer_{source}_registry_copies", round(r["copies"], 3))
            ratio = results["peers-first"]["makespan"] / results["registry"]["makespan"]
            report.say(f"makespan peers-first / registry: {ratio:.2f} (target <= 0.5: "
                       f"{verdict(ratio <= 0.5)}); registry copies under peers-first: "
                       f"{results['peers-first']['copies']:.2f} (target 1.0)")
            report.figure("transfer_makespan_ratio", round(ratio, 3))

            d.services.stop_all()  # the copy path alone: nothing else running
            repeats = 2 if quick else 4
            ours, direct = [], []
            for i in range(repeats):
                progress(f"transfer: copy path, round {i + 1} of {repeats}")
                for way, sink in ((_through_imagesync, ours), (_direct_pipe, direct)):
                    _forget(d, ref, ["node-2"])
                    busy = cpu_seconds_used()
                    took, cpu = way(d, ref, digest) if way is _through_imagesync else way(d, ref)
                    busy = cpu_seconds_used() - busy
                    if d.cluster.node("node-2").images().get(ref) != digest:
                        raise RuntimeError("the copy did not arrive under the source's digest")
                    sink.append((took, cpu, busy))
            for name, rows in (("through the worker (imagesync.transfer.copy)", ours),
                               ("direct ssh | ssh pipe", direct)):
                rate = Sample.of(size / 1e6 / row[0] for row in rows)
                cpu = Sample.of(row[1] for row in rows)
                machine_cpu = Sample.of(row[2] for row in rows)
                report.say(f"copy node-1 -> node-2, {name}: {rate.show('.1f', ' MB/s')}; CPU per copy: the middle "
                           f"{cpu.show('.2f', ' s')}, the whole machine {machine_cpu.show('.1f', ' s')}")
                key = "worker" if rows is ours else "pipe"
                report.figure(f"transfer_copy_{key}_mb_s", list(rate.values))
                report.figure(f"transfer_copy_{key}_cpu_s", list(cpu.values))
                report.figure(f"transfer_copy_{key}_machine_cpu_s", list(machine_cpu.values))
    finally:
        remove_workdir(root)


#: nodes of the peer_ssh benchmark: three rounds of copies after the seed's pull
PEER_NODES = 8


def _one_copy(d: Deployment, ref: str, digest: str, peer_ssh: bool) -> tuple[float, int]:
    """node-1 to node-2, relayed by this process or run by node-2 itself: (seconds, bytes through
    this process's TCP connections, all of them new: the transports are closed first)."""
    from imagesync.config import load_settings
    from imagesync.transfer import copy
    from imagesync.transport import close_all

    close_all()
    settings = load_settings(d.config_path).model_copy(update={"peer_ssh": peer_ssh})
    before = tcp_bytes({os.getpid()})
    began = time.monotonic()
    copied = copy(settings, settings.node("node-1"), settings.node("node-2"), ref, digest, "linux/amd64", 600)
    took = time.monotonic() - began
    after = tcp_bytes({os.getpid()})
    close_all()
    if not copied.ok:
        raise RuntimeError(f"copy failed: {copied.reason}")
    if d.cluster.node("node-2").images().get(ref) != digest:
        raise RuntimeError("the copy did not arrive under the source's digest")
    return took, sum(count - before.get(connection, 0) for connection, count in after.items())


def run_peer_ssh(report: Report, quick: bool = False) -> None:
    size = SIZE // 4 if quick else SIZE
    root = workdir("peerssh")
    try:
        with Deployment(root, nodes=PEER_NODES) as d:
            progress(f"peerssh: pushing a {size / 1e6:.0f} MB image")
            ref = d.cluster.push("bcm11/big", "1", size=size, layers=LAYERS)
            digest = d.cluster.digests[ref]
            names = [node.name for node in d.cluster.nodes]
            d.configure(images=[ref], time_out=1200)
            d.cluster.node("node-1").pull(ref, timeout=600)
            repeats = 2 if quick else 3
            rows: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
            for i in range(repeats):
                progress(f"peerssh: one copy each way, round {i + 1} of {repeats}")
                for peer_ssh in (False, True):
                    _forget(d, ref, ["node-2"])
                    rows[peer_ssh].append(_one_copy(d, ref, digest, peer_ssh))
            for peer_ssh, name in ((False, "relayed by the worker"), (True, "peer_ssh, run by node-2 itself")):
                moved = Sample.of(row[1] for row in rows[peer_ssh])
                rate = Sample.of(size / 1e6 / row[0] for row in rows[peer_ssh])
                report.say(f"copy node-1 -> node-2, {name}: through the head {moved.show('.0f', ' bytes')} "
                           f"= {moved.median / size:.4f} x the image; {rate.show('.1f', ' MB/s')}")
                key = "peer_ssh" if peer_ssh else "relayed"
                report.figure(f"peerssh_copy_{key}_head_bytes", list(moved.values))
                report.figure(f"peerssh_copy_{key}_mb_s", list(rate.values))
            best = min(row[1] for row in rows[True])
            report.say(f"bytes through the head per peer_ssh copy: {best} (goal 0: "
                       f"{verdict(best < size / 1000)} for the image's bytes; the rest is the command and its answer)")

            results = {}
            ways = (("registry", "registry", False), ("peers-first relayed", "peers-first", False),
                    ("peers-first peer_ssh", "peers-first", True))
            for label, source, peer_ssh in ways:
                progress(f"peerssh: {label}, {PEER_NODES} nodes, registry at {RATE / 1e6:.0f} MB/s")
                _forget(d, ref, names)
                results[label] = r = _spread(d, ref, source, size, peer_ssh)
                report.say(f"{label}: makespan {r['makespan']:.1f} s; registry served {r['served'] / 1e6:.0f} MB "
                           f"= {r['copies']:.2f} copies; through the workers {r['workers'] / 1e6:.1f} MB; "
                           f"outcomes {r['counts']}")
                key = label.replace(" ", "_").replace("-", "_")
                report.figure(f"peerssh_{key}_makespan_s", round(r["makespan"], 2))
                report.figure(f"peerssh_{key}_workers_bytes", r["workers"])
            base = results["registry"]["makespan"]
            report.say("makespan / registry-only: " + ", ".join(
                f"{label} {results[label]['makespan'] / base:.2f}" for label, _, _ in ways[1:]))
    finally:
        remove_workdir(root)
