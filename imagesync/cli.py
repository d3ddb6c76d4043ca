"""The ``imagesync`` command.

Every error an operator can cause ends in one line on stderr saying what is
wrong and what to do, and a non-zero exit: 2 for configuration, 1 for
failures, 3 when a run is already in progress.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import logs, room, runtimes
from .config import Node, Settings, load_settings, mask_url
from .errors import ConfigError, ImagesyncError, NodeError
from .plan import Plan

if TYPE_CHECKING:
    from .facts import NodeFacts
from .runs import Run

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_RUNNING = 0, 1, 2, 3

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def say(message: str) -> None:
    """One plain line on stderr: never wrapped, whatever the terminal's width."""
    print(message, file=sys.stderr, flush=True)


#: the distributions whose versions a bug report needs, as ``--version`` names them
_VERSIONS = (("celery", "celery"), ("kombu", "kombu"), ("redis-py", "redis"), ("paramiko", "paramiko"))


def version_line() -> str:
    """imagesync's version and those of the libraries it stands on, in one line."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    parts = []
    for name, distribution in _VERSIONS:
        try:
            parts.append(f"{name} {version(distribution)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    python = ".".join(str(n) for n in sys.version_info[:3])
    return f"imagesync {__version__} ({', '.join(parts)}; Python {python})"


class _Version(argparse.Action):
    """``--version``: the line is made only when asked for (it reads package metadata)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of imagesync, Celery, kombu, redis-py and paramiko, and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_line())
        parser.exit()


