"""Agent mode: a worker on every node that announces itself, and its side of the inventory.

``imagesync agent`` runs on a node (a DaemonSet pod, or a systemd unit) and is
the node's worker: it consumes the node's queue (``node.<name>``) and runs the
runtime's commands on the node itself (the local transport), so no SSH is
needed. It registers the node in Redis (:class:`Registration`) and sends a
heartbeat every ``agent_heartbeat`` seconds. With ``agents = true``, the nodes
of a run are the ``[[nodes]]`` of the configuration (over SSH) and every agent
heard from within ``agent_lapse`` seconds; an agent not heard from since is
skipped, with the time it was last seen, and forgotten ``agent_forget``
seconds after that.

The inventory of agent nodes is a task per node on the node's queue
(``imagesync.inventory``): each agent runs the very command the SSH path runs
(:func:`imagesync.inventory.examine_command`) and pushes its output onto one
Redis list per request (:func:`answer`); the run reads the list
(:func:`imagesync.survey.ask`).

Every time here is Redis's (``TIME``), never a host's: the agents' clocks and
the control worker's need not agree.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from . import keys
from .budgets import LIST_TIMEOUT
from .config import Node
from .config.problems import explain
from .config.sources import AGENT_VARIABLE
from .errors import ConfigError, NodeError, one_line
from .inventory import examine, examine_command, interpret
from .redisvalues import as_text, server_time
from .transport import CommandResult, transport_for

if TYPE_CHECKING:
    from redis import Redis

    from .config import Settings
    from .facts import NodeFacts

log = logging.getLogger("imagesync")


# -- the agent's node --------------------------------------------------------------------------


def agent_node(settings: Settings, name: str | None = None, environ: Mapping[str, str] | None = None,
               **runtime: str | None) -> Node:
    """The node an agent serves: ``name``, else ``NODE_NAME`` (the Kubernetes downward API),
    else the host name; its runtime settings (``runtime``, ``endpoint``, ``namespace``,
    ``hosts_dir``, ``image_fs``, ``platform``) and ``labels`` (comma-separated) as given,
    else the ``agent_*`` settings.
    ConfigError, one line per problem, if that makes no valid node."""
    environ = os.environ if environ is None else environ
    chosen = name or environ.get("NODE_NAME") or socket.gethostname()
    given = {key: value for key, value in runtime.items() if value is not None}
    fields = {
        "name": chosen, "transport": "local", "runtime": settings.agent_runtime,
        "endpoint": settings.agent_endpoint, "namespace": settings.agent_namespace,
        "hosts_dir": settings.agent_hosts_dir, "image_fs": settings.agent_image_fs,
        "labels": settings.agent_labels, **given,
    }
    try:
        node = Node.model_validate({key: value for key, value in fields.items() if value is not None})
    except ValidationError as exc:
        raise ConfigError([f"agent node {explain(error, {})}" for error in exc.errors(include_url=False)]) from None
    if any(configured.name == node.name for configured in settings.nodes):
        raise ConfigError([f"agent node name {node.name!r} is a node of the configuration ([[nodes]]) too: "
                           "give the agent another name (--name, NODE_NAME), or remove that node from the file"])
    return node


def serving(settings: Settings, environ: Mapping[str, str] | None = None) -> Settings:
    """``settings`` with the node of the agent this process works for (``imagesync agent``
    passes it in the environment), so that its tasks find it like a configured node."""
    environ = os.environ if environ is None else environ
    text = environ.get(AGENT_VARIABLE)
    if not text:
        return settings
    node = Node.model_validate_json(text)
    others = [other for other in settings.nodes if other.name != node.name]
    return settings.model_copy(update={"nodes": [*others, node]})


def environment_for(node: Node) -> dict[str, str]:
    """What ``imagesync agent`` puts in its worker's environment (see :func:`serving`)."""
    return {AGENT_VARIABLE: node.model_dump_json(exclude_defaults=True)}


# -- registration and heartbeat ------------------------------------------------------------------


@dataclass
class Registration:
    """What an agent said of its node, and when it was last heard from (Redis time)."""

    name: str
    node: Node
    last_seen: float
    host: str = ""
    platform: str | None = None
    runtime: str = ""
    containerd: str | None = None
    images: int | None = None
    started: float | None = None
    #: ``host:port`` where its node's images are served to the other agents ("" if not: imagesync.peerserve)
    peer: str = ""

    @classmethod
    def from_hash(cls, name: str, data: Mapping[bytes, bytes], score: float) -> Registration | None:
        text = {key.decode(): value.decode(errors="replace") for key, value in data.items()}
        try:
            node = Node.model_validate_json(text["node"])
        except (KeyError, ValidationError):
            return None
        return cls(name=name, node=node, last_seen=score, host=text.get("host", ""),
                   platform=text.get("platform") or None, runtime=text.get("runtime", node.runtime),
                   containerd=text.get("containerd") or None,
                   images=int(text["images"]) if text.get("images", "").isdigit() else None,
                   started=float(text["started"]) if text.get("started") else None, peer=text.get("peer", ""))

    def to_dict(self) -> dict:
        return {"name": self.name, "host": self.host, "platform": self.platform, "runtime": self.runtime,
                "containerd": self.containerd, "images": self.images, "last_seen": self.last_seen,
                "started": self.started}


