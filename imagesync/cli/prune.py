"""``imagesync prune``: remove from the nodes the images imagesync manages and no longer
wants there (:mod:`imagesync.prune`), or with ``--dry-run`` show which would go.

It runs in this process, as ``plan`` does: it reaches the nodes as the workers do,
and needs Redis, for the lock and for the images declared in past runs.
"""

from __future__ import annotations

import argparse
import json

from rich.markup import escape
from rich.table import Table

from .. import logs
from ..outcomes import NOT_FAILURES
from ..retired import Verdict
from . import common
from .common import EXIT_FAILED, EXIT_OK, EXIT_RUNNING, read_settings, redis_client, say


def cmd_prune(args: argparse.Namespace) -> int:
    from ..agents import check_targets
    from ..prune import prune

    settings = read_settings()
    redis = redis_client(settings)
    check_targets(settings, redis, args.node or ())
    if not args.dry_run:
        # its lines go where the workers write theirs: the day's image-sync.log
        logs.setup(settings.log_dir, stderr=False)
    pruned = prune(settings, redis, targets=args.node, dry_run=args.dry_run,
                   send_inventory=_inventory_sender(settings))
    if pruned.status == "already-running":
        say(f"imagesync: {pruned.message}")
        return EXIT_RUNNING
    run = None
    if pruned.run_id is not None:
        from ..runstores import run_store

        run = run_store(settings, redis).get(pruned.run_id)
    failed = bool(pruned.missed) or (run is not None and (run.failures > 0 or run.status != "completed"))
    if args.json:
        common.out.print_json(json.dumps(pruned.to_dict() | ({"record": run.to_dict()} if run else {})))
        return EXIT_FAILED if failed else EXIT_OK
    for node, reason in pruned.skipped.items():
        say(f"skipped {node}: {reason}")
    if pruned.status == "dry-run":
        _show(pruned.verdicts, f"prune (dry run): {pruned.message}",
              [("would remove" if v.remove else "would keep", v.reason) for v in pruned.verdicts])
    elif run is None:
        common.line(pruned.message)
    else:
        from ..prune import summary_lines

        outcomes = {(o.node, o.image): o for o in run.results}
        rows = [(o.status.replace("_", " "), o.reason) if (o := outcomes.get((v.node, v.image))) else
                ("not reported", "") for v in pruned.verdicts]
        _show(pruned.verdicts, summary_lines(run)[0], rows)
    if pruned.missed:
        say(f"imagesync: prune skipped {', '.join(pruned.missed)}: bring those nodes back and prune again")
    return EXIT_FAILED if failed else EXIT_OK


def _show(verdicts: list[Verdict], title: str, rows: list[tuple[str, str]]) -> None:
    if not verdicts:
        common.line(title)
        return
    table = Table(title=title)
    for column in ("node", "image", "outcome", "why"):
        table.add_column(column, overflow="fold")
    for verdict, (outcome, why) in zip(verdicts, rows, strict=True):
        shown = outcome if outcome in NOT_FAILURES or outcome.startswith("would") else f"[red]{outcome}[/]"
        table.add_row(escape(verdict.node), escape(verdict.image), shown, escape(why))
    common.show(table)


def _inventory_sender(settings):  # type: ignore[no-untyped-def]
    """What queues an agent node's inventory task, with ``agents = true`` only (as ``plan``)."""
    if not settings.agents:
        return None
    from ..tasks import send_inventory

    return send_inventory
