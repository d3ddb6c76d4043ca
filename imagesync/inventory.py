"""Inventory: ask every node what it holds, all nodes at once.

Like Fabric's ``Group``, the answer is a per-node result map: each node maps
to its images or to the error that kept us from learning them, and the map
tells which succeeded and which failed.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import facts, runtimes
from .budgets import LIST_TIMEOUT
from .errors import NodeError, RuntimeMissing, one_line
from .facts import NodeFacts
from .runtimes import COMMAND_NOT_FOUND, Image
from .transport import CommandResult, transport_for

if TYPE_CHECKING:
    from .config import Node, Settings

#: upper bound on simultaneous SSH handshakes from one process
MAX_THREADS = 64


@dataclass
class Inventory:
    """Images (and facts) per reachable node, and the reason for each node that was not."""

    images: dict[str, list[Image]] = field(default_factory=dict)
    errors: dict[str, NodeError] = field(default_factory=dict)
    facts: dict[str, NodeFacts] = field(default_factory=dict)

    @property
    def succeeded(self) -> dict[str, list[Image]]:
        return self.images

    @property
    def failed(self) -> dict[str, NodeError]:
        return self.errors

    @property
    def unreachable(self) -> dict[str, str]:
        """node -> one-line reason, for the plan and the run record."""
        return {node: error.message for node, error in sorted(self.errors.items())}


def runtime_missing(node: str, runtime: str) -> RuntimeMissing:
    return RuntimeMissing(
        node,
        f"{runtime} is not installed on {node} (or not on the SSH user's PATH): "
        "install it or set runtime for this node",
    )


def list_images(settings: Settings, node: Node) -> list[Image]:
    """The images ``node`` holds, as its runtime reports them."""
    return examine(settings, node)[0]


def examine(settings: Settings, node: Node) -> tuple[list[Image], NodeFacts]:
    """The images ``node`` holds and its facts (platform, image filesystem, ctr), in one command."""
    return interpret(node, transport_for(settings, node).run(examine_command(node), timeout=LIST_TIMEOUT))


def examine_command(node: Node) -> str:
    """The one command that lists ``node``'s images and learns its facts."""
    return facts.wrap(node, runtimes.for_node(node).list_command())


def interpret(node: Node, result: CommandResult, via_agent: bool = False) -> tuple[list[Image], NodeFacts]:
    """The images and facts in the answer to :func:`examine_command`, however it was run
    (over SSH, or by the node's agent: ``via_agent``); NodeError if it failed."""
    runtime = runtimes.for_node(node)
    raw, listing = facts.split(result.stdout)
    if result.exit_code == COMMAND_NOT_FOUND:
        raise runtime_missing(node.name, runtime.name)
    if not result.ok:
        reason = runtimes.failure_reason(result.stderr, listing)
        raise NodeError(node.name, f"{runtime.name} cannot list images on {node.name}: {reason}")
    try:
        return runtime.parse_list(listing), NodeFacts.parse(node, raw, via_agent=via_agent)
    except ValueError as exc:
        raise NodeError(node.name, str(exc)) from exc


def take_inventory(settings: Settings, nodes: Iterable | None = None) -> Inventory:
    """List images on ``nodes`` (all configured nodes by default) in parallel."""
    nodes = list(settings.nodes if nodes is None else nodes)
    inventory = Inventory()
    if not nodes:
        return inventory

    def one(node: Node):
        try:
            return node.name, examine(settings, node), None
        except NodeError as exc:
            return node.name, None, exc
        except Exception as exc:
            # Whatever went wrong with one node skips that node, never the run.
            reason = f"unexpected error listing images on {node.name}: {type(exc).__name__}: {one_line(str(exc))}"
            return node.name, None, NodeError(node.name, reason)

    with ThreadPoolExecutor(max_workers=min(len(nodes), MAX_THREADS)) as pool:
        for name, answer, error in pool.map(one, nodes):
            if error is None:
                inventory.images[name], inventory.facts[name] = answer
            else:
                inventory.errors[name] = error
    return inventory
