"""Orchestration efficiency: does imagesync keep every node's ``max_parallel`` slots busy?

Four nodes each lack the same N images (declared in the configuration), and
every pull takes a known time. The best any scheduler can do is
``max over nodes of ceil(missing / max_parallel) x pull time``; the figure is
the makespan (from the sync trigger to the run record's ``finished``) over
that ideal. Target: at most 1.02.

Pulls of a known time come from a crictl on each node that sleeps for the pull
(``sleep_crictl``): on a real cluster the runtime's own work runs on the node's
CPUs, but here all nodes share this machine's cores, and the test cluster's
Python crictl costs ~0.15 CPU-seconds per call, which would turn this into a
measure of the machine. With ``held``, every node also holds that many other
tags of the prefix under the digest the registry names for them: nothing to
pull, but ``refresh`` asks the registry about each before the first pull.
``--real`` adds one run through real containerd and
the registry proxy's ``delay`` for comparison.
"""

from __future__ import annotations

import math
import re
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

MAX_PARALLEL = 4
NODES = 4
TARGET = 1.02
_REFRESHED = re.compile(r"current digests of (\d+) of (\d+) tags from their registries in ([\d.]+) s")

_SLEEP_CRICTL = r"""#!/bin/bash
# crictl for the orchestration benchmark: a pull takes exactly @SECONDS@ s and
# next to nothing else; the node's images are the lines of @HELD@ (no digest
# known) and the "REF REPO@DIGEST" lines of @DIGESTS@ (held under that digest).
held=@HELD@
digests=@DIGESTS@
while [ $# -gt 0 ]; do
  case "$1" in
    -i|--image-endpoint|-r|--runtime-endpoint|-t|--timeout) shift 2 ;;
    --*=*) shift ;;
    *) break ;;
  esac
done
case "$1" in
  images)
    printf '{"images":['
    { sed 's/.*/{"id":"sha256:bench","repoTags":["&"],"repoDigests":[],"size":"1"}/' "$held"
      sed 's/^\([^ ]*\) \([^ ]*\)$/{"id":"sha256:bench","repoTags":["\1"],"repoDigests":["\2"],"size":"1"}/' "$digests"
    } | paste -sd, -
    printf ']}\n' ;;
  pull)
    log=${CRICTL_PULL_LOG:-/dev/null}
    echo "start $EPOCHREALTIME $2 $$" >> "$log"
    sleep @SECONDS@
    echo "$2" >> "$held"
    echo "end $EPOCHREALTIME $2 $$ ok" >> "$log"
    echo "Image is up to date for sha256:bench" ;;
  inspecti)
    grep -qxF -- "${@: -1}" "$held" || awk -v r="${@: -1}" '$1 == r {print $2; f = 1} END {exit !f}' "$digests" \
      || { echo "no such image \"${@: -1}\" present" >&2; exit 1; } ;;
  --version|version) echo "crictl version v1.26.0 (benchmark shim)" ;;
  *) echo "benchmark crictl: unsupported: $*" >&2; exit 1 ;;
esac
"""


def install_sleep_crictl(node: Any, seconds: float) -> None:
    """Replace the node's crictl with one whose pulls sleep ``seconds`` (see module doc)."""
    held = node.workdir / "bench-held.txt"
    held.write_text("")
    digests = node.workdir / "bench-held-digests.txt"
    digests.write_text("")
    crictl = node.bin_dir / "crictl"
    crictl.write_text(_SLEEP_CRICTL.replace("@SECONDS@", repr(seconds)).replace("@HELD@", str(held))
                      .replace("@DIGESTS@", str(digests)))
    crictl.chmod(0o755)


def set_held(node: Any, refs: list[str]) -> None:
    (node.workdir / "bench-held.txt").write_text("".join(r + "\n" for r in refs))


