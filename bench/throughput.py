"""Real throughput: one 200 MB image (4 layers) onto 3 nodes, against a raw ``ctr pull``.

The image comes straight from the registry (not through the test cluster's
Python proxy, which would be the bottleneck). Each measurement starts from
nodes that do not hold it (removed, and containerd's garbage collection
waited for, between measurements), with the registry's files in the page
cache for all of them alike:

* raw, 1 node: ``ctr images pull`` on node-1, run locally with the node's
  environment (no SSH, no imagesync);
* raw, 3 nodes: the same on the three nodes at once;
* imagesync, 3 nodes: a sync (runtime ``ctr``, as raw; the image declared in
  the configuration) from the trigger to the run record's ``finished``;
* imagesync, 1 node: the same sync limited to node-1 (``nodes=["node-1"]``).

Throughput per node = image size / time for that node's image to land.
Target: imagesync's (3 nodes) at least 0.95 of raw (1 node).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .common import Deployment, Report, Sample, progress, remove_workdir, verdict, workdir

SIZE = 200 * 1000 * 1000
LAYERS = 4
NODES = 3
TARGET = 0.95


def _ctr(node: Any, *args: str) -> Any:
    return node.run(["ctr", "--address", node.socket, "--namespace", "k8s.io", *args], timeout=600)


def _forget(nodes: list[Any]) -> None:
    """Remove every image from the nodes and wait for containerd's garbage collection."""
    for node in nodes:
        refs = _ctr(node, "images", "ls", "-q").stdout.split()
        if refs:
            _ctr(node, "images", "rm", "--sync", *refs)


def _raw(d: Deployment, ref: str, nodes: list[Any]) -> float:
    def pull(node: Any) -> float:
        began = time.monotonic()
        _ctr(node, "images", "pull", "--hosts-dir", str(node.workdir / "certs.d"), ref)
        return time.monotonic() - began

    with ThreadPoolExecutor(len(nodes)) as pool:
        return max(pool.map(pull, nodes))


def _imagesync(d: Deployment, targets: list[str] | None) -> float:
    sent = time.time()
    result = d.app.send_task("imagesync.sync", kwargs={"trigger": "bench", "nodes": targets}, queue="imagesync")
    answer = result.get(timeout=120)
    if answer["status"] != "started":
        raise RuntimeError(f"sync did not start: {answer}")
    run = d.wait(answer["run"], timeout=900)
    if run.status != "completed" or run.failures:
        raise RuntimeError(f"run {run.id}: {run.status} {run.counts}")
    return float(run.finished - sent)


def run(report: Report, quick: bool = False) -> None:
    repeats = 2 if quick else 3
    root = workdir("throughput")
    times: dict[str, list[float]] = {"raw1": [], "raw3": [], "is3": [], "is1": []}
    try:
        with Deployment(root, nodes=NODES) as d:
            progress(f"throughput: pushing a {SIZE // 10**6} MB image")
            d.cluster.registry.push_image("bcm11/big", "1", size=SIZE, layers=LAYERS)
            ref = f"{d.cluster.registry.address}/bcm11/big:1"
            nodes = d.cluster.nodes
            d.configure(images=[ref], runtime="ctr", time_out=600,
                        nodes_extra={n.name: {"hosts_dir": str(n.workdir / "certs.d")} for n in nodes})
            d.start_workers()
            measurements = {
                "raw1": lambda: _raw(d, ref, nodes[:1]),
                "raw3": lambda: _raw(d, ref, nodes),
                "is3": lambda: _imagesync(d, None),
                "is1": lambda: _imagesync(d, [nodes[0].name]),
            }
            # warm-up: the registry's files into the page cache, connections open
            _forget(nodes)
            measurements["is3"]()
            for i in range(repeats):
                for name, measure in measurements.items():
                    progress(f"throughput: run {i + 1} of {repeats}: {name}")
                    _forget(nodes)
                    times[name].append(measure())
            _forget(nodes)
    finally:
        remove_workdir(root)
    mb = SIZE / 1e6
    rate = {name: Sample.of(mb / t for t in values) for name, values in times.items()}
    report.say(f"one {mb:.0f} MB image in {LAYERS} layers, straight from the registry, {NODES} nodes:")
    rows = [("raw ctr pull, 1 node", "raw1", ""), (f"raw ctr pull, {NODES} nodes at once", "raw3", " per node"),
            ("imagesync, 1 node", "is1", ""), (f"imagesync, {NODES} nodes", "is3", " per node")]
    for label, name, each in rows:
        report.say(f"  {label:30s}{Sample.of(times[name]).show('.2f', ' s')} = {rate[name].show('.0f', ' MB/s')}{each}")
    target = Sample.of(r1 / r3 for r1, r3 in zip(times["raw1"], times["is3"], strict=True))
    same = Sample.of(a / b for a, b in zip(times["raw3"], times["is3"], strict=True))
    single = Sample.of(a / b for a, b in zip(times["raw1"], times["is1"], strict=True))
    report.say(f"  imagesync 3 nodes / raw 1 node (per-node throughput) {target.show('.2f')}   "
               f"target >= {TARGET}: {verdict(target.median >= TARGET)}")
    report.say(f"  imagesync 3 nodes / raw 3 nodes at once {same.show('.2f')}; "
               f"imagesync 1 node / raw 1 node {single.show('.2f')}")
    report.figure("throughput_seconds", times)
