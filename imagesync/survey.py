"""Every node's inventory for a run: over SSH for the configured nodes and, with
``agents = true``, through the agents alive in Redis, both at once.

The run queues one ``imagesync.inventory`` task per agent node (the sender is
handed in: it lives with the tasks), then reads the answers from one Redis list
per request until every agent answered or ``agent_inventory_timeout`` passed,
and parses each answer as the SSH path does (:func:`imagesync.inventory.interpret`).
A silent node is skipped, never waited for; a lapsed agent's node is skipped with
the time it was last seen.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from . import keys
from .agents import Registration, fleet
from .errors import ImagesyncError, NodeError, one_line
from .inventory import Inventory, interpret, take_inventory
from .transport import CommandResult

if TYPE_CHECKING:
    from redis import Redis

    from .config import Settings

#: SendInventory(node, request, expires): queue one node's inventory task
SendInventory = Callable[[str, str, float], None]


def ask(settings: Settings, redis: Redis, agents: Iterable[Registration],
        send: SendInventory, poll: float = 1.0) -> Inventory:
    """The inventory of ``agents``' nodes: one task each on the node's queue, the answers
    read until all are in or ``agent_inventory_timeout`` passed; a silent node is an error."""
    agents = list(agents)
    inventory = Inventory()
    if not agents:
        return inventory
    timeout = settings.agent_inventory_timeout
    request = uuid.uuid4().hex
    key = keys.inventory_answers(request)
    pending = {agent.name: agent for agent in agents}
    for agent in agents:
        send(agent.name, request, timeout)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            popped = redis.blpop([key], timeout=min(poll, left))
            if popped is None:
                continue
            found = json.loads(popped[1])
            agent = pending.pop(str(found.get("node")), None)  # type: ignore[arg-type]
            if agent is not None:
                _take(inventory, agent, found)
    finally:
        redis.delete(key)
    for name in pending:
        inventory.errors[name] = NodeError(name, f"its agent did not answer within {timeout:g} s "
                                                 "(agent_inventory_timeout): busy or stuck; skipped in this run")
    return inventory


def _take(inventory: Inventory, agent: Registration, found: Mapping) -> None:
    name = agent.name
    if "error" in found:
        inventory.errors[name] = NodeError(name, str(found["error"]))
        return
    try:
        result = CommandResult(str(found["stdout"]), str(found["stderr"]), int(found["exit_code"]))
        inventory.images[name], facts = interpret(agent.node, result, via_agent=True)
        inventory.facts[name] = replace(facts, serves=bool(agent.peer))
    except NodeError as exc:
        inventory.errors[name] = exc
    except (KeyError, TypeError, ValueError) as exc:
        inventory.errors[name] = NodeError(name, f"its agent's answer cannot be read ({one_line(str(exc))}): "
                                                 "run the same imagesync version on every node")


class NoAgentsKnown(ImagesyncError):
    """agents = true, but Redis cannot be asked which agents are alive."""


def survey(settings: Settings, redis: Redis | None, send: SendInventory | None) -> Inventory:
    """Every node's inventory: over SSH for the configured nodes; with ``agents = true``, through
    the agents for the registered ones (both at once, ``send`` queueing their tasks), a lapsed
    agent's node being skipped."""
    if not settings.agents:
        return take_inventory(settings)
    if send is None:
        raise ValueError("agents = true: the inventory needs a sender of imagesync.inventory tasks")
    if redis is None:
        raise NoAgentsKnown("agents = true, but Redis does not answer: the agents alive are not known; "
                            "start redis-server or fix redis_url")
    known = fleet(settings, redis)
    with ThreadPoolExecutor(max_workers=1) as pool:
        over_ssh = pool.submit(take_inventory, settings) if settings.nodes else None
        inventory = ask(settings, redis, known.alive, send)
        if over_ssh is not None:
            ssh = over_ssh.result()
            inventory.images |= ssh.images
            inventory.facts |= ssh.facts
            inventory.errors |= ssh.errors
    for name, reason in known.lapsed.items():
        inventory.errors[name] = NodeError(name, reason)
    return inventory
