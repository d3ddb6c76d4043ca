"""Memory per node: how many nodes one head node can serve in SSH mode.

Every node has its own worker on the head node (``imagesync worker --node``:
prefork, a main process plus ``max_parallel`` pool processes). The figure is
PSS (proportional set size: shared pages divided among the processes sharing
them, so sums over processes add up to what the machine really spends), read
from /proc/PID/smaps_rollup and summed over the worker's main process and its
pool children. RSS counts every shared page once per process and would
overstate a prefork pool several times over.

Measured for a node worker with max_parallel 1, 4 and 8, idle (settled after
start) and after a run of pulls (a sleeping crictl, see orchestration.py, so
the machine is not CPU-bound), and for the control worker idle and after a
run that inventoried every node of a 50-node cluster (10 with ``--quick``).
Each configuration runs as shipped and under what-ifs, side by side in one
run: ``no-freeze`` (no ``gc.freeze()`` before the pool forks, through
bench/whatif/sitecustomize.py), ``celery-cli`` (the worker started as
``celery -A imagesync worker``, Celery's whole CLI imported, instead of
``imagesync worker`` -> ``python -m imagesync.worker``), both (the baseline:
imagesync before these changes), and ``arenas2`` (MALLOC_ARENA_MAX=2, a
what-if that did not help). ``--quick``: baseline and as shipped, 10 nodes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from .common import WHATIF, Deployment, Report, children, progress, remove_workdir, workdir
from .orchestration import install_sleep_crictl, set_held

MAX_PARALLELS = (1, 4, 8)
CONTROL_NODES = 50
#: pulls per node-worker run: two rounds at the largest max_parallel
PULLS = 16
PULL_SECONDS = 0.2
#: seconds a worker is left alone before it is measured
SETTLE = 4.0
#: before the changes (baseline), measured in the same run as imagesync as shipped
BASELINE = "no-freeze,celery-cli"
#: what-ifs, each undoing one change ("" = imagesync as shipped)
VARIANTS = (BASELINE, "no-freeze", "celery-cli", "", "arenas2")
#: the figure before the memory work, to be halved (PSS per node at max_parallel 4, MiB)
BEFORE_MIB = 200.0


def smaps(pid: int) -> dict[str, int]:
    """Rss, Pss and private (USS) of one process, in KiB."""
    found = {"Rss": 0, "Pss": 0, "Private": 0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        value = int(rest.split()[0])
        if key in ("Rss", "Pss"):
            found[key] = value
        elif key in ("Private_Clean", "Private_Dirty"):
            found["Private"] += value
    return found


def tree(pid: int) -> dict[str, Any]:
    """PSS/RSS of a worker: its main process and its pool children, in MiB."""
    main = smaps(pid)
    pool = [smaps(p) for p in children(pid)]
    mib = 1024.0
    return {
        "pss": (main["Pss"] + sum(p["Pss"] for p in pool)) / mib,
        "rss": (main["Rss"] + sum(p["Rss"] for p in pool)) / mib,
        "main_pss": main["Pss"] / mib,
        "main_private": main["Private"] / mib,
        "pool_pss": [p["Pss"] / mib for p in pool],
        "pool_private": [p["Private"] / mib for p in pool],
        "processes": 1 + len(pool),
    }


def _env(d: Deployment, whatif: str) -> None:
    env = d.services.env
    env.pop("BENCH_WHATIF", None)
    env.pop("MALLOC_ARENA_MAX", None)
    if "arenas2" in whatif.split(","):
        env["MALLOC_ARENA_MAX"] = "2"
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and p != str(WHATIF))
    if whatif:
        env["BENCH_WHATIF"] = whatif
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WHATIF), env["PYTHONPATH"]]))


def _start(d: Deployment, whatif: str, node: str | None, concurrency: int) -> str:
    """Start a worker as shipped (``imagesync worker``), or with ``celery-cli`` as before:
    ``celery -A imagesync worker`` with the same options."""
    from testcluster.services import QUICK_START

    if "celery-cli" not in whatif.split(","):
        if node is None:
            d.services.start_control()
            return "control"
        d.services.start_worker(node)
        return f"worker-{node}"
    queue, name = ("imagesync", "control") if node is None else (f"node.{node}", node)
    argv = [sys.executable, "-m", "celery", "-A", "imagesync", "worker", "-P", "prefork", "-l", "INFO",
            "-Q", queue, "-c", str(concurrency), "-n", f"{name}@%h", *QUICK_START]
    label = "control" if node is None else f"worker-{node}"
    d.services._start(label, argv, "ready.")
    return label


def _pid(d: Deployment, name: str) -> int:
    pid = d.services.processes[name].pid
    assert pid is not None
    return pid


def node_worker(d: Deployment, images: list[str], max_parallel: int, whatif: str) -> dict[str, Any]:
    node = d.cluster.nodes[0]
    d.services.stop_all()
    _env(d, whatif)
    d.configure(images=images, max_parallel=max_parallel, nodes=[node.name], time_out=120)
    set_held(node, images)
    _start(d, whatif, None, 2)
    name = _start(d, whatif, node.name, max_parallel)
    time.sleep(SETTLE)
    idle = tree(_pid(d, name))
    set_held(node, [])
    d.sync()
    time.sleep(SETTLE)
    busy = tree(_pid(d, name))
    assert busy["processes"] == max_parallel + 1, busy
    return {"idle": idle, "pulls": busy}


def control_worker(d: Deployment, images: list[str], whatif: str) -> dict[str, Any]:
    d.services.stop_all()
    _env(d, whatif)
    d.configure(images=images, max_parallel=4, time_out=120)
    for node in d.cluster.nodes:
        set_held(node, images)
    _start(d, whatif, None, 2)
    time.sleep(SETTLE)
    idle = tree(_pid(d, "control"))
    # every node already holds every image: an inventory of all nodes, no pulls
    _, _, answer = d.trigger()
    assert answer["status"] == "nothing-to-do" and not answer["missed"], answer
    time.sleep(SETTLE)
    return {"idle": idle, "inventory": tree(_pid(d, "control"))}


def _label(whatif: str) -> str:
    return {"": "as shipped", BASELINE: "before (no gc.freeze, started by Celery's CLI)",
            "no-freeze": "as shipped but without gc.freeze",
            "celery-cli": "as shipped but started by Celery's CLI (celery -A imagesync worker)",
            "arenas2": "as shipped plus MALLOC_ARENA_MAX=2 (what-if)"}.get(whatif, whatif)


def _show(t: dict[str, Any]) -> str:
    pool = t["pool_pss"]
    avg = sum(pool) / len(pool) if pool else 0.0
    return (f"PSS {t['pss']:6.1f} MiB (main {t['main_pss']:5.1f}, pool {avg:5.1f} x {len(pool)}; "
            f"private main {t['main_private']:5.1f}, pool {sum(t['pool_private']) / max(1, len(pool)):5.1f})  "
            f"RSS {t['rss']:6.1f}")


def run(report: Report, quick: bool = False) -> None:
    nodes = 10 if quick else CONTROL_NODES
    variants = (BASELINE, "") if quick else VARIANTS
    root = workdir("mem")
    results: dict[str, Any] = {}
    try:
        with Deployment(root, nodes=nodes) as d:
            for node in d.cluster.nodes:
                install_sleep_crictl(node, PULL_SECONDS)
            images = [f"{d.cluster.registry_address}/bcm11/bench/mem{i:03d}:1" for i in range(PULLS)]
            for whatif in variants:
                for mp in MAX_PARALLELS:
                    progress(f"memory: node worker max_parallel={mp}, {_label(whatif)}")
                    results[f"node_mp{mp}_{whatif or 'shipped'}"] = node_worker(d, images, mp, whatif)
            for whatif in (BASELINE, ""):
                progress(f"memory: control worker, {nodes} nodes, {_label(whatif)}")
                results[f"control_{nodes}_{whatif or 'shipped'}"] = control_worker(d, images, whatif)
    finally:
        remove_workdir(root)

    report.say(f"node worker: PSS summed over main + pool processes; after = after {PULLS} pulls "
               f"of {PULL_SECONDS:g} s (sleeping crictl)")
    for whatif in variants:
        report.say(f"  {_label(whatif)}:")
        for mp in MAX_PARALLELS:
            r = results[f"node_mp{mp}_{whatif or 'shipped'}"]
            report.say(f"    max_parallel={mp}  idle   {_show(r['idle'])}")
            report.say(f"    max_parallel={mp}  pulls  {_show(r['pulls'])}")
    report.say(f"control worker (-c 2), {nodes} nodes:")
    for whatif in (BASELINE, ""):
        r = results[f"control_{nodes}_{whatif or 'shipped'}"]
        report.say(f"  {_label(whatif)}:")
        report.say(f"    idle                 {_show(r['idle'])}")
        report.say(f"    after inventory      {_show(r['inventory'])}")
    before = results[f"node_mp4_{BASELINE}"]["pulls"]["pss"]
    after = results["node_mp4_shipped"]["pulls"]["pss"]
    control = results[f"control_{nodes}_shipped"]["inventory"]["pss"]
    report.say(f"per node at max_parallel=4 after pulls: before {before:.0f} MiB, as shipped {after:.0f} MiB "
               f"({after / before:.0%}; target <= {BEFORE_MIB / 2:.0f} MiB, half of the {BEFORE_MIB:.0f} MiB "
               f"measured before: {'MET' if after <= BEFORE_MIB / 2 else 'MISSED'})")
    report.say(f"nodes per GiB of head-node memory at max_parallel=4: before {1024 / before:.1f}, "
               f"as shipped {1024 / after:.1f} (plus one control worker, {control:.0f} MiB)")
    report.figure("results", results)
    report.figure("nodes_per_gib", {"before": 1024 / before, "shipped": 1024 / after, "control_mib": control})
