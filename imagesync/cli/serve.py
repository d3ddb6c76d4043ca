"""The commands that start long-running processes: Celery workers (``worker``, ``agent``),
Celery ``beat``, the Prometheus ``exporter`` and the registry ``webhook`` receiver.

Workers and beat replace this process with Celery's own (``_exec_celery``), so
the worker runs without the CLI and its imports; the exporter and the webhook
receiver serve in this process until stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import logs
from ..config import Settings
from .common import EXIT_CONFIG, EXIT_OK, CommandError
from .common import read_settings as _settings
from .common import redis_client as _redis


def cmd_worker(args: argparse.Namespace) -> int:
    from ..celeryconfig import CONTROL_CONCURRENCY, CONTROL_QUEUE, node_queue

    settings = _settings()
    logs.check_log_dir(settings.log_dir)
    extra = [a for a in args.celery_args if a != "--"]
    pool = getattr(args, "pool", None)
    for flag, value in (("--concurrency", args.concurrency), ("--pool", pool)):
        if value is not None and not (args.nodes or args.all_nodes):
            raise CommandError(f"{flag} goes with --nodes or --all-nodes: a worker of one node runs "
                               "max_parallel pulls in as many processes", EXIT_CONFIG)
    if args.control:
        argv = ["-P", "prefork", "-Q", CONTROL_QUEUE, "-c", str(CONTROL_CONCURRENCY), "-n", "control@%h"]
    elif args.nodes or args.all_nodes:
        argv = shared_worker_argv(settings, args.nodes, args.concurrency, pool or "threads")
    else:
        node = settings.node(args.node)
        argv = ["-P", "prefork", "-Q", node_queue(node.name), "-c", str(settings.max_parallel),
                "-n", f"{node.name}@%h"]
    return _exec_celery(["worker", "-l", "INFO", *argv, *extra])


def cmd_agent(args: argparse.Namespace) -> int:
    from ..agents import agent_node, environment_for
    from ..celeryconfig import node_queue

    settings = _settings()
    if not settings.agents:
        raise CommandError("agents is not true in the configuration, so no run would ask this agent: "
                           "set agents = true (or IMAGESYNC_AGENTS=true) for the agents and the control worker",
                           EXIT_CONFIG)
    logs.check_log_dir(settings.log_dir)
    node = agent_node(settings, args.name, runtime=args.runtime, endpoint=args.endpoint, namespace=args.namespace,
                      hosts_dir=args.hosts_dir, image_fs=args.image_fs, platform=args.platform,
                      labels=args.labels)
    os.environ.update(environment_for(node))
    extra = [a for a in args.celery_args if a != "--"]
    argv = ["-Q", node_queue(node.name), "-c", str(settings.max_parallel), "-n", f"{node.name}@%h"]
    return _exec_celery(["worker", "-P", "prefork", "-l", "INFO", *argv, *extra])


def shared_worker_argv(settings: Settings, nodes: str | None, concurrency: int | None,
                       pool: str = "threads") -> list[str]:
    """Celery worker arguments of one worker for several nodes' queues (every SSH node
    without ``nodes``); ``max_parallel`` per node is then held by node slots in Redis.

    Its pool is threads unless told otherwise: a pull waits on an SSH channel, and a
    thread waits for a few hundred KiB where a pool process costs ~20 MiB
    (bench/README.md, section 12); the worker keeps the time limits itself
    (imagesync.timelimits)."""
    from ..celeryconfig import node_queue
    from ..nodeslots import default_concurrency

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
    processes = concurrency or default_concurrency(len(chosen), settings.max_parallel, pool)
    queues = ",".join(node_queue(node.name) for node in chosen)
    name = chosen[0].name + (f"+{len(chosen) - 1}" if len(chosen) > 1 else "")
    return ["-P", pool, "-Q", queues, "-c", str(processes), "-n", f"{name}@%h"]


def cmd_beat(args: argparse.Namespace) -> int:
    settings = _settings()
    logs.check_log_dir(settings.log_dir)
    extra = [a for a in args.celery_args if a != "--"]
    schedule_file = str(settings.log_dir / "beat-schedule")
    return _exec_celery(["beat", "-l", "INFO", "-s", schedule_file, *extra])


def cmd_exporter(args: argparse.Namespace) -> int:
    from ..exporter import serve

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
    from ..webhook import serve

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
