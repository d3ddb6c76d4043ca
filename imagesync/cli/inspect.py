"""The commands that look without changing anything: ``config``, ``check``, ``plan``, ``status``.

``check`` probes every node (SSH, runtime, image list, facts) and notes what
imagesync cannot do there; ``plan`` shows what a sync would pull where;
``status`` shows which node holds which image, or with ``--backup`` whether the
backup registry holds what the nodes hold. They print through the consoles of
``common``, looked up when they print, so that a test can replace them.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from .. import runtimes
from ..budgets import SSH_GRACE
from ..config import Node, Settings
from ..errors import NodeError
from ..planning import room
from ..planning.plan import Plan
from ..runtimes.peercopy import peer_address, peer_of, reach_command
from . import common
from .common import EXIT_FAILED, EXIT_OK, CommandError, read_settings, redis_client, say, version_line

if TYPE_CHECKING:
    from ..facts import NodeFacts
    from ..survey import SendInventory


def cmd_config(args: argparse.Namespace) -> int:
    settings = read_settings()
    rows = settings.describe()
    if args.json:
        common.out.print_json(json.dumps({"path": str(settings.path) if settings.path else None,
                                          "settings": [{"key": key, "value": value, "from": source}
                                                       for key, value, source in rows]}))
        _say_ssh_notes(settings)
        return EXIT_OK
    table = Table(title=f"imagesync configuration ({settings.path or 'defaults'})")
    for column in ("key", "value", "from"):
        table.add_column(column)
    for key, value, source in rows:
        # the file is named in the title; keep the column narrow
        table.add_row(escape(key), escape(value), escape("file" if source.startswith("file") else source))
    common.show(table)
    _say_ssh_notes(settings)
    return EXIT_OK


def _say_ssh_notes(settings: Settings) -> None:
    """What the OpenSSH client configuration asks for that imagesync does otherwise (StrictHostKeyChecking)."""
    for node in settings.nodes:
        if node.transport == "ssh":
            for note in settings.ssh_target(node).notes:
                say(f"imagesync: note: {note}")


#: the columns of the table of SSH settings, and the keys of its rows
SSH_COLUMNS = ("node", "connects to", "key", "known_hosts", "from")


def ssh_rows(settings: Settings) -> list[dict[str, str]]:
    """Each SSH node's connection as imagesync's settings and the SSH config make it, and where each value came from."""
    rows = []
    for node in settings.nodes:
        if node.transport != "ssh":
            continue
        target = settings.ssh_target(node)
        keys = ", ".join(str(path) for path in target.key_files) or "SSH's usual keys and agent"
        known = ", ".join(str(path) for path in target.known_hosts)
        rows.append(dict(zip(SSH_COLUMNS, (node.name, target.route(), keys, known, target.provenance()), strict=True)))
    return rows


def ssh_table(rows: list[dict[str, str]]) -> Table:
    table = Table(title="SSH settings in effect")
    for column in SSH_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(escape(row[column]) for column in SSH_COLUMNS))
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

    from ..inventory import examine, runtime_missing
    from ..transport import transport_for

    if not args.json:
        print(version_line(), flush=True)  # first, and whole: it is what a bug report quotes
    settings = read_settings()
    ssh = ssh_rows(settings)
    if not args.json:
        common.line(f"configuration: ok ({settings.path}, {len(settings.nodes)} nodes"
                    + (", and the agents registered in Redis)" if settings.agents else ")"))
        if ssh:
            common.show(ssh_table(ssh))
    if ssh:
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
            transport.run("true", timeout=settings.ssh.connect_timeout + SSH_GRACE)
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
            peer = peer_of(settings.nodes, node) if settings.peer_ssh else None
            if peer is not None:  # peer_ssh: the node's own ssh reaches another, as a copy's would
                reached = transport.run(reach_command(peer, settings.ssh.connect_timeout),
                                        timeout=settings.ssh.connect_timeout + SSH_GRACE)
                if not reached.ok:
                    row["detail"] = "; ".join([*notes, peer_unreachable(node, peer, reached.stderr)])
                    return row, False
                row["detail"] = "; ".join([*notes, f"its ssh reaches {peer.name} (peer_ssh)"])
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
        from ..agents import check_rows

        results += check_rows(settings, redis_client(settings))
    failed = [row["node"] for row, ok in results if not ok]
    if args.json:
        path = str(settings.path) if settings.path else None
        common.out.print_json(json.dumps({"version": version_line(), "configuration": path, "ssh": ssh,
                                          "nodes": [row | {"ok": ok} for row, ok in results]}))
    else:
        common.show(check_table(results, settings.agents))
    if failed:
        say(f"imagesync: {len(failed)} of {len(results)} nodes failed the check: {', '.join(failed)}")
        return EXIT_FAILED
    return EXIT_OK


def peer_unreachable(node: Node, peer: Node, stderr: str) -> str:
    """One line for a node whose own ssh does not reach its peer under ``peer_ssh``."""
    where = peer_address(peer).describe()
    return (f"its ssh cannot reach {peer.name} ({where}): {runtimes.failure_reason(stderr)}: peer_ssh needs "
            f"every node's ssh to reach the others (its key accepted there, their host keys in its known hosts)")


def check_table(results: list[tuple[dict[str, str], bool]], agents: bool) -> Table:
    table = Table()
    # how each node is reached, beside the nodes' names when agents are among them
    columns = ("node", *(("via",) if agents else ()), "address", "ssh", "runtime", "images", "platform",
               "image fs", "detail")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row, ok in results:
        style = None if ok else "red"
        table.add_row(*(escape(row[c]) for c in columns), style=style)
    return table


def _inventory_sender(settings: Settings) -> SendInventory | None:
    """What queues an agent node's inventory task: only with ``agents = true``, so that
    the other commands never load the Celery app."""
    if not settings.agents:
        return None
    from ..tasks import send_inventory

    return send_inventory


def cmd_plan(args: argparse.Namespace) -> int:
    from ..agents import check_targets
    from ..sync import plan_now

    settings = read_settings()
    memory = _memory(settings)
    check_targets(settings, memory, args.node or ())
    plan = plan_now(settings, args.node, memory, _inventory_sender(settings))
    if args.json:
        common.out.print_json(json.dumps(plan.to_dict()))
        return EXIT_OK
    _print_notes(plan)
    if not plan.total:
        common.line(f"nothing to pull: {len(plan.nodes)} nodes hold all {len(plan.wanted)} matching images")
        return EXIT_OK
    table = Table(title=f"plan: {plan.total} pulls")
    table.add_column("node")
    table.add_column("pulls", justify="right")
    table.add_column("images", overflow="fold")
    table.add_column("from", overflow="fold")
    for node in plan.nodes:
        images = plan.missing.get(node, [])
        sources = [plan.route(node, image).describe() for image in images]
        # the labels that select what a prefix or entry with nodes = [...] gives it
        labels = f"\n[dim]{escape(', '.join(plan.labels[node]))}[/]" if plan.labels.get(node) else ""
        table.add_row(escape(node) + labels, str(len(images)), escape("\n".join(images) or "-"),
                      escape("\n".join(sources)))
    common.show(table)
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
    for note in plan.notes:
        say(note)


def _memory(settings: Settings):
    """Redis, for what earlier runs learned (evictions, platforms); None, said once, when it does not answer."""
    try:
        return redis_client(settings, socket_timeout=10)
    except CommandError as exc:
        say(f"imagesync: {exc}; evictions and platform verdicts seen by earlier runs are not shown")
        return None


def cmd_status(args: argparse.Namespace) -> int:
    from ..sync import plan_now

    settings = read_settings()
    if args.backup and settings.backup is None:
        raise CommandError("no backup registry is configured: add a [backup] table with its registry "
                           "(see docs/configuration.md)")
    memory = _memory(settings)
    plan = plan_now(settings, redis=memory, send_inventory=_inventory_sender(settings))
    if args.backup:
        return backup_status(settings, plan, args.json)
    if args.json:
        whole = plan.to_dict()
        common.out.print_json(json.dumps({"nodes": plan.nodes, "skipped": plan.skipped, "holdings": plan.holdings,
                                          **{key: whole[key] for key in ("excluded", "evicted", "facts", "drift",
                                                                            "moved", "labels")}}))
        return EXIT_OK
    _print_notes(plan)
    from ..agents import kinds

    common.show(status_table(plan, kinds(settings, memory)))
    return EXIT_OK


def backup_status(settings: Settings, plan: Plan, as_json: bool) -> int:
    """``status --backup``: one row per wanted image the backup keeps; non-zero unless it holds them all."""
    from .. import backup

    with backup.skopeo(settings) as tool:
        checks = backup.check(settings, backup.candidates(settings, plan), tool)
    if as_json:
        common.out.print_json(json.dumps({"backup": settings.backup.registry if settings.backup else None,
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
        common.show(table)
    return EXIT_OK if all(found.state == backup.HELD for found in checks) else EXIT_FAILED


def status_table(plan: Plan, kinds: dict[str, str] | None = None) -> Table:
    """Images down, nodes across; a cell shows the digest a node holds, that it lacks the
    image, or why it does not pull it (``n/a``: nothing for its platform or its labels;
    ``skipped``); a moved tag, the digest held and the one its registry names now.
    Under each node: its platform, how it is reached (``ssh``, ``local``, ``agent``), its labels."""
    drifted = {d.reference for d in plan.drift}
    table = Table(title=f"{len(plan.wanted)} images x {len(plan.nodes)} nodes")
    table.add_column("image", overflow="fold")
    for node in plan.nodes:
        facts = plan.facts.get(node)
        platform = facts.platform if facts is not None and facts.platform else "platform ?"
        via = "agent" if facts is not None and facts.via_agent else (kinds or {}).get(node, "ssh")
        labels = "".join(f", {label}" for label in plan.labels.get(node, ()))
        table.add_column(f"{node}\n[dim]{escape(platform)}, {via}{escape(labels)}[/]", justify="center")
    for node in plan.skipped:
        table.add_column(f"{node} (skipped)", justify="center", style="dim")
    for image in plan.wanted:
        cells = []
        for node in plan.nodes:
            held, digest = plan.held(node, image)
            excluded = plan.excluded.get(node, {}).get(image)
            moved = plan.moved.get((node, image))
            if moved is not None:
                cells.append(f"[yellow]{moved[0].split(':')[-1][:8]} -> {moved[1].split(':')[-1][:8]}[/]")
            elif held:
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