class CommandError(ImagesyncError):
    """Ends a command with one line and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagesync",
        description="Keep container images in sync across Kubernetes worker nodes.",
    )
    parser.add_argument("-c", "--config",
                        help="configuration file (default: $IMAGESYNC_CONFIG or /etc/imagesync/imagesync.toml)")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="show the effective configuration")
    config.add_argument("action", choices=["show"])

    sub.add_parser("check", help="check the configuration and every node (SSH, runtime, image list)")

    plan = sub.add_parser("plan", help="dry run: what a sync would pull where")
    plan.add_argument("--node", action="append", metavar="NAME", help="only plan pulls onto this node (repeatable)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    status = sub.add_parser("status", help="node x image matrix of the matching images")
    status.add_argument("--json", action="store_true")
    status.add_argument("--backup", action="store_true",
                        help="per wanted image, whether the backup registry holds the digest the nodes hold")

    sync = sub.add_parser("sync", help="start a sync run through Celery")
    sync.add_argument("--wait", action="store_true", help="follow the run to its end and print the summary")
    sync.add_argument("--node", action="append", metavar="NAME", help="only pull onto this node (repeatable)")
    sync.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                      help="how long to wait for a control worker to start the run (default 120)")

    cancel = sub.add_parser("cancel", help="cancel a run: queued pulls are skipped, the lock is released at once")
    cancel.add_argument("run", nargs="?", help="a run id (default: the run in progress)")
    cancel.add_argument("--reason", default="", metavar="TEXT", help="why, kept in the run record")

    history = sub.add_parser("history", help="recent runs, or one run in detail")
    history.add_argument("run", nargs="?", help="a run id (default: list recent runs)")
    history.add_argument("-n", "--limit", type=int, default=20)
    history.add_argument("--json", action="store_true")

    worker = sub.add_parser("worker", help="start a Celery worker for one node, or the control worker")
    which = worker.add_mutually_exclusive_group(required=True)
    which.add_argument("--node", metavar="NAME", help="serve this node's pulls (concurrency max_parallel)")
    which.add_argument("--control", action="store_true", help="serve sync and housekeeping tasks")
    which.add_argument("--nodes", metavar="NAME,NAME", help="serve these nodes' pulls with one shared pool; "
                       "each node still runs at most max_parallel (less memory, see README)")
    which.add_argument("--all-nodes", action="store_true",
                       help="serve the pulls of every node reached over SSH with one shared pool (as --nodes)")
    worker.add_argument("--concurrency", type=int, metavar="N",
                        help="with --nodes/--all-nodes: pulls at once over all its nodes "
                        "(default: the larger of the node count and max_parallel)")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="extra arguments for celery worker")

    agent = sub.add_parser("agent", help="run on a node: register it in Redis and serve its queue there, "
                           "without SSH (agent mode, agents = true)")
    agent.add_argument("--name", help="the node's name (default: $NODE_NAME, else the host name)")
    for flag, what in (("runtime", "crictl or ctr"), ("endpoint", "the runtime's socket"),
                       ("namespace", "containerd namespace"), ("hosts-dir", "registry hosts directory"),
                       ("image-fs", "the image filesystem"), ("platform", "os/arch, when uname -m is wrong")):
        agent.add_argument(f"--{flag}", help=f"{what} (default: agent_{flag.replace('-', '_')} of the configuration)"
                           if flag != "platform" else what)
    agent.add_argument("celery_args", nargs=argparse.REMAINDER, help="extra arguments for celery worker")

    beat = sub.add_parser("beat", help="start Celery beat (the schedule from the configuration)")
    beat.add_argument("celery_args", nargs=argparse.REMAINDER)

    exporter = sub.add_parser("exporter", help="serve Prometheus metrics: images per node, runs, lock, queues")
    exporter.add_argument("--address", help="listen on this address (default: exporter_address)")
    exporter.add_argument("--port", type=int, help="listen on this port (default: exporter_port)")

    webhook = sub.add_parser("webhook", help="receive registry push notifications: sync each pushed image at once")
    webhook.add_argument("--address", help="listen on this address (default: webhook_address)")
    webhook.add_argument("--port", type=int, help="listen on this port (default: webhook_port)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.config:
        os.environ["IMAGESYNC_CONFIG"] = args.config
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        for problem in exc.problems:
            say(f"imagesync: {problem}")
        return EXIT_CONFIG
    except CommandError as exc:
        say(f"imagesync: {exc}")
        return exc.code
    except ImagesyncError as exc:
        say(f"imagesync: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _settings() -> Settings:
    return load_settings()


def _redis(settings: Settings, ping: bool = True, socket_timeout: float = 30):
    """A Redis client with timeouts; with ``ping``, one that answers, or one line and exit 1.

    The long-running servers (exporter, webhook) do not ping: they start while
    Redis is down and report it, rather than not start.
    """
    from redis.exceptions import RedisError

    from .redisclient import connect, error_line

    client = connect(settings, socket_connect_timeout=5, socket_timeout=socket_timeout)
    if not ping:
        return client
    try:
        client.ping()
    except RedisError as exc:
        fix = "fix redis_url and redis_master_name" if settings.redis_master_name else "fix redis_url"
        raise CommandError(
            f"cannot reach Redis at {mask_url(settings.redis_url)} ({error_line(exc)}): start redis-server or {fix}"
        ) from exc
    return client


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings()
    table = Table(title=f"imagesync configuration ({settings.path or 'defaults'})")
    for column in ("key", "value", "from"):
        table.add_column(column)
    for key, value, source in settings.describe():
        # the file is named in the title; keep the column narrow
        table.add_row(key, value, "file" if source.startswith("file") else source)
    out.print(table)
    _say_ssh_notes(settings)
    return EXIT_OK


def _say_ssh_notes(settings: Settings) -> None:
    """What the OpenSSH client configuration asks for that imagesync does otherwise (StrictHostKeyChecking)."""
    for node in settings.nodes:
        if node.transport == "ssh":
            for note in settings.ssh_target(node).notes:
                say(f"imagesync: note: {note}")


def ssh_table(settings: Settings) -> Table:
    """Each SSH node's connection as imagesync's settings and the SSH config make it, and where each value came from."""
    table = Table(title="SSH settings in effect")
    for column in ("node", "connects to", "key", "known_hosts", "from"):
        table.add_column(column, overflow="fold")
    for node in settings.nodes:
        if node.transport != "ssh":
            continue
        target = settings.ssh_target(node)
        keys = ", ".join(str(path) for path in target.key_files) or "SSH's usual keys and agent"
        known = ", ".join(str(path) for path in target.known_hosts)
        table.add_row(*(escape(cell) for cell in (node.name, target.route(), keys, known, target.provenance())))
    return table


def describe_platform(facts: NodeFacts) -> str:
    if facts.platform is None:
        return "unknown"
    return facts.platform + (" (config)" if facts.platform_from == "config" else "")


def describe_disk(facts: NodeFacts, path: str) -> str:
    if facts.disk_total is None or facts.disk_free is None:
        return f"unknown ({path})"
    return f"{_gib(facts.disk_free)} free of {_gib(facts.disk_total)}"


def _gib(size: int) -> str:
    return f"{size / 1024**3:.1f} GiB"


def facts_notes(node: Node, facts: NodeFacts, pinned: int = 0) -> list[str]:
    """What the check says about a node's facts: what imagesync cannot do there, and why;
    ``pinned``: how many declared images ask for pin = true."""
    notes = []
    if facts.platform is None:
        notes.append(f"platform unknown (uname -m said {facts.raw.get('machine') or 'nothing'}): "
                     "set platform for this node")
    if not facts.ctr:
        notes.append("no ctr on the node: images cannot be copied to or from it")
    if facts.disk_total is None:
        notes.append(f"cannot read the image filesystem at {node.image_fs}: set image_fs for this node "
                     "(until then, pulls to it are not checked for room)")
    if facts.can_pin is False:
        notes.append(f"containerd {facts.containerd} cannot pin images (1.7 or later can)"
                     + (f": the {pinned} declared with pin = true are pulled unpinned" if pinned else ""))
    elif facts.can_pin is None:
        notes.append("containerd's version unknown (neither ctr version nor containerd --version answered): "
                     "whether images can be pinned is unknown")
    elif pinned and node.runtime != "ctr":
        notes.append(f'pin = true needs runtime = "ctr" on this node (the CRI cannot label images): '
                     f"the {pinned} declared with it are pulled unpinned")
    return notes


def cmd_check(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from .inventory import examine, runtime_missing
    from .transport import transport_for

    print(version_line(), flush=True)  # first, and whole: it is what a bug report quotes
    settings = _settings()
    out.print(f"configuration: ok ({settings.path}, {len(settings.nodes)} nodes"
              + (", and the agents registered in Redis)" if settings.agents else ")"))
    if any(node.transport == "ssh" for node in settings.nodes):
        out.print(ssh_table(settings))
        _say_ssh_notes(settings)

    def probe(node: Node):
        address = "local"
        if node.transport == "ssh":  # the user and the rest are in the table of SSH settings
            target = settings.ssh_target(node)
            address = f"{target.host}:{target.port}" + (f" via {target.jump.name}" if target.jump else "")
        row = {"node": node.name, "address": address,
               "ssh": "-", "runtime": "-", "images": "-", "platform": "-", "image fs": "-", "detail": ""}
        runtime = runtimes.for_node(node)
        try:
            transport = transport_for(settings, node)
            transport.run("true", timeout=settings.ssh.connect_timeout + 10)
            row["ssh"] = "ok"
            version = transport.run(runtime.version_command(), timeout=30)
            if version.exit_code == runtimes.COMMAND_NOT_FOUND:
                raise runtime_missing(node.name, runtime.name)
            row["runtime"] = f"{runtime.name} ok"
            images, facts = examine(settings, node)
            row["images"] = str(len(images))
            row["platform"] = describe_platform(facts)
            row["image fs"] = describe_disk(facts, node.image_fs)
            notes = facts_notes(node, facts, len(settings.pinned_images()))
            row["detail"] = "; ".join(notes)
            return row, True
        except NodeError as exc:
            if row["ssh"] == "-":
                row["ssh"] = "FAILED"
            elif row["runtime"] == "-":
                row["runtime"] = "FAILED"
            else:
                row["images"] = "FAILED"
            row["detail"] = exc.message
            return row, False

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(settings.nodes)))) as pool:
        results = list(pool.map(probe, settings.nodes))
    for row, _ in results:
        row["via"] = next(node.transport for node in settings.nodes if node.name == row["node"])
    if settings.agents:
        from .agents import check_rows

        results += check_rows(settings, _redis(settings))
    table = Table()
    # how each node is reached, beside the nodes' names when agents are among them
    columns = ("node", *(("via",) if settings.agents else ()), "address", "ssh", "runtime", "images", "platform",
               "image fs", "detail")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row, ok in results:
        style = None if ok else "red"
        table.add_row(*(escape(row[c]) for c in columns), style=style)
    out.print(table)
    failed = [row["node"] for row, ok in results if not ok]
    if failed:
        say(f"imagesync: {len(failed)} of {len(results)} nodes failed the check: {', '.join(failed)}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from .agents import check_targets
    from .sync import plan_now

    settings = _settings()
    memory = _memory(settings)
    check_targets(settings, memory, args.node or ())
    plan = plan_now(settings, args.node, memory)
    if args.json:
        out.print_json(json.dumps(plan.to_dict()))
        return EXIT_OK
    _print_notes(plan)
    if not plan.total:
        out.print(f"nothing to pull: {len(plan.nodes)} nodes hold all {len(plan.wanted)} matching images")
        return EXIT_OK
    table = Table(title=f"plan: {plan.total} pulls")
    table.add_column("node")
    table.add_column("pulls", justify="right")
    table.add_column("images", overflow="fold")
    table.add_column("from", overflow="fold")
    for node in plan.nodes:
        images = plan.missing.get(node, [])
        sources = [plan.route(node, image).describe() for image in images]
        table.add_row(node, str(len(images)), escape("\n".join(images) or "-"), escape("\n".join(sources)))
    out.print(table)
    return EXIT_OK


def _print_notes(plan: Plan) -> None:
    for node, reason in plan.skipped.items():
        say(f"skipped {node}: {reason}")
    for drift in plan.drift:
        digests = ", ".join(f"{node} {digest[:19]}" for node, digest in drift.digests.items())
        say(f"tag drift: {drift.reference}: {digests}")
    for refusal in plan.refused:
        say(f"refused image name from {refusal.node}: {refusal.reference!r} ({refusal.reason})")
    for node, images in sorted(plan.excluded.items()):
        for image, why in sorted(images.items()):
            say(f"{why.kind} on {node}: {image}: {why.reason}")
    for line in room.evicted_lines(plan.evicted):
        say(line)


def _memory(settings: Settings):
    """Redis, for what earlier runs learned (evictions, platforms); None, said once, when it does not answer."""
    try:
        return _redis(settings, socket_timeout=10)
    except CommandError as exc:
        say(f"imagesync: {exc}; evictions and platform verdicts seen by earlier runs are not shown")
        return None


def cmd_status(args: argparse.Namespace) -> int:
    from .sync import plan_now

    settings = _settings()
    if args.backup and settings.backup is None:
        raise CommandError("no backup registry is configured: add a [backup] table with its registry "
                           "(see docs/configuration.md)")
    memory = _memory(settings)
    plan = plan_now(settings, redis=memory)
    if args.backup:
        return backup_status(settings, plan, args.json)
    if args.json:
        whole = plan.to_dict()
        out.print_json(json.dumps({"nodes": plan.nodes, "skipped": plan.skipped, "holdings": plan.holdings,
                                   "excluded": whole["excluded"], "evicted": whole["evicted"], "facts": whole["facts"],
                                   "drift": whole["drift"]}))
        return EXIT_OK
    _print_notes(plan)
    from .agents import kinds

    out.print(status_table(plan, kinds(settings, memory)))
    return EXIT_OK


def backup_status(settings: Settings, plan: Plan, as_json: bool) -> int:
    """``status --backup``: one row per wanted image the backup keeps; non-zero unless it holds them all."""
    from . import backup

    with backup.skopeo(settings) as tool:
        checks = backup.check(settings, backup.candidates(settings, plan), tool)
    if as_json:
        out.print_json(json.dumps({"backup": settings.backup.registry if settings.backup else None,
                                   "images": [found.to_dict() for found in checks]}))
    else:
        _print_notes(plan)
        colour = {backup.HELD: "green", backup.MISSING: "red", backup.STALE: "yellow", backup.UNKNOWN: "red"}
        table = Table(title=f"backup {settings.backup.registry if settings.backup else ''}: "
                            f"{sum(found.state == backup.HELD for found in checks)} of {len(checks)} images held")
        for column in ("image", "nodes hold", "backup holds", "state"):
            table.add_column(column, overflow="fold")
        for found in checks:
            short = (found.backup_digest or "-").split(":")[-1][:12]
            state = found.state + (f": {found.reason}" if found.reason and found.state == backup.UNKNOWN else "")
            table.add_row(found.image, (found.digest or "?").split(":")[-1][:12], short,
                          f"[{colour[found.state]}]{state}[/]")
        out.print(table)
    return EXIT_OK if all(found.state == backup.HELD for found in checks) else EXIT_FAILED


def status_table(plan: Plan, kinds: dict[str, str] | None = None) -> Table:
    """Images down, nodes across; a cell shows the digest a node holds, that it lacks the
    image, or why it does not pull it (``n/a``: nothing for its platform; ``skipped``).
    Under each node: its platform, and how it is reached (``ssh``, ``local``, ``agent``)."""
    drifted = {d.reference for d in plan.drift}
    table = Table(title=f"{len(plan.wanted)} images x {len(plan.nodes)} nodes")
    table.add_column("image", overflow="fold")
    for node in plan.nodes:
        facts = plan.facts.get(node)
        platform = facts.platform if facts is not None and facts.platform else "platform ?"
        via = "agent" if facts is not None and facts.via_agent else (kinds or {}).get(node, "ssh")
        table.add_column(f"{node}\n[dim]{escape(platform)}, {via}[/]", justify="center")
    for node in plan.skipped:
        table.add_column(f"{node} (skipped)", justify="center", style="dim")
    for image in plan.wanted:
        cells = []
        for node in plan.nodes:
            held, digest = plan.held(node, image)
            excluded = plan.excluded.get(node, {}).get(image)
            if held:
                text = digest.split(":")[-1][:8] if digest else "yes"
                cells.append(f"[yellow]{text}[/]" if image in drifted else f"[green]{text}[/]")
            elif excluded is not None:
                cells.append(f"[dim]{excluded.kind}[/]")
            elif image in plan.evicted.get(node, ()):
                cells.append("[red]evicted[/]")
            else:
                cells.append("[red]missing[/]")
        cells += ["?" for _ in plan.skipped]
        table.add_row(image, *cells)
    return table


def cmd_sync(args: argparse.Namespace) -> int:
    from .agents import check_targets

    settings = _settings()
    # a node name is checked first: against the configuration alone, unless agents
    # announce nodes, which only Redis knows
    redis = _redis(settings) if settings.agents else None
    check_targets(settings, redis, args.node or ())
    redis = redis or _redis(settings)
    from celery.exceptions import TimeoutError as CeleryTimeout

    from . import keys
    from .celery import app
    from .celeryconfig import CONTROL_QUEUE, SYNC_TIME_LIMIT

    result = app.send_task("imagesync.sync", kwargs={"trigger": "cli", "nodes": args.node}, queue=CONTROL_QUEUE)
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
        out.print(started["message"])
    if not args.wait:
        if started["status"] == "nothing-to-do":
            return EXIT_FAILED if missed else EXIT_OK
        out.print(f"follow it with: imagesync history {started['run']}")
        return EXIT_FAILED if missed else EXIT_OK
    code = follow(settings, redis, started["run"])
    return EXIT_FAILED if missed else code


def follow(settings: Settings, redis, run_id: str) -> int:
    """Show a progress bar until the run ends, then its summary; non-zero if any pull failed."""
    from .sync import run_store

    store = run_store(settings, redis)
    run = store.get(run_id, with_results=False)
    if run is None:
        raise CommandError(f"run {run_id} has no record in Redis")
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        bar = progress.add_task(f"run {run_id}", total=run.expected or 1, detail="")
        while True:
            run = store.get(run_id, with_results=False)
            if run is None:
                raise CommandError(f"run {run_id} vanished from Redis (restarted without persistence?)")
            detail = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in run.counts.items())
            progress.update(bar, completed=run.done if run.expected else 1, detail=detail)
            if run.status != "running":
                break
            time.sleep(0.5)
    run = store.get(run_id)
    assert run is not None
    print_run(run)
    return EXIT_OK if run.status == "completed" and not run.failures else EXIT_FAILED


def print_run(run: Run) -> None:
    from .runs import summary_lines

    lines = summary_lines(run)
    out.print(lines[0], markup=False)
    for line in lines[1:]:
        out.print("  " + line.split(": ", 1)[1], markup=False)


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
    from .sync import NotCancelled, cancel_run, run_store

    settings = _settings()
    redis = _redis(settings)
    # the summary goes where the workers write theirs: the day's image-sync.log
    logs.setup(settings.log_dir, stderr=False)
    try:
        run_id = cancel_run(settings, redis, args.run, operator(), " ".join(args.reason.split()))
    except NotCancelled as exc:
        raise CommandError(str(exc)) from None
    run = run_store(settings, redis).get(run_id)
    if run is not None:
        print_run(run)
    out.print("the lock is released; pulls still running finish and report into the run "
              f"('imagesync history {run_id}')", markup=False)
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    from .sync import run_store

    settings = _settings()
    store = run_store(settings, _redis(settings))
    if args.run:
        run = store.get(args.run)
        if run is None:
            raise CommandError(f"no run {args.run} in the history (see 'imagesync history')")
        from .backup import BackupStore
        from .backup import summary_lines as backup_lines

        record = BackupStore(store.redis).get(args.run)
        if args.json:
            out.print_json(json.dumps(run.to_dict() | ({"backup": record} if record else {})))
        else:
            print_run(run)
            for line in backup_lines(run.id, record) if record else ():
                out.print("  " + line.split(": ", 1)[1], markup=False)
        return EXIT_OK
    runs = store.recent(args.limit)
    if args.json:
        out.print_json(json.dumps([run.to_dict() for run in runs]))
        return EXIT_OK
    from .runs import SUCCESSES

    table = Table(title="recent runs")
    for column in ("run", "trigger", "status", "pulls", "ok", "failed", "not run", "skipped nodes", "took"):
        table.add_column(column)
    for run in runs:
        ok = sum(run.counts.get(s, 0) for s in SUCCESSES)
        # "not run": pulls that found their run already over (cancelled, abandoned) and were skipped
        not_run = run.counts.get("skipped", 0)
        status = {"cancelled": "[yellow]cancelled[/]", "abandoned": "[red]abandoned[/]"}.get(run.status, run.status)
        table.add_row(run.id, run.trigger or "-", status, str(run.expected), str(ok), str(run.failures - not_run),
                      str(not_run), ", ".join(run.skipped) or "-", f"{run.duration:.1f} s")
    out.print(table)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from .celeryconfig import CONTROL_QUEUE, node_queue

    settings = _settings()
    logs.check_log_dir(settings.log_dir)
    extra = [a for a in args.celery_args if a != "--"]
    if args.concurrency is not None and not (args.nodes or args.all_nodes):
        raise CommandError("--concurrency goes with --nodes or --all-nodes: a worker of one node runs "
                           "max_parallel pulls", EXIT_CONFIG)
    if args.control:
        argv = ["-Q", CONTROL_QUEUE, "-c", "2", "-n", "control@%h"]
    elif args.nodes or args.all_nodes:
        argv = shared_worker_argv(settings, args.nodes, args.concurrency)
    else:
        node = settings.node(args.node)
        # prefork is the only pool that enforces time limits
        argv = ["-Q", node_queue(node.name), "-c", str(settings.max_parallel), "-n", f"{node.name}@%h"]
    return _exec_celery(["worker", "-P", "prefork", "-l", "INFO", *argv, *extra])


def cmd_agent(args: argparse.Namespace) -> int:
    from .agents import agent_node, environment_for
    from .celeryconfig import node_queue

    settings = _settings()
    if not settings.agents:
        raise CommandError("agents is not true in the configuration, so no run would ask this agent: "
                           "set agents = true (or IMAGESYNC_AGENTS=true) for the agents and the control worker",
                           EXIT_CONFIG)
    logs.check_log_dir(settings.log_dir)
    node = agent_node(settings, args.name, runtime=args.runtime, endpoint=args.endpoint, namespace=args.namespace,
                      hosts_dir=args.hosts_dir, image_fs=args.image_fs, platform=args.platform)
    os.environ.update(environment_for(node))
    extra = [a for a in args.celery_args if a != "--"]
    argv = ["-Q", node_queue(node.name), "-c", str(settings.max_parallel), "-n", f"{node.name}@%h"]
    return _exec_celery(["worker", "-P", "prefork", "-l", "INFO", *argv, *extra])


def shared_worker_argv(settings: Settings, nodes: str | None, concurrency: int | None) -> list[str]:
    """Celery worker arguments of one worker for several nodes' queues (every SSH node
    without ``nodes``); ``max_parallel`` per node is then held by node slots in Redis."""
    from .celeryconfig import node_queue
    from .nodeslots import default_concurrency

    if nodes is None:
        chosen = [node for node in settings.nodes if node.transport == "ssh"]
    else:
        names = [name.strip() for name in nodes.split(",") if name.strip()]
        chosen = [settings.node(name) for name in dict.fromkeys(names)]
    if not chosen:
        raise CommandError("no node to serve: name some with --nodes NAME,NAME", EXIT_CONFIG)
    local = [node.name for node in chosen if node.transport != "ssh"]
    if local:
        raise CommandError(f"{', '.join(local)}: transport is not ssh; such a node's worker runs on the node "
                           "itself (imagesync worker --node NAME there)", EXIT_CONFIG)
    if concurrency is not None and concurrency < 1:
        raise CommandError(f"--concurrency must be at least 1, not {concurrency}", EXIT_CONFIG)
    processes = concurrency or default_concurrency(len(chosen), settings.max_parallel)
    queues = ",".join(node_queue(node.name) for node in chosen)
    name = chosen[0].name + (f"+{len(chosen) - 1}" if len(chosen) > 1 else "")
    return ["-Q", queues, "-c", str(processes), "-n", f"{name}@%h"]


def cmd_beat(args: argparse.Namespace) -> int:
    settings = _settings()
    logs.check_log_dir(settings.log_dir)
    extra = [a for a in args.celery_args if a != "--"]
    schedule_file = str(settings.log_dir / "beat-schedule")
    return _exec_celery(["beat", "-l", "INFO", "-s", schedule_file, *extra])


def cmd_exporter(args: argparse.Namespace) -> int:
    from .exporter import serve

    settings = _settings()
    # no ping: the exporter starts and reports imagesync_up 0 while Redis is down
    client = _redis(settings, ping=False, socket_timeout=10)
    try:
        serve(settings, client, args.address, args.port)
    except OSError as exc:
        raise CommandError(f"cannot listen on {args.address or settings.exporter_address}:"
                           f"{args.port or settings.exporter_port} ({exc}): choose another exporter_port") from exc
    return EXIT_OK


def cmd_webhook(args: argparse.Namespace) -> int:
    from .webhook import serve

    settings = _settings()
    try:
        secret = settings.webhook_token()
    except OSError as exc:
        raise CommandError(f"cannot read webhook_secret_file {settings.webhook_secret_file} ({exc.strerror}): "
                           "fix the file or its permissions", EXIT_CONFIG) from exc
    if not secret:
        raise CommandError("no webhook secret: set webhook_secret_file (or webhook_secret, "
                           "IMAGESYNC_WEBHOOK_SECRET) to the token the registry sends in its Authorization header",
                           EXIT_CONFIG)
    client = _redis(settings, ping=False, socket_timeout=10)
    try:
        serve(settings, client, secret, args.address, args.port)
    except OSError as exc:
        raise CommandError(f"cannot listen on {args.address or settings.webhook_address}:"
                           f"{args.port or settings.webhook_port} ({exc}): choose another webhook_port") from exc
    return EXIT_OK


def _exec_celery(argv: list[str]) -> int:
    if argv[0] == "worker":
        # Celery's worker command without the rest of Celery's CLI: less memory per node (imagesync.worker)
        os.execvp(sys.executable, [sys.executable, "-m", "imagesync.worker", *argv[1:]])
    os.execvp(sys.executable, [sys.executable, "-m", "celery", "-A", "imagesync", *argv])


COMMANDS = {
    "config": cmd_config,
    "check": cmd_check,
    "plan": cmd_plan,
    "status": cmd_status,
    "sync": cmd_sync,
    "cancel": cmd_cancel,
    "history": cmd_history,
    "worker": cmd_worker,
    "agent": cmd_agent,
    "beat": cmd_beat,
    "exporter": cmd_exporter,
    "webhook": cmd_webhook,
}


if __name__ == "__main__":
    sys.exit(main())