def describe_facts(facts: NodeFacts, images: int) -> dict[Any, Any]:
    return {"platform": facts.platform or "", "containerd": facts.containerd or "", "images": str(images)}


def register(redis: Redis, node: Node, facts: NodeFacts | None, images: int | None, forget: int,
             peer: str = "") -> float:
    """Announce ``node``: its settings, platform, runtime and version, image count, where it
    serves its images to peers; a first heartbeat."""
    now = server_time(redis)
    record: dict[Any, Any] = {
        "name": node.name, "node": node.model_dump_json(exclude_defaults=True), "host": socket.gethostname(),
        "runtime": node.runtime, "started": repr(now), "last_seen": repr(now), "peer": peer}
    if facts is not None and images is not None:
        record |= describe_facts(facts, images)
    with redis.pipeline() as pipe:
        pipe.delete(keys.agent(node.name))
        pipe.hset(keys.agent(node.name), mapping=record)
        pipe.expire(keys.agent(node.name), forget)
        pipe.zadd(keys.AGENTS, {node.name: now})
        pipe.execute()
    return now


def heartbeat(redis: Redis, name: str, forget: int) -> float:
    now = server_time(redis)
    with redis.pipeline() as pipe:
        pipe.zadd(keys.AGENTS, {name: now})
        pipe.hset(keys.agent(name), "last_seen", repr(now))
        pipe.expire(keys.agent(name), forget)
        pipe.execute()
    return now