def set_held_digests(node: Any, digests: dict[str, str]) -> None:
    """The node holds each ref (``repo:tag``) under its digest, as the runtime reports a
    pulled image: its tag and its ``repo@digest``."""
    lines = (f"{ref} {ref.rpartition(':')[0]}@{digest}\n" for ref, digest in digests.items())
    (node.workdir / "bench-held-digests.txt").write_text("".join(lines))


def ideal(missing_per_node: dict[str, int], pull_seconds: float, max_parallel: int = MAX_PARALLEL) -> float:
    return max(math.ceil(n / max_parallel) for n in missing_per_node.values()) * pull_seconds


def _forget_holdings(d: Deployment) -> None:
    """Forget what the nodes held at the last run's end: emptied by the bench, not evicted by a
    kubelet, their images must not count as evictions (which the room check stops pulling)."""
    from imagesync import keys

    with d.cluster.redis.client() as client:
        client.delete(*[key for node in d.cluster.nodes
                        for key in (keys.node_held(node.name), keys.node_evictions(node.name))])


def _one_run(d: Deployment, images: list[str], pull_seconds: float) -> dict[str, float]:
    for node in d.cluster.nodes:
        set_held(node, [])
        clear_pull_log(node)
    _forget_holdings(d)
    run, makespan = d.sync()
    pulls = pull_intervals(d.cluster.nodes)
    assert len(pulls) == len(images) * len(d.cluster.nodes), (len(pulls), run.counts)
    sent = run.finished - makespan
    best = ideal({n.name: len(images) for n in d.cluster.nodes}, pull_seconds)
    return {
        "makespan": makespan,
        "ratio": makespan / best,
        "first_pull": min(s for _, s, _ in pulls) - sent,
        "last_pull_end": max(e for _, _, e in pulls) - sent,
        "finished": makespan,
    }


def measure(images_per_node: int, pull_seconds: float, repeats: int, report: Report,
            whatif: str | None = None, latency: float = 0.0, held: int = 0) -> Sample:
    """``held``: every node also holds that many other tags under the prefix, under the
    digest the registry names for them: nothing to pull, but ``refresh`` asks about each."""
    root = workdir("orch")
    try:
        with Deployment(root, nodes=NODES, whatif=whatif) as d:
            for node in d.cluster.nodes:
                install_sleep_crictl(node, pull_seconds)
            if held:
                others = d.cluster.push_many([f"bcm11/bench/held{i:04d}:1" for i in range(held)])
                for node in d.cluster.nodes:
                    set_held_digests(node, {ref: d.cluster.digests[ref] for ref in others})
            images = [f"{d.cluster.registry_address}/bcm11/bench/img{i:04d}:1" for i in range(images_per_node)]
            d.configure(images=images, max_parallel=MAX_PARALLEL, time_out=120)
            progress(f"orchestration {NODES}x{images_per_node}: starting workers")
            d.start_workers()
            # a registry ``latency`` s away: each of a plan's questions to it takes that long
            d.cluster.proxy.latency(latency)
            # warm-up: one pull per worker process, so every SSH connection is open, as on a
            # deployment whose workers have been up for a while
            for node in d.cluster.nodes:
                set_held(node, images[MAX_PARALLEL:])
            d.sync()
            runs = []
            for i in range(repeats):
                progress(f"orchestration {NODES}x{images_per_node}: run {i + 1} of {repeats}")
                runs.append(_one_run(d, images, pull_seconds))
            refreshes = _refresh_lines(d)[-repeats:]
    finally:
        remove_workdir(root)
    best = ideal({f"n{i}": images_per_node for i in range(NODES)}, pull_seconds)
    ratio = Sample.of(r["ratio"] for r in runs)
    report.say(f"{NODES} nodes x {images_per_node} missing images, max_parallel={MAX_PARALLEL}, "
               f"pull = {pull_seconds:g} s (sleeping crictl): ideal {best:.1f} s"
               + (f", nodes hold {held} other tags" if held else "")
               + (f", registry {latency * 1000:g} ms away" if latency else "")
               + (f"   [WHAT-IF {whatif}, not imagesync as shipped]" if whatif else ""))
    report.say(f"  makespan        {Sample.of(r['makespan'] for r in runs).show('.2f', ' s')}")
    report.say(f"  makespan/ideal  {ratio.show('.3f')}   target <= {TARGET}: {verdict(ratio.median <= TARGET)}")
    report.say(f"  trigger -> first pull starts   {Sample.of(r['first_pull'] for r in runs).show('.3f', ' s')}")
    # the hand-offs alone: from the first pull's start, what the slots lose between pulls
    after_first = Sample.of((r["makespan"] - r["first_pull"]) / best for r in runs)
    report.say(f"  (first pull starts -> run finished)/ideal  {after_first.show('.3f')}")
    tail = Sample.of(r["finished"] - r["last_pull_end"] for r in runs)
    report.say(f"  last pull ends -> run finished {tail.show('.3f', ' s')}")
    if refreshes:
        asked = Sample.of(seconds for _, _, seconds in refreshes)
        report.say(f"  refresh: current digests of {refreshes[-1][0]} of {refreshes[-1][1]} tags "
                   f"{asked.show('.3f', ' s')} (control worker's log)")
    key = (f"{NODES}x{images_per_node}" + (f"_held{held}" if held else "") + (f"_{latency:g}s" if latency else "")
           + (f"_{whatif}" if whatif else ""))
    report.figure(key, {"ratio": ratio.values, "ideal": best,
                        "first_pull": [r["first_pull"] for r in runs],
                        "refresh": [seconds for _, _, seconds in refreshes]})
    return ratio


