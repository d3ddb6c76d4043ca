"""Per-pull control overhead: imagesync against the seed's Bash pipeline.

Two nodes each hold their own set of small real images and lack the other's;
both approaches bring every node to the union, on the same cluster, taking
turns with fresh image sets:

* imagesync: ``imagesync sync --wait`` (the CLI, the control worker and one
  worker per node, already running, as they are in production);
* the seed: ``bench/seed_sync.sh`` (one ``ssh`` per command, ``crictl images
  -o json | jq``, ``xargs -P MAX_PARALLEL ssh NODE timeout T crictl pull``).

On the real Go ``ctr`` (``runtime = "ctr"``, containerd's own client, no Python
crictl in the way), both sides use ``ctr``, and wall times are compared: the
pull's own work there is a Go process and an SSH session per command, so this
is where the number of node-side processes per pull shows. Target: imagesync
at most 0.85 x the pipeline's wall time.

Overhead = wall time minus the pure pull time, per pull; the pure pull time
is what the pulls alone need with every slot busy: max over nodes of the sum
of the durations the node's crictl logged around its PullImage call, divided
by max_parallel. A run with nothing to do shows each approach's fixed cost.
Target: imagesync's at most a third of the pipeline's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import (
    Deployment,
    Report,
    Sample,
    clear_pull_log,
    progress,
    pull_intervals,
    remove_workdir,
    verdict,
    workdir,
)
from .orchestration import install_sleep_crictl, set_held

SCRIPT = Path(__file__).with_name("seed_sync.sh")
NODES = 2
PER_NODE = 20
MAX_PARALLEL = 4
TARGET = 1 / 3
#: on real ctr: imagesync's wall time against the pipeline's
CTR_TARGET = 0.85
#: seconds a pull takes with the sleeping crictl
SLEEP_PULL = 0.3


def pure_pull_seconds(pulls: list[tuple[str, float, float]], max_parallel: int = MAX_PARALLEL) -> float:
    """The time the pulls alone need, every slot busy: max over nodes of the
    node's summed pull durations / max_parallel."""
    per_node: dict[str, float] = {}
    for node, start, end in pulls:
        per_node[node] = per_node.get(node, 0.0) + (end - start)
    return max(per_node.values()) / max_parallel


def _images(d: Deployment, tag: str) -> dict[str, list[str]]:
    return {node.name: [f"bcm11/bench/{tag}-{node.name}-{i:02d}:1" for i in range(PER_NODE)]
            for node in d.cluster.nodes}


def _seed(d: Deployment, tag: str, runtime: str) -> int:
    """Give each node its own PER_NODE images; returns the pulls a sync needs.

    ``real``: pushed, and pulled through the CRI beforehand; ``sleeping``:
    listed by the sleeping crictl (see bench/orchestration.py).
    """
    images = _images(d, tag)
    if runtime in ("real", "ctr"):
        d.cluster.seed(images)
    else:
        for node in d.cluster.nodes:
            set_held(node, [d.cluster.ref(i) for i in images[node.name]])
    for node in d.cluster.nodes:
        clear_pull_log(node)
    return PER_NODE * NODES * (NODES - 1)


def _forget(d: Deployment, tag: str) -> None:
    """Take back from each node the images of set ``tag`` it got from the others: the next sync
    pulls them again, images the cluster has seen (their platform verdicts kept in Redis)."""
    images = _images(d, tag)
    for node in d.cluster.nodes:
        others = [d.cluster.ref(image) for name, refs in images.items() if name != node.name for image in refs]
        node.run(["ctr", "-a", str(node.socket), "-n", "k8s.io", "images", "rm", *others])


def _clear(d: Deployment, tag: str) -> None:
    """Take every image of set ``tag`` off every node, so that each repetition starts from the
    same node state: the warm-up set only. A node's listing costs imagesync in proportion to
    the images it holds (``ctr images ls`` reads each image's manifests for its size and
    platforms), the pipeline hardly (``ctr images ls -q``), so images piling up from one
    repetition to the next would make the figure depend on the number of repetitions."""
    mark = f"/bcm11/bench/{tag}-"
    for node in d.cluster.nodes:
        refs = node.run(["ctr", "-a", str(node.socket), "-n", "k8s.io", "images", "ls", "-q"]).stdout.split()
        ours = [ref for ref in refs if mark in ref]
        if ours:
            node.run(["ctr", "-a", str(node.socket), "-n", "k8s.io", "images", "rm", *ours])


def _pulls(d: Deployment) -> list[tuple[str, float, float]]:
    return pull_intervals(d.cluster.nodes)