class Heartbeat:
    """A thread of the agent's worker (its main process) that keeps the node registered."""

    def __init__(self, connect: Callable[[], Redis], node: Node, interval: float, forget: int,
                 examine_node: Callable[[], tuple[NodeFacts, int]], peer: str = "") -> None:
        self.connect, self.node, self.interval, self.forget = connect, node, interval, forget
        self.peer = peer
        self.examine_node = examine_node
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat {node.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _beat(self) -> None:
        registered = False
        while not self.stopped.is_set():
            try:
                redis = self.connect()
                if not registered:
                    facts, images = self._facts()
                    register(redis, self.node, facts, images, self.forget, self.peer)
                    log.info("agent %s registered (%s, %s)", self.node.name, self.node.runtime,
                             f"{images} images" if images is not None else "images unknown")
                    registered = True
                elif not redis.exists(keys.agent(self.node.name)):
                    registered = False  # forgotten (or Redis lost it): announce the node again
                    continue
                else:
                    heartbeat(redis, self.node.name, self.forget)
            except Exception as exc:  # Redis down: the node lapses, and the next beat tries again
                log.warning("agent %s: heartbeat failed: %s", self.node.name, one_line(str(exc)))
            self.stopped.wait(self.interval)

    def _facts(self) -> tuple[NodeFacts | None, int | None]:
        try:
            return self.examine_node()
        except NodeError as exc:
            log.warning("agent %s: cannot list the node's images yet: %s", self.node.name, exc.message)
            return None, None


def peer_address(settings: Settings, port: int, environ: Mapping[str, str] | None = None) -> str:
    """``host:port`` at which the other agents reach this one's peer server: ``agent_peer_advertise``,
    else ``$POD_IP`` (the downward API), else ``agent_peer_address`` unless it is every address,
    else what the node's name resolves to."""
    environ = os.environ if environ is None else environ
    host = settings.agent_peer_advertise or environ.get("POD_IP") or ""
    if not host:
        bound = settings.agent_peer_address
        host = bound if bound not in ("0.0.0.0", "::", "") else socket.gethostbyname(socket.gethostname())
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def examine_self(settings: Settings, node: Node) -> tuple[NodeFacts, int]:
    images, facts = examine(settings, node)
    return facts, len(images)


# -- the fleet ------------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The agents alive, and the nodes whose agent lapsed (name -> why)."""

    alive: list[Registration] = field(default_factory=list)
    lapsed: dict[str, str] = field(default_factory=dict)
    lapsed_since: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [agent.name for agent in self.alive]


def registrations(redis: Redis) -> list[tuple[Registration, float]]:
    """Every agent registered and not forgotten, with the Redis time now; forgotten ones are dropped."""
    members: list[tuple[bytes, float]] = list(redis.zrange(keys.AGENTS, 0, -1, withscores=True))  # type: ignore[arg-type]
    with redis.pipeline(transaction=False) as pipe:
        for name, _ in members:
            pipe.hgetall(keys.agent(as_text(name)))
        records = pipe.execute()
    found, gone = [], []
    for (name, score), data in zip(members, records, strict=True):
        registration = Registration.from_hash(as_text(name), data, float(score)) if data else None
        if registration is None:
            gone.append(name)
        else:
            found.append(registration)
    if gone:
        redis.zrem(keys.AGENTS, *gone)
    now = server_time(redis)
    return [(registration, now) for registration in found]


def registered_names(redis: Redis) -> list[str]:
    return [as_text(name) for name in redis.zrange(keys.AGENTS, 0, -1)]  # type: ignore[union-attr]


def seen_at(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def fleet(settings: Settings, redis: Redis) -> Fleet:
    """The registered agents: alive (heard from within ``agent_lapse``) or lapsed, with the reason."""
    found = Fleet()
    configured = {node.name for node in settings.nodes}
    for registration, now in registrations(redis):
        if registration.name in configured:
            log.warning("agent %s ignored: a node of the configuration has that name", registration.name)
            continue
        ago = now - registration.last_seen
        if ago <= settings.agent_lapse:
            found.alive.append(registration)
        else:
            found.lapsed[registration.name] = (
                f"its agent's heartbeat lapsed: last seen {seen_at(registration.last_seen)} ({ago:.0f} s ago); "
                "check the imagesync agent on that node")
            found.lapsed_since[registration.name] = registration.last_seen
    return found


def known_nodes(settings: Settings, redis: Redis | None) -> list[str]:
    """Every node name a run may target: the configured ones, and the registered agents."""
    return node_names(settings, registered_names(redis) if settings.agents and redis is not None else [])


def node_names(settings: Settings, registered: list[str]) -> list[str]:
    """The configured nodes, then the agents of ``registered`` that are not among them
    (with ``agents = true``): for a caller that read the registrations itself, in a pipeline."""
    names = [node.name for node in settings.nodes]
    if settings.agents:
        names += [name for name in registered if name not in names]
    return names


def check_targets(settings: Settings, redis: Redis | None, targets: Iterable[str]) -> None:
    """ConfigError unless every name of ``targets`` is a configured node or a registered agent."""
    if not settings.agents:
        for name in targets:
            settings.node(name)
        return
    known = known_nodes(settings, redis)
    for name in targets:
        if name not in known:
            raise ConfigError([f"no node named {name!r}: neither in the configuration nor a registered agent; "
                               f"known nodes: {', '.join(known) or '(none)'}"])


# -- the inventory through the agents -----------------------------------------------------------


def answer(settings: Settings, redis: Redis, request: str, name: str, keep: float) -> dict:
    """On the agent: run the inventory command on the node, push the output for ``request``,
    and refresh the node's registration with what it found."""
    node = settings.node(name)
    payload: dict = {"node": name}
    try:
        result = transport_for(settings, node).run(examine_command(node), timeout=LIST_TIMEOUT)
        payload |= {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}
    except NodeError as exc:
        payload["error"] = exc.message
    key = keys.inventory_answers(request)
    with redis.pipeline() as pipe:
        pipe.rpush(key, json.dumps(payload))
        pipe.expire(key, int(keep) + 1)
        pipe.execute()
    if "error" not in payload:
        try:
            images, facts = interpret(node, CommandResult(payload["stdout"], payload["stderr"], payload["exit_code"]))
            redis.hset(keys.agent(name), mapping=describe_facts(facts, len(images)))
        except NodeError:
            pass
    return payload


def kinds(settings: Settings, redis: Redis | None) -> dict[str, str]:
    """node -> "ssh", "local" or "agent", for ``check`` and ``status``."""
    found: dict[str, str] = {node.name: node.transport for node in settings.nodes}
    if settings.agents and redis is not None:
        for name in registered_names(redis):
            found.setdefault(name, "agent")
    return found


def check_rows(settings: Settings, redis: Redis) -> list[tuple[dict[str, str], bool]]:
    """``imagesync check``'s rows for the registered agents: what each said of its node,
    and when it was last heard from; a lapsed agent fails the check."""
    rows = []
    known = fleet(settings, redis)
    alive = {agent.name for agent in known.alive}
    for registration, now in registrations(redis):
        if registration.name not in alive and registration.name not in known.lapsed:
            continue  # a configured node's name: fleet() said so
        ok = registration.name in alive
        detail = (f"heartbeat {now - registration.last_seen:.0f} s ago" if ok
                  else known.lapsed[registration.name])
        version = f" (containerd {registration.containerd})" if registration.containerd else ""
        rows.append(({"node": registration.name, "via": "agent", "address": f"agent on {registration.host or '?'}",
                      "ssh": "-", "runtime": f"{registration.runtime}{version}",
                      "images": "?" if registration.images is None else str(registration.images),
                      "platform": registration.platform or "unknown", "image fs": registration.node.image_fs,
                      "detail": detail}, ok))
    if not rows:
        rows.append(({"node": "(agents)", "via": "agent", "address": "-", "ssh": "-", "runtime": "-", "images": "-",
                      "platform": "-", "image fs": "-",
                      "detail": "no agent has registered: start 'imagesync agent' on the nodes "
                                "(deploy/kubernetes runs one per node)"}, False))
    return rows
