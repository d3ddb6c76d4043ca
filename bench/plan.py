"""Plan cost: ``imagesync.planning.planner.make_plan`` for 100 nodes x 2,000 images.

Synthetic inventories (``bench.synthetic``): every node reports 2,000 images
under the prefixes (a tag and a digest reference each) plus 20 outside them,
and lacks 200 of the catalogue, so the plan holds 20,000 pulls. Each
repetition runs in a process of its own, which builds the inventories first:
its RSS growth across ``make_plan`` and tracemalloc's peak are the plan's
memory.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from .common import Report, Sample, proc_status, progress

NODES, IMAGES, MISSING = 100, 2000, 200


def child() -> None:
    from imagesync.planning.planner import make_plan

    from . import synthetic

    inventories = synthetic.inventories(NODES, IMAGES, MISSING)
    gc.collect()
    before = proc_status()["VmRSS"]
    began = time.perf_counter()
    plan = make_plan(inventories, synthetic.PREFIXES)
    seconds = time.perf_counter() - began
    after = proc_status()
    del plan
    gc.collect()
    tracemalloc.start()
    plan = make_plan(inventories, synthetic.PREFIXES)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"seconds": seconds, "pulls": plan.total, "rss_growth_kib": after["VmRSS"] - before,
                      "traced_peak_kib": peak // 1024, "references": 2 * NODES * IMAGES}))


def run(report: Report, quick: bool = False) -> None:
    repeats = 3 if quick else 5
    root = str(Path(__file__).absolute().parent.parent)
    runs = []
    for i in range(repeats):
        progress(f"plan: run {i + 1} of {repeats}")
        out = subprocess.run([sys.executable, "-c", "from bench.plan import child; child()"], cwd=root,
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        runs.append(json.loads(out.stdout))
    report.say(f"make_plan, {NODES} nodes x {IMAGES:,} images ({runs[0]['references']:,} references, "
               f"{runs[0]['pulls']:,} pulls planned):")
    report.say(f"  time      {Sample.of(r['seconds'] for r in runs).show('.3f', ' s')}")
    report.say(f"  memory    RSS growth {Sample.of(r['rss_growth_kib'] / 1024 for r in runs).show('.1f', ' MiB')}, "
               f"tracemalloc peak {Sample.of(r['traced_peak_kib'] / 1024 for r in runs).show('.1f', ' MiB')}")
    report.figure("plan", runs)
