"""Inventory scaling: ``imagesync.inventory.take_inventory`` over 1, 10 and 50 nodes.

Fifty real nodes (containerd + sshd each; they start in a few seconds, so no
lighter kind of node is needed), each holding the same 10 images. Two node-side
listers:

* ``real``: the test cluster's crictl, a Python process that asks containerd
  over gRPC (~0.15 CPU-seconds per call, on this machine's shared cores);
* ``cat``: a crictl that prints the same JSON from a file, standing in for
  nodes that do their listing on their own CPUs.

Connections are ``cold`` (a process that has not reached the nodes yet: SSH
handshakes included) or, with the ``cat`` lister, also ``warm`` (a control
worker that ran a sync before).
Besides wall time, each figure carries the CPU-seconds the whole machine and
the inventorying process spent: wall time cannot go below machine CPU /
cores, whatever imagesync does. Target: 50 nodes in at most 2x the time of 1.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .common import Report, Sample, cpu_seconds_used, process_cpu_seconds, progress, remove_workdir, verdict, workdir

SIZES = (1, 10, 50)
#: images each node holds
IMAGES = 10
TARGET = 2.0


def _cat_crictl(cluster: Any) -> None:
    for node in cluster.nodes:
        listing = node.workdir / "images.json"
        listing.write_text(node.run(["crictl", "images", "-o", "json"]).stdout)
        json.loads(listing.read_text())
        (node.bin_dir / "crictl").write_text(f"#!/bin/sh\nexec cat {listing}\n")


def _measure(settings: Any, repeats: int, cold: bool) -> list[dict[str, float]]:
    from imagesync import transport
    from imagesync.inventory import take_inventory

    runs = []
    if not cold:
        take_inventory(settings)
    for _ in range(repeats):
        if cold:
            transport.close_all()
        machine, own, began = cpu_seconds_used(), process_cpu_seconds(), time.monotonic()
        inventory = take_inventory(settings)
        wall = time.monotonic() - began
        if inventory.errors:
            raise RuntimeError(f"inventory failed: {inventory.unreachable}")
        runs.append({"wall": wall, "machine_cpu": cpu_seconds_used() - machine,
                     "own_cpu": process_cpu_seconds() - own})
    transport.close_all()
    return runs


def run(report: Report, quick: bool = False) -> None:
    from imagesync.config import load_settings
    from testcluster.cluster import Cluster

    root = workdir("inventory")
    cores = os.cpu_count() or 1
    try:
        with Cluster(root / "cluster", nodes=max(SIZES)) as cluster:
            progress(f"inventory: {max(SIZES)} nodes up in {cluster.startup_seconds:.1f} s; seeding")
            images = [f"bcm11/inv/app{i:02d}:1" for i in range(IMAGES)]
            cluster.seed({node.name: images for node in cluster.nodes})
            settings = {n: load_settings(cluster.write_config(root / f"imagesync-{n}.toml",
                                                              nodes=[x.name for x in cluster.nodes[:n]]))
                        for n in SIZES}
            for lister, warmth in (("real", (True,)), ("cat", (True, False))):
                if lister == "cat":
                    _cat_crictl(cluster)
                for cold in warmth:
                    figures = {}
                    for n in SIZES:
                        progress(f"inventory: {lister} lister, {'cold' if cold else 'warm'}, {n} nodes")
                        figures[n] = _measure(settings[n], (2 if quick else 3) if lister == "real" else 5, cold)
                    walls = {n: Sample.of(r["wall"] for r in figures[n]) for n in SIZES}
                    ratio = Sample.of(a["wall"] / b["wall"]
                                      for a, b in zip(figures[max(SIZES)], figures[1], strict=True))
                    report.say(f"{lister} lister, {'cold' if cold else 'warm'} connections:")
                    for n in SIZES:
                        machine = Sample.of(r["machine_cpu"] for r in figures[n])
                        own = Sample.of(r["own_cpu"] for r in figures[n])
                        report.say(f"  {n:3d} nodes  {walls[n].show('.3f', ' s')}; machine CPU {machine.median:.2f} s "
                                   f"(floor on {cores} cores: {machine.median / cores:.3f} s), "
                                   f"imagesync's process {own.median:.3f} CPU-s")
                    report.say(f"  50 nodes / 1 node  {ratio.show('.1f')}   target <= {TARGET:g}: "
                               f"{verdict(ratio.median <= TARGET)}")
                    report.figure(f"{lister}_{'cold' if cold else 'warm'}", figures)
    finally:
        remove_workdir(root)