def _hosts_dirs(d: Deployment) -> dict[str, dict[str, str]]:
    return {node.name: {"hosts_dir": str(node.workdir / "certs.d")} for node in d.cluster.nodes}


def _imagesync(d: Deployment, expected: int) -> dict[str, float]:
    began = time.monotonic()
    result = d.cli("sync", "--wait")
    wall = time.monotonic() - began
    if result.returncode != 0:
        raise RuntimeError(f"imagesync sync failed:\n{result.stdout}\n{result.stderr}")
    return _figures(d, wall, expected)


def _bash(d: Deployment, expected: int) -> dict[str, float]:
    config = d.cluster.config()
    env = {
        **os.environ,
        "NODES": " ".join(f"{n.ssh_host}:{n.ssh_port}" for n in d.cluster.nodes),
        "SSH_KEY": str(d.cluster.key_file),
        "KNOWN_HOSTS": str(d.cluster.known_hosts),
        "PREFIXES": " ".join(config["prefixes"]),
        "MAX_PARALLEL": str(MAX_PARALLEL),
        "TIME_OUT": str(config["time_out"]),
        "LOG_DIR": str(d.root / "seed-logs"),
        "RUNTIME": "ctr" if d.cluster.runtime == "ctr" else "crictl",
        "HOSTS_DIRS": " ".join(str(n.workdir / "certs.d") for n in d.cluster.nodes),
    }
    began = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - began
    if result.returncode != 0:
        raise RuntimeError(f"seed_sync.sh failed:\n{result.stderr}")
    return _figures(d, wall, expected)


