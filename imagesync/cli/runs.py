"""The commands about runs: ``sync`` starts one (and with ``--wait`` follows it), ``cancel`` ends it,
``history`` lists them or shows one.

A run is started through Celery and recorded in Redis; these commands read the
record to show progress and summaries. They print through the consoles of
``common``, looked up when they print, so that a test can replace them.

None of them reaches a node over SSH in this process (the workers do), so they
read the settings without the OpenSSH client configuration (``ssh=False``), and
never import paramiko or Fabric.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from ..runs import Run, summary_lines
from . import common
from .common import EXIT_FAILED, EXIT_OK, EXIT_RUNNING, CommandError, read_settings, redis_client, say

if TYPE_CHECKING:
    from ..config import Settings


def cmd_sync(args: argparse.Namespace) -> int:
    from ..agents import check_targets

    settings = read_settings(ssh=False)
    # a node name is checked first: against the configuration alone, unless agents
    # announce nodes, which only Redis knows
    redis = redis_client(settings) if settings.agents else None
    check_targets(settings, redis, args.node or ())
    redis = redis or redis_client(settings)
    from celery.exceptions import TimeoutError as CeleryTimeout

    from .. import keys
    from ..budgets import SYNC_TIME_LIMIT
    from ..celeryconfig import CONTROL_QUEUE, client_app

    result = client_app(settings).send_task("imagesync.sync", kwargs={"trigger": "cli", "nodes": args.node},
                                            queue=CONTROL_QUEUE)
    try:
        started = result.get(timeout=args.timeout, propagate=False)
    except CeleryTimeout:
        taken = redis.get(keys.sync_taken(result.id))
        if taken is None:
            result.revoke()
            raise CommandError(
                f"no control worker started the run within {args.timeout:g} s: start one with "
                "'imagesync worker --control' (or check 'celery -A imagesync inspect ping')"
            ) from None
        # A control worker has it and is still listing the nodes: wait for it.
        say(f"imagesync: {taken.decode(errors='replace')} took the run and is still listing images; waiting")
        try:
            started = result.get(timeout=SYNC_TIME_LIMIT, propagate=False)
        except CeleryTimeout:
            raise CommandError(f"the control worker did not start the run within {SYNC_TIME_LIMIT} s: "
                               "see its log ('imagesync history' shows runs that did start)") from None
    if result.failed():
        raise CommandError(f"the sync task failed: {started}")
    if started["status"] == "already-running":
        say(f"imagesync: {started['message']}")
        return EXIT_RUNNING
    if started["status"] == "cancelled":
        say(f"imagesync: {started['message']}")
        return EXIT_FAILED
    missed = started.get("missed") or {}
    if missed:
        say(f"imagesync: {started['message']}: bring those nodes back and sync again")
    else:
        common.line(started["message"])
    if not args.wait:
        if started["status"] == "nothing-to-do":
            return EXIT_FAILED if missed else EXIT_OK
        common.line(f"follow it with: imagesync history {started['run']}")
        return EXIT_FAILED if missed else EXIT_OK
    code = follow(settings, redis, started["run"])
    return EXIT_FAILED if missed else code


def follow(settings: Settings, redis, run_id: str) -> int:
    """Show a progress bar until the run ends, then its summary; non-zero if any pull failed.

    The run's record is read again each time its channel says it changed, and at least every
    :data:`POLL` seconds (a lost subscription costs no more than that).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..runs import channel
    from ..runstores import run_store

    store = run_store(settings, redis)
    news = redis.pubsub(ignore_subscribe_messages=True)
    try:
        news.subscribe(channel(run_id))  # before the first read: an end after it is heard
    except RedisError:
        news = None
    run = store.get(run_id, with_results=False)
    if run is None:
        raise CommandError(f"run {run_id} has no record in Redis")
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=common.err, transient=False) as progress:
            bar = progress.add_task(f"run {run_id}", total=run.expected or 1, detail="")
            while True:
                run = store.get(run_id, with_results=False)
                if run is None:
                    raise CommandError(f"run {run_id} vanished from Redis (restarted without persistence?)")
                detail = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in run.counts.items())
                progress.update(bar, total=run.expected or 1, completed=run.done if run.expected else 1,
                                detail=detail)
                if run.status != "running":
                    break
                news = _wait_for_news(news)
    finally:
        if news is not None:
            news.close()
    run = store.get(run_id)
    assert run is not None
    print_run(run)
    return EXIT_OK if run.status == "completed" and not run.failures else EXIT_FAILED


