"""One worker for many nodes against one worker per node: memory and makespan, 10 nodes.

``imagesync worker --all-nodes --pool prefork`` serves every node's queue
from one prefork pool (the default pool of threads is measured by
headnode.py); each pull takes a slot of its node's semaphore in Redis first, so a
node still runs at most ``max_parallel`` pulls (imagesync/nodeslots.py). It
is measured against the default deployment, one ``imagesync worker --node``
per node (concurrency ``max_parallel`` each), on the same 10-node cluster,
``max_parallel`` 4, pulls of a known time from the sleeping crictl of
orchestration.py (the machine is not CPU-bound by the pulls themselves):

* memory: PSS summed over every pull worker's main and pool processes (the
  control worker, the same in both, left out), after the workloads ran;
* makespan of three workloads, from the sync trigger to the run's end:
  ``fill`` (every node lacks 8 images), ``push`` (every node lacks one image,
  as after a registry push), ``new node`` (one node lacks 16, the others
  hold them all);
* the most pulls seen at once on one node (the crictl logs): never above
  ``max_parallel``.

The shared worker runs with its default concurrency (the larger of the node
count and max_parallel: 10 here) and with one process per slot of every node
(40), the memory of which is close to one worker per node.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from testcluster.measure import max_concurrency

from .common import Deployment, Report, Sample, progress, pull_intervals, remove_workdir, workdir
from .memory import SETTLE, tree
from .orchestration import install_sleep_crictl, set_held

NODES = 10
MAX_PARALLEL = 4
PULL_SECONDS = 1.0
#: the images declared in the configuration (workers read it once, at start)
IMAGES = 16
#: workload -> (images lacking, which nodes lack them: "all" or "one"); the rest are held
WORKLOADS = {"fill": (8, "all"), "push": (1, "all"), "new node": (16, "one")}
#: (label, how the pull workers are started)
SETUPS = (("one worker per node", None), ("one worker, default concurrency", 0),
          ("one worker, concurrency 40", NODES * MAX_PARALLEL))


def _start(d: Deployment, concurrency: int | None) -> list[str]:
    import time

    d.services.stop_all()
    d.services.start_control(wait=False)
    if concurrency is None:
        names = [f"worker-{n.name}" for n in d.cluster.nodes]
        for n in d.cluster.nodes:
            d.services.start_worker(n.name, wait=False)
    else:
        names = ["shared"]
        extra = ["--concurrency", str(concurrency)] if concurrency else []
        # prefork, as measured in bench/README.md section 9; the pool of threads is headnode.py's
        d.services.start_shared_worker("shared", "--all-nodes", "--pool", "prefork", *extra, wait=False)
    for name in ["control", *names]:
        d.services.wait_ready(name, timeout=180)
    time.sleep(SETTLE)
    return names


def _workload(d: Deployment, images: list[str], name: str, repeats: int) -> dict[str, Any]:
    count, lacking = WORKLOADS[name]
    makespans, peaks = [], []
    for _ in range(repeats):
        for i, node in enumerate(d.cluster.nodes):
            set_held(node, images[count:] if lacking == "all" or i == 0 else images)
            node.pull_log.write_text("")
        _, makespan = d.sync()
        per_node: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for node, start, end in pull_intervals(d.cluster.nodes):
            per_node[node].append((start, end))
        expected = count * (len(d.cluster.nodes) if lacking == "all" else 1)
        assert sum(len(v) for v in per_node.values()) == expected, per_node
        makespans.append(makespan)
        peaks.append(max(max_concurrency(v) for v in per_node.values()))
    return {"makespan": list(makespans), "peak_per_node": max(peaks)}


def run(report: Report, quick: bool = False) -> None:
    repeats = 1 if quick else 3
    root = workdir("many")
    results: dict[str, Any] = {}
    try:
        with Deployment(root, nodes=NODES) as d:
            for node in d.cluster.nodes:
                install_sleep_crictl(node, PULL_SECONDS)
            images = [f"{d.cluster.registry_address}/bcm11/bench/many{i:03d}:1" for i in range(IMAGES)]
            d.configure(images=images, max_parallel=MAX_PARALLEL, time_out=120)
            for label, concurrency in SETUPS:
                progress(f"manynodes: {label}")
                names = _start(d, concurrency)
                figures: dict[str, Any] = {"workloads": {}}
                for workload in WORKLOADS:
                    figures["workloads"][workload] = _workload(d, images, workload, repeats)
                trees = [tree(d.services.processes[n].pid or 0) for n in names]
                figures["pss"] = sum(t["pss"] for t in trees)
                figures["processes"] = sum(t["processes"] for t in trees)
                results[label] = figures
            d.services.stop_all()
    finally:
        remove_workdir(root)

    report.say(f"{NODES} nodes, max_parallel={MAX_PARALLEL}, pulls of {PULL_SECONDS:g} s (sleeping crictl); "
               f"PSS of the pull workers (main + pool), after the workloads; makespan from trigger to run end")
    base = results[SETUPS[0][0]]
    for label, _ in SETUPS:
        r = results[label]
        report.say(f"  {label}: {r['processes']} processes, PSS {r['pss']:.1f} MiB "
                   f"({r['pss'] / base['pss']:.0%} of one worker per node)")
        for workload, (count, lacking) in WORKLOADS.items():
            w = r["workloads"][workload]
            spans = Sample.of(w["makespan"])
            ratio = spans.median / Sample.of(base["workloads"][workload]["makespan"]).median
            what = f"{count} on {'every node' if lacking == 'all' else 'one node'}"
            report.say(f"    {workload:9s} ({what:17s}) makespan {spans.show('.2f', ' s')}  x{ratio:.2f}; "
                       f"most pulls at once on one node {w['peak_per_node']}")
    report.figure("results", results)
