"""The ``imagesync`` command.

Every error an operator can cause ends in one line on stderr saying what is
wrong and what to do, and a non-zero exit: 2 for configuration, 1 for
failures, 3 when a run is already in progress.

This module holds the argument parser and ``main``, which runs a command;
the commands live beside it: ``inspect`` (config, check, plan, status),
``runs`` (sync, cancel, history), ``prune`` (prune) and ``serve`` (worker,
agent, beat, exporter, webhook), each imported only when its command runs.
What they all share (the consoles, the exit codes, the settings and the Redis
client) is in ``common``, below them, so that nothing here is imported back
by a command.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Sequence

from ..errors import ConfigError, ImagesyncError
from .common import EXIT_CONFIG, EXIT_FAILED, CommandError, say, version_line


class _Version(argparse.Action):
    """``--version``: the line is made only when asked for (it reads package metadata)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of imagesync, Celery, kombu, redis-py and paramiko, and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_line())
        parser.exit()


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
    config.add_argument("--json", action="store_true", help="print each key, its value and its source as JSON")

    check = sub.add_parser("check", help="check the configuration and every node (SSH, runtime, image list)")
    check.add_argument("--json", action="store_true", help="print the versions, the SSH settings and each node's "
                       "check as JSON")

    plan = sub.add_parser("plan", help="dry run: what a sync would pull where")
    plan.add_argument("--node", action="append", metavar="NAME", help="only plan pulls onto this node (repeatable)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    status = sub.add_parser("status", help="node x image matrix of the matching images")
    status.add_argument("--json", action="store_true", help="print the holdings (or with --backup, the backup's "
                        "state) as JSON")
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

    prune = sub.add_parser("prune", help="remove retired images from the nodes (those imagesync manages and no "
                           "longer wants there), never one a container uses")
    prune.add_argument("--dry-run", action="store_true", help="show what would be removed and kept, remove nothing")
    prune.add_argument("--node", action="append", metavar="NAME", help="only prune this node (repeatable)")
    prune.add_argument("--json", action="store_true", help="print every image considered, removed or kept, as JSON")

    history = sub.add_parser("history", help="recent runs, or one run in detail")
    history.add_argument("run", nargs="?", help="a run id (default: list recent runs)")
    history.add_argument("-n", "--limit", type=int, default=20)
    history.add_argument("--json", action="store_true", help="print the runs (or the run) as JSON")

    worker = sub.add_parser("worker", help="start a Celery worker for one node, or the control worker")
    which = worker.add_mutually_exclusive_group(required=True)
    which.add_argument("--node", metavar="NAME", help="serve this node's pulls (concurrency max_parallel)")
    which.add_argument("--control", action="store_true", help="serve sync and housekeeping tasks")
    which.add_argument("--nodes", metavar="NAME,NAME", help="serve these nodes' pulls with one shared pool; "
                       "each node still runs at most max_parallel (less memory, see docs/operations.md)")
    which.add_argument("--all-nodes", action="store_true",
                       help="serve the pulls of every node reached over SSH with one shared pool (as --nodes)")
    worker.add_argument("--pool", choices=("threads", "prefork"),
                        help="with --nodes/--all-nodes: threads (the default: every node at max_parallel, "
                        "a few MiB per node) or prefork (a process per pull at once)")
    worker.add_argument("--concurrency", type=int, metavar="N",
                        help="with --nodes/--all-nodes: pulls at once over all its nodes (default: threads, "
                        "max_parallel per node; prefork, the larger of the node count and max_parallel)")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="extra arguments for celery worker")

    agent = sub.add_parser("agent", help="run on a node: register it in Redis and serve its queue there, "
                           "without SSH (agent mode, agents = true)")
    agent.add_argument("--name", help="the node's name (default: $NODE_NAME, else the host name)")
    for flag, what in (("runtime", "crictl or ctr"), ("endpoint", "the runtime's socket"),
                       ("namespace", "containerd namespace"), ("hosts-dir", "registry hosts directory"),
                       ("image-fs", "the image filesystem"), ("labels", "comma-separated node labels"),
                       ("platform", "os/arch, when uname -m is wrong")):
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
        module, function = COMMANDS[args.command]
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(args)
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


#: command -> the module of ``imagesync.cli`` and its function: a command imports only
#: its own module, so that ``--version`` or ``history`` never load Celery, the planner or SSH
COMMANDS = {
    "config": ("inspect", "cmd_config"),
    "check": ("inspect", "cmd_check"),
    "plan": ("inspect", "cmd_plan"),
    "status": ("inspect", "cmd_status"),
    "sync": ("runs", "cmd_sync"),
    "cancel": ("runs", "cmd_cancel"),
    "prune": ("prune", "cmd_prune"),
    "history": ("runs", "cmd_history"),
    "worker": ("serve", "cmd_worker"),
    "agent": ("serve", "cmd_agent"),
    "beat": ("serve", "cmd_beat"),
    "exporter": ("serve", "cmd_exporter"),
    "webhook": ("serve", "cmd_webhook"),
}