#: seconds between two reads of a followed run's record when its channel says nothing
POLL = 0.5


def _wait_for_news(news):  # type: ignore[no-untyped-def]
    """Wait until the run's channel says something, or :data:`POLL` seconds; take every message
    already there. Returns the subscription, or None once it failed (then only polling is left)."""
    if news is None:
        time.sleep(POLL)
        return None
    try:
        if news.get_message(timeout=POLL) is not None:
            while news.get_message(timeout=0) is not None:
                pass
        return news
    except RedisError:
        news.close()
        return None


def print_run(run: Run) -> None:
    lines = summary_lines(run)
    common.line(lines[0])
    for line in lines[1:]:
        common.line("  " + line.split(": ", 1)[1])


def operator() -> str:
    """Who runs this command, as user@host, for the record of what they did."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name, no passwd entry (a container)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def cmd_cancel(args: argparse.Namespace) -> int:
    from .. import logs
    from ..runstores import run_store
    from ..sync import NotCancelled, cancel_run

    settings = read_settings(ssh=False)
    redis = redis_client(settings)
    # the summary goes where the workers write theirs: the day's image-sync.log
    logs.setup(settings.log_dir, stderr=False)
    try:
        run_id = cancel_run(settings, redis, args.run, operator(), " ".join(args.reason.split()))
    except NotCancelled as exc:
        raise CommandError(str(exc)) from None
    run = run_store(settings, redis).get(run_id)
    if run is not None:
        print_run(run)
    common.line("the lock is released; pulls still running finish and report into the run "
                f"('imagesync history {run_id}')")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    from ..runstores import run_store

    settings = read_settings(ssh=False)
    store = run_store(settings, redis_client(settings))
    if args.run:
        run = store.get(args.run)
        if run is None:
            raise CommandError(f"no run {args.run} in the history (see 'imagesync history')")
        from ..backupstore import BackupStore
        from ..backupstore import summary_lines as backup_lines

        record = BackupStore(store.redis).get(args.run)
        if args.json:
            common.out.print_json(json.dumps(run.to_dict() | ({"backup": record} if record else {})))
        else:
            print_run(run)
            for line in backup_lines(run.id, record) if record else ():
                common.line("  " + line.split(": ", 1)[1])
        return EXIT_OK
    runs = store.recent(args.limit)
    if args.json:
        common.out.print_json(json.dumps([run.to_dict() for run in runs]))
        return EXIT_OK
    from rich.markup import escape
    from rich.table import Table

    from ..outcomes import SUCCESSES

    table = Table(title="recent runs")
    for column in ("run", "trigger", "status", "pulls", "ok", "failed", "not run", "skipped nodes", "took"):
        table.add_column(column)
    for run in runs:
        ok = sum(run.counts.get(s, 0) for s in SUCCESSES)
        # "not run": pulls that found their run already over (cancelled, abandoned) and were skipped
        not_run = run.counts.get("skipped", 0)
        status = {"cancelled": "[yellow]cancelled[/]", "abandoned": "[red]abandoned[/]"}.get(run.status, run.status)
        table.add_row(escape(run.id), escape(run.trigger or "-"), status, str(run.expected), str(ok),
                      str(run.failures - not_run), str(not_run), escape(", ".join(run.skipped) or "-"),
                      f"{run.duration:.1f} s")
    common.show(table)
    return EXIT_OK
