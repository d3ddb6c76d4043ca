"""Inventory through agents: ``imagesync.survey.ask`` over 1, 10 and 50 agent nodes.

Fifty ``imagesync agent`` processes (real Celery workers, ``max_parallel = 1``:
a main process and one pool process each), ten on each of five real
containerds of the test cluster, each holding the same 10 images. A run's
inventory sends one ``imagesync.inventory`` task per agent onto its node's
queue and reads the answers from one Redis list. Two node-side listers, as in
``bench inventory``: ``real`` (the test cluster's crictl, a Python gRPC client
of containerd, ~0.15 CPU-s a call) and ``cat`` (the same JSON from a file,
standing in for nodes that list on their own CPUs). The SSH path's figures for
the same sizes are section 3 of bench/README.md.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .common import Report, Sample, cpu_seconds_used, process_cpu_seconds, progress, remove_workdir, workdir

SIZES = (1, 10, 50)
CONTAINERDS = 5
IMAGES = 10


def _wrapper(root: Any, real: str) -> Any:
    """A crictl that prints the node's saved listing while the file CAT exists, else runs the real one."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "crictl"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2 $3" = "images -o json" ] && [ -f {root}/CAT ]; then exec cat "$BENCH_LISTING"; fi\n'
        f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    return bin_dir


def run(report: Report, quick: bool = False) -> None:
    from imagesync import agents, survey
    from imagesync.config import load_settings
    from imagesync.redisclient import connect
    from testcluster.cluster import Cluster
    from testcluster.services import Services

    root = workdir("agents")
    cores = os.cpu_count() or 1
    try:
        with Cluster(root / "cluster", nodes=CONTAINERDS) as cluster:
            images = [f"bcm11/inv/app{i:02d}:1" for i in range(IMAGES)]
            cluster.seed({node.name: images for node in cluster.nodes})
            config = cluster.write_config(root / "imagesync.toml", nodes=[], agents=True, max_parallel=1,
                                          agent_heartbeat=2.0, agent_lapse=30.0, agent_inventory_timeout=60.0)
            os.environ["IMAGESYNC_CONFIG"] = str(config)  # the Celery app that sends the tasks reads it
            settings = load_settings(config)
            from imagesync.tasks import send_inventory
            bin_dir = _wrapper(root, str(cluster.nodes[0].bin_dir / "crictl"))
            for node in cluster.nodes:
                listing = node.workdir / "images.json"
                listing.write_text(node.run(["crictl", "images", "-o", "json"]).stdout)
            with Services(config, root / "services") as services:
                began = time.monotonic()
                names = [f"agent-{i:02d}" for i in range(1, max(SIZES) + 1)]
                for i, name in enumerate(names):
                    node = cluster.nodes[i % CONTAINERDS]
                    environment = {**node.environment, "PATH": f"{bin_dir}:{node.environment['PATH']}",
                                   "BENCH_LISTING": str(node.workdir / "images.json")}
                    services.start_agent(name, environment, "--endpoint", f"unix://{node.socket}", wait=False)
                for name in names:
                    services.wait_ready(f"agent-{name}", timeout=600)
                progress(f"agents: {len(names)} agents ready in {time.monotonic() - began:.0f} s")
                redis = connect(settings, socket_timeout=30)
                deadline = time.monotonic() + 120
                while len(agents.fleet(settings, redis).alive) < len(names) and time.monotonic() < deadline:
                    time.sleep(0.5)
                alive = sorted(agents.fleet(settings, redis).alive, key=lambda agent: agent.name)
                report.say(f"{len(alive)} agents registered ({len(names)} started, {CONTAINERDS} containerds, "
                           f"{IMAGES} images each), started in {time.monotonic() - began:.0f} s")
                for lister in ("real", "cat"):
                    if lister == "cat":
                        (root / "CAT").touch()
                    report.say(f"{lister} lister:")
                    figures: dict[int, list[dict[str, float]]] = {}
                    for n in SIZES:
                        progress(f"agents: {lister} lister, {n} agents")
                        # the first task of a pool process imports more
                        survey.ask(settings, redis, alive[:n], send_inventory)
                        figures[n] = []
                        for _ in range(3 if quick else 5):
                            machine, own, started = cpu_seconds_used(), process_cpu_seconds(), time.monotonic()
                            inventory = survey.ask(settings, redis, alive[:n], send_inventory)
                            wall = time.monotonic() - started
                            if inventory.errors or len(inventory.images) != n:
                                raise RuntimeError(f"inventory failed: {inventory.unreachable}")
                            if any(len(held) != IMAGES for held in inventory.images.values()):
                                raise RuntimeError("an agent listed the wrong images")
                            figures[n].append({"wall": wall, "machine_cpu": cpu_seconds_used() - machine,
                                               "own_cpu": process_cpu_seconds() - own})
                        wall = Sample.of(r["wall"] for r in figures[n])
                        machine_cpu = Sample.of(r["machine_cpu"] for r in figures[n]).median
                        own_cpu = Sample.of(r["own_cpu"] for r in figures[n]).median
                        report.say(f"  {n:3d} agents  {wall.show('.3f', ' s')}; machine CPU {machine_cpu:.2f} s "
                                   f"(floor on {cores} cores: {machine_cpu / cores:.3f} s), "
                                   f"the asking process {own_cpu:.3f} CPU-s")
                    report.figure(lister, figures)
    finally:
        remove_workdir(root)