def _figures(d: Deployment, wall: float, expected: int) -> dict[str, float]:
    if d.cluster.runtime == "ctr":
        # no crictl to log pulls: check the result on containerd itself
        held = [{ref for ref in node.images() if "@" not in ref} for node in d.cluster.nodes]
        if any(h != held[0] for h in held):
            raise RuntimeError("the nodes do not hold the same images after the sync")
        return {"wall": wall, "pure": 0.0, "pulls": expected, "pull_median": 0.0, "overhead": wall / max(1, expected)}
    pulls = _pulls(d)
    if len(pulls) != expected:
        raise RuntimeError(f"expected {expected} pulls, the nodes logged {len(pulls)}")
    pure = pure_pull_seconds(pulls) if pulls else 0.0
    return {"wall": wall, "pure": pure, "pulls": len(pulls),
            "pull_median": sorted(e - s for _, s, e in pulls)[len(pulls) // 2] if pulls else 0.0,
            "overhead": (wall - pure) / max(1, len(pulls))}


def measure(report: Report, runtime: str, repeats: int, whatif: str | None = None, seen: bool = False,
            **settings: Any) -> None:
    """Each repetition pulls a new image set (new digests: images the cluster has never seen);
    with ``seen`` (ctr only), each approach then pulls the same set again, the images taken back
    from the nodes first: images seen before."""
    root = workdir("overhead")
    results: dict[str, list[dict[str, float]]] = {"imagesync": [], "bash": []}
    again: dict[str, list[dict[str, float]]] = {"imagesync": [], "bash": []}
    try:
        with Deployment(root, nodes=NODES, whatif=whatif, runtime="ctr" if runtime == "ctr" else "crictl") as d:
            if runtime == "sleeping":
                for node in d.cluster.nodes:
                    install_sleep_crictl(node, SLEEP_PULL)
            if runtime == "ctr":
                d.configure(max_parallel=MAX_PARALLEL, runtime="ctr", nodes_extra=_hosts_dirs(d), **settings)
            else:
                d.configure(max_parallel=MAX_PARALLEL, **settings)
            progress(f"overhead ({runtime}): starting workers")
            d.start_workers()
            # warm-up, as a deployment that has been up a while: connections open
            _seed(d, "warm", runtime)
            d.cli("sync", "--wait")
            for node in d.cluster.nodes:
                clear_pull_log(node)
            idle: dict[str, list[float]] = {"imagesync": [], "bash": []}
            for name, approach in (("imagesync", _imagesync), ("bash", _bash)):
                for _ in range(2):
                    idle[name].append(approach(d, 0)["wall"])
            for i in range(repeats):
                # alternate which goes first, so a slow spell of the machine hits both
                order = [("imagesync", _imagesync), ("bash", _bash)]
                for name, approach in order if i % 2 == 0 else order[::-1]:
                    progress(f"overhead ({runtime}): run {i + 1} of {repeats}: {name}")
                    expected = _seed(d, f"r{i}{name[0]}", runtime)
                    results[name].append(approach(d, expected))
                    if seen:
                        _forget(d, f"r{i}{name[0]}")
                        again[name].append(approach(d, expected))
                    if runtime != "sleeping":
                        _clear(d, f"r{i}{name[0]}")
    finally:
        remove_workdir(root)
    pulls = int(results["imagesync"][0]["pulls"])
    what = {
        "real": "real containerd, each crictl call a Python process of the test cluster (~0.15 CPU-s)",
        "ctr": "real containerd through the real Go ctr on both sides",
        "sleeping": f"the sleeping crictl, pull = {SLEEP_PULL:g} s (a runtime that costs nothing else)",
    }[runtime]
    if whatif:
        what += f"   [WHAT-IF {whatif}, not imagesync as shipped]"
    if settings:
        what += "   [" + ", ".join(f"{key} = {value!r}" for key, value in settings.items()) + "]"
    report.say(f"{NODES} nodes each lacking the other's {PER_NODE} images ({pulls} pulls), "
               f"max_parallel={MAX_PARALLEL}, {what}:")
    if seen:
        _say_walls(report, "new images every run", results)
        _say_walls(report, "the same images again (seen before: verdicts kept)", again)
        report.say("  fixed cost (a run with nothing to pull): "
                   f"imagesync {Sample.of(idle['imagesync']).show('.2f', ' s')}, "
                   f"Bash {Sample.of(idle['bash']).show('.2f', ' s')}")
        report.figure(f"overhead_{runtime}_new_and_seen", {"new": results, "seen": again, "idle": idle})
        return
    for name, label in (("imagesync", "imagesync sync --wait"), ("bash", "seed's Bash pipeline")):
        runs = results[name]
        report.say(f"  {label:22s} wall {Sample.of(r['wall'] for r in runs).show('.2f', ' s')}, "
                   f"pure pull {Sample.of(r['pure'] for r in runs).show('.2f', ' s')}, "
                   f"overhead/pull {Sample.of(r['overhead'] * 1000 for r in runs).show('.0f', ' ms')}")
    report.say("  fixed cost (a run with nothing to pull): "
               f"imagesync {Sample.of(idle['imagesync']).show('.2f', ' s')}, "
               f"Bash {Sample.of(idle['bash']).show('.2f', ' s')}")
    pairs = list(zip(results["imagesync"], results["bash"], strict=True))
    walls = Sample.of(a["wall"] / b["wall"] for a, b in pairs)
    if runtime == "ctr":
        report.say(f"  wall time imagesync/Bash  {walls.show('.2f')}   "
                   f"target <= {CTR_TARGET:g}: {verdict(walls.median <= CTR_TARGET)}")
    else:
        ratios = Sample.of(a["overhead"] / b["overhead"] for a, b in pairs)
        report.say(f"  wall time imagesync/Bash  {walls.show('.2f')}")
        report.say(f"  overhead imagesync/Bash   {ratios.show('.2f')}   "
                   f"target <= 0.33: {verdict(ratios.median <= TARGET)}")
    report.figure(f"overhead_{runtime}" + (f"_{whatif}" if whatif else ""), results)


def _say_walls(report: Report, which: str, results: dict[str, list[dict[str, float]]]) -> None:
    report.say(f"  {which}:")
    for name, label in (("imagesync", "imagesync sync --wait"), ("bash", "seed's Bash pipeline")):
        report.say(f"    {label:22s} wall {Sample.of(r['wall'] for r in results[name]).show('.2f', ' s')}")
    walls = Sample.of(a["wall"] / b["wall"] for a, b in zip(results["imagesync"], results["bash"], strict=True))
    report.say(f"    wall time imagesync/Bash  {walls.show('.2f')}   target <= 0.6: {verdict(walls.median <= 0.6)}")


def run_wall(report: Report, quick: bool = False) -> None:
    """Real ctr only: wall time against the pipeline, new images every run and images seen before."""
    if shutil.which("jq") is None:
        raise SystemExit("bench overhead: the seed's pipeline needs jq: apt-get install jq")
    measure(report, "ctr", 2 if quick else 4, seen=True)
    from imagesync.config import Settings

    if "refresh" in Settings.model_fields:
        # moved tags: every plan asks the registry for the current digest of every held tag
        measure(report, "ctr", 2 if quick else 4, seen=True, refresh=False)


def run(report: Report, quick: bool = False) -> None:
    if shutil.which("jq") is None:
        raise SystemExit("bench overhead: the seed's pipeline needs jq: apt-get install jq")
    measure(report, "sleeping", 2 if quick else 4)
    measure(report, "ctr", 2 if quick else 3)
    measure(report, "real", 2 if quick else 3)
    if not quick:
        measure(report, "ctr", 3, whatif="always-check")
