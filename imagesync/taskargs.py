"""The arguments of a task, checked where they leave the broker.

Anyone who can publish to the broker can queue a task: every agent holds the
Redis URL. What a task is given therefore reaches a node's command line only
once it has passed the grammar of what it claims to be: a run id as
:func:`imagesync.runs.new_run_id` writes it, image names by the OCI grammar,
digests as ``algorithm:hex``, node names among the configured nodes and the
registered agents, sources among the known ones. The command builders quote
every value as well; this is the first of the two fences, not the only one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from redis import Redis

from . import references
from .agents import known_nodes
from .errors import ImagesyncError, RefusedReference
from .planning.plan import BACKUP, PEERS, REGISTRY, Route

if TYPE_CHECKING:
    from .config import Settings

#: ``20261122-023015-3f9a1c``: :func:`imagesync.runs.new_run_id`
RUN_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}", re.ASCII)
#: ``linux/amd64``, ``linux/arm64/v8``: the OCI platform as the plan writes it
PLATFORM = re.compile(r"[a-z0-9_.-]{1,32}/[a-z0-9_.-]{1,32}(?:/[a-z0-9_.-]{1,32})?", re.ASCII)
#: an inventory request: a uuid4 in hex
REQUEST_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
SOURCES = frozenset({REGISTRY, BACKUP, PEERS})
ROUTE_FIELDS = frozenset({"sources", "peers", "digest", "seed", "platform", "pull_as", "pin", "replaces", "mirror"})
#: a trigger is shown in logs and history: printable, and short
MAX_TRIGGER = 200


class RefusedTask(ImagesyncError):
    """A task's arguments that no part of imagesync writes: the task does nothing with them."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"refused task arguments: {reason}")
        self.reason = reason


def run_id(value: object) -> str:
    if not isinstance(value, str) or RUN_ID.fullmatch(value) is None:
        raise RefusedTask(f"run id {shown(value)} is not one imagesync writes (YYYYMMDD-HHMMSS-hex)")
    return value


def request_id(value: object) -> str:
    if not isinstance(value, str) or REQUEST_ID.fullmatch(value) is None:
        raise RefusedTask(f"inventory request {shown(value)} is not one imagesync writes")
    return value


def reference(value: object) -> str:
    """An image name by the OCI grammar, as given (the plan's own normalized form)."""
    try:
        references.parse(value)  # type: ignore[arg-type]
    except RefusedReference as exc:
        raise RefusedTask(f"image {exc.reference!r}: {exc.reason}") from None
    return value  # type: ignore[return-value]


def digest(value: object) -> str:
    try:
        return references.parse_digest(value)
    except RefusedReference as exc:
        raise RefusedTask(f"digest {shown(value)}: {exc.reason}") from None


def delivered_to(node: str, routing_key: str | None, queue: str) -> None:
    """A message for ``node`` came off ``node``'s own queue (when the broker says which)."""
    if routing_key and routing_key != queue:
        raise RefusedTask(f"a message for node {shown(node)} arrived on queue {shown(routing_key)}")


def nodes(settings: Settings, redis: Redis | None, names: Iterable[object]) -> list[str]:
    """Names among the configured nodes and the registered agents."""
    names = list(names)
    if not names:
        return []
    known = set(known_nodes(settings, redis))
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise RefusedTask(f"node {shown(name)} is neither configured nor a registered agent")
    return names  # type: ignore[return-value]


def route(settings: Settings, redis: Redis | None, data: object, image: str) -> Route:
    """The route of a pull of ``image``, every field checked; the registry alone without one.

    ``pull_as`` pulls another reference and names it ``image``: only a
    per-architecture entry of ``image`` in the configuration may be that one.
    """
    if data is None:
        return Route.from_dict(None)
    if not isinstance(data, Mapping):
        raise RefusedTask(f"route {shown(data)} is not a mapping")
    unknown = set(data) - ROUTE_FIELDS
    if unknown:
        raise RefusedTask(f"route has fields no plan writes: {', '.join(sorted(map(str, unknown)))}")
    sources = _strings(data.get("sources") or (REGISTRY,), "route sources")
    if not sources or not set(sources) <= SOURCES:
        raise RefusedTask(f"route sources {shown(sources)}: known sources are {', '.join(sorted(SOURCES))}")
    peers = _strings(data.get("peers") or (), "route peers")
    seed = data.get("seed")
    nodes(settings, redis, [*peers, *([seed] if seed is not None else [])])
    if data.get("digest") is not None:
        digest(data["digest"])
    if data.get("replaces") is not None:
        digest(data["replaces"])
    platform = data.get("platform")
    if platform is not None and (not isinstance(platform, str) or PLATFORM.fullmatch(platform) is None):
        raise RefusedTask(f"route platform {shown(platform)} is not os/architecture[/variant]")
    if data.get("pull_as") is not None:
        _pulled_as(settings, reference(data["pull_as"]), image)
    for flag in ("pin", "mirror"):
        if not isinstance(data.get(flag, False), bool):
            raise RefusedTask(f"route {flag} is not true or false")
    return Route.from_dict(data)


def _pulled_as(settings: Settings, pull_as: str, image: str) -> None:
    entries = settings.per_architecture().get(image, {})
    allowed = references.normalized(entries.values())
    if references.normalize(pull_as) not in allowed:
        raise RefusedTask(f"route pull_as {pull_as!r} is not a per-architecture entry of {image} "
                          "in the configuration")


def trigger(value: object) -> str:
    if not isinstance(value, str) or not value.isprintable() or len(value) > MAX_TRIGGER:
        raise RefusedTask(f"trigger {shown(value)} is not a short printable text")
    return value


def deadline(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RefusedTask(f"deadline {shown(value)} is not a number")
    return float(value)


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise RefusedTask(f"{what} {shown(value)} is not a list of names")
    return list(value)


def shown(value: object) -> str:
    """``value`` for a log line or a run record: repr, so escaped, and cut at 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
