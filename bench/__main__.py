"""``python -m bench [NAME ...] [--quick]``: run benchmarks on the real test cluster, print figures.

Names: plan, fanout, inventory, orchestration, overhead, throughput, memory, manynodes, webhook, transfer,
peers, peerssh, headnode, agents (all by default, in that order; a full run takes about 15 minutes on 2 cores).
``--quick`` repeats less and skips the slowest parts. Figures are also
written as JSON to bench/results/ (git-ignored); bench/README.md holds the
latest ones with the targets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import (
    agents,
    fanout,
    headnode,
    inventory,
    manynodes,
    memory,
    orchestration,
    overhead,
    peers,
    plan,
    throughput,
    transfer,
    webhook,
)
from .common import Report, machine

BENCHMARKS: dict[str, Callable[..., None]] = {
    "plan": plan.run,
    "fanout": fanout.run,
    "inventory": inventory.run,
    "orchestration": orchestration.run,
    "overhead": overhead.run,
    "wall": overhead.run_wall,
    "throughput": throughput.run,
    "memory": memory.run,
    "manynodes": manynodes.run,
    "headnode": headnode.run,
    "webhook": webhook.run,
    "transfer": transfer.run,
    "peers": peers.run,
    "peerssh": transfer.run_peer_ssh,
    "agents": agents.run,
}
RESULTS = Path(__file__).with_name("results")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, slowest parts skipped")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)

    about = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in about.items()), flush=True)
    from testcluster import ensure_system_packages

    ensure_system_packages()
    reports = []
    began = time.monotonic()
    for name in names:
        report = Report(name)
        started = time.monotonic()
        BENCHMARKS[name](report, quick=args.quick)
        report.say(f"({time.monotonic() - started:.0f} s)")
        reports.append(report)
    print(f"\nall done in {time.monotonic() - began:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    document = {"machine": about, "quick": args.quick,
                "benchmarks": {r.name: {"lines": r.lines, "figures": r.figures} for r in reports}}
    path = RESULTS / f"{stamp}-{'-'.join(names) if args.names else 'all'}.json"
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