def _refresh_lines(d: Deployment) -> list[tuple[int, int, float]]:
    """(answered, asked, seconds) of every plan's refresh, from the control worker's log."""
    text = (d.services.workdir / "control.log").read_text(errors="replace")
    return [(int(a), int(b), float(s)) for a, b, s in _REFRESHED.findall(text)]


def measure_real(images_per_node: int, delay: float, report: Report) -> None:
    """The same through real containerd and the Python crictl, with the proxy's ``delay``."""
    root = workdir("orchr")
    try:
        with Deployment(root, nodes=NODES) as d:
            refs = d.cluster.push_many([f"bcm11/bench/real{i:03d}:1" for i in range(images_per_node)])
            d.configure(images=refs, max_parallel=MAX_PARALLEL, time_out=120)
            progress(f"orchestration real {NODES}x{images_per_node}: starting workers")
            d.start_workers()
            d.cluster.proxy.delay(delay)
            for node in d.cluster.nodes:
                clear_pull_log(node)
            run, makespan = d.sync()
            pulls = pull_intervals(d.cluster.nodes)
            durations = sorted(e - s for _, s, e in pulls)
            pull = durations[len(durations) // 2]
    finally:
        remove_workdir(root)
    best = ideal({f"n{i}": images_per_node for i in range(NODES)}, pull)
    report.say(f"real containerd, Python crictl, proxy delay {delay:g} s: {NODES} x {images_per_node}, "
               f"median pull {pull:.3f} s (crictl timestamps), ideal {best:.1f} s: makespan {makespan:.2f} s, "
               f"ratio {makespan / best:.3f} (n=1; bounded by this machine's CPU, see README)")


def run(report: Report, quick: bool = False) -> None:
    measure(40, 1.0, 2 if quick else 5, report)
    # the next pull already in the worker when one ends: what an idle slot between pulls costs
    measure(40, 1.0, 2 if quick else 3, report, whatif="prefetch-2")
    # a registry 100 ms away: one round of platform questions comes before the first pull
    measure(40, 1.0, 2 if quick else 3, report, latency=0.1)
    # nodes that hold many tags already: refresh asks their registry about each before any pull
    measure(40, 1.0, 2 if quick else 3, report, held=200)
    measure(40, 1.0, 2 if quick else 3, report, latency=0.1, held=200)
    if not quick:
        measure(200, 1.0, 2, report)
        measure(40, 1.0, 3, report, whatif="always-check")
        measure_real(40, 1.0, report)
