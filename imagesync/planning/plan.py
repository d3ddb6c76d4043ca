"""The plan's data: what each node holds and lacks, why a node does not pull an image
it lacks (:class:`Exclusion`), and where each pull comes from (:class:`Route`, which
the plan hands the pull). Pure values, no I/O.

:mod:`imagesync.planning.planner` makes a plan; its conditions
(:mod:`~imagesync.planning.platforms`, :mod:`~imagesync.planning.room`) act on it
through :meth:`Plan.exclude`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .. import references
from ..facts import NodeFacts

#: the sources a node's missing image can come from
REGISTRY, BACKUP, PEERS = "registry", "backup", "peers"
#: kinds of exclusion: the image is not for this node (nothing for its platform, shown "n/a");
#: it would be, but is not pulled there now. A pull's outcome "not_applicable" is outcomes.NOT_APPLICABLE.
NOT_FOR_NODE, SKIPPED = "n/a", "skipped"


@dataclass(frozen=True)
class Refusal:
    node: str
    reference: str
    reason: str


@dataclass(frozen=True)
class Drift:
    """One tag whose digest differs between nodes."""

    reference: str
    digests: Mapping[str, str]


@dataclass(frozen=True)
class Holdings:
    """The matching references one node holds: reference -> digest (None when unknown)."""

    node: str
    references: Mapping[str, str | None]
    refused: tuple[Refusal, ...] = ()
    #: reference -> the runtime's size of the image, where it reports one
    sizes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """Where one node's missing image comes from: the sources, tried in this order."""

    sources: tuple[str, ...] = (REGISTRY,)
    #: nodes that hold the image under ``digest`` and can export it, best first
    peers: tuple[str, ...] = ()
    #: the digest the peers hold: a copy, or a restore from the backup, must arrive under it
    digest: str | None = None
    #: under ``peers-first``, the node that pulls the image from the registry
    #: for the others to copy (None when some node holds it already)
    seed: str | None = None
    #: the target node's platform, for ``ctr export --platform``
    platform: str | None = None
    #: the reference to pull when it is not the image's own name (a per-architecture entry)
    pull_as: str | None = None
    #: label the image pinned after the pull (a declared image with pin = true, containerd >= 1.7)
    pin: bool = False
    #: the digest the node holds the tag under, which its registry has moved from (to ``digest``):
    #: the pull fetches the tag again even though the node holds its name, and reports "updated"
    replaces: str | None = None
    #: the node and its peers are agent nodes: a copy is a pull from the holder's agent
    #: (imagesync.peerpull), not an export relayed by a worker
    mirror: bool = False

    def describe(self) -> str:
        """``registry, then node-1 if not found``: the route as ``plan`` shows it."""
        words = []
        for source in self.sources:
            if source == PEERS:
                words.append(_peers_text(self))
            elif source == REGISTRY and self.pull_as:
                words.append(f"registry ({self.pull_as})")
            else:
                words.append(source)
        moved = f" (moved: {_short(self.replaces)} -> {_short(self.digest or '')})" if self.replaces else ""
        if len(words) == 1:
            return words[0] + moved
        return words[0] + "".join(f", then {word}" for word in words[1:]) + " if not found" + moved

    def to_dict(self) -> dict:
        data: dict = {"sources": list(self.sources)}
        for name in ("peers", "digest", "seed", "platform", "pull_as", "pin", "replaces", "mirror"):
            value = getattr(self, name)
            if value:
                data[name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: Mapping | None) -> Route:
        if not data:
            return DEFAULT_ROUTE
        return cls(
            sources=tuple(data.get("sources") or (REGISTRY,)),
            peers=tuple(data.get("peers") or ()),
            digest=data.get("digest"),
            seed=data.get("seed"),
            platform=data.get("platform"),
            pull_as=data.get("pull_as"),
            pin=bool(data.get("pin", False)),
            replaces=data.get("replaces"),
            mirror=bool(data.get("mirror", False)),
        )


DEFAULT_ROUTE = Route()


def _short(digest: str) -> str:
    """``sha256:0123456789ab``: a digest as ``plan`` shows it."""
    algorithm, _, hex_digits = digest.partition(":")
    return f"{algorithm}:{hex_digits[:12]}" if hex_digits else digest


def _peers_text(route: Route) -> str:
    if route.peers:
        shown = ", ".join(route.peers[:3])
        return shown + (f" (+{len(route.peers) - 3})" if len(route.peers) > 3 else "")
    return f"nodes that hold it (after {route.seed})" if route.seed else "nodes that hold it"


@dataclass(frozen=True)
class Exclusion:
    """Why a node that lacks an image does not pull it: a kind and a reason with its figures."""

    kind: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "reason": self.reason}


@dataclass
class Plan:
    nodes: list[str]
    skipped: dict[str, str]
    wanted: list[str]
    holdings: dict[str, dict[str, str | None]]
    missing: dict[str, list[str]]
    drift: list[Drift] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    #: what each reachable node is: platform, image filesystem, abilities
    facts: dict[str, NodeFacts] = field(default_factory=dict)
    #: (node, image) -> where it comes from, for the pairs whose route is not the default
    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    #: node -> image -> why the node does not pull an image it lacks
    excluded: dict[str, dict[str, Exclusion]] = field(default_factory=dict)
    #: images known by the node they come from: reference -> size in bytes
    sizes: dict[str, int] = field(default_factory=dict)
    #: what the plan could not do, said once: nodes that take no part in copies, and why
    notes: list[str] = field(default_factory=list)
    #: (node, image) -> the reference the node pulls instead: its architecture's, of a per-architecture entry
    pull_as: dict[tuple[str, str], str] = field(default_factory=dict)
    #: node -> images it held at the end of the last run and lacks now (imagesync.room)
    evicted: dict[str, list[str]] = field(default_factory=dict)
    #: (node, image) -> (the digest the node holds the tag under, the one its registry names now):
    #: moved tags, which the node pulls again although it holds them (planning.refresh)
    moved: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    #: node -> its labels, which select the images of a prefix or entry that names some (planning.labels)
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def pulls(self) -> list[tuple[str, str]]:
        """(node, image) pairs, node by node."""
        return [(node, image) for node in self.nodes for image in self.missing.get(node, [])]

    @property
    def total(self) -> int:
        return sum(len(images) for images in self.missing.values())

    def held(self, node: str, image: str) -> tuple[bool, str | None]:
        """Whether ``node`` holds ``image`` (a wanted reference), and under which digest."""
        digest = held_as(self.holdings.get(node, {}), image)
        return (False, None) if digest is NOT_HELD else (True, digest)

    def route(self, node: str, image: str) -> Route:
        return self.routes.get((node, image), DEFAULT_ROUTE)

    def exclude(self, node: str, image: str, kind: str, reason: str) -> None:
        """Keep ``image`` off ``node`` in this run, saying why: a condition's one way to act."""
        self.drop(node, image)
        self.excluded.setdefault(node, {})[image] = Exclusion(kind, reason)

    def drop(self, node: str, image: str) -> None:
        """Take ``image`` off what ``node`` pulls in this run, saying nothing (a moved tag not refreshed there)."""
        images = self.missing.get(node)
        if images is not None and image in images:
            images.remove(image)
            if not images:
                del self.missing[node]
        self.moved.pop((node, image), None)

    def move(self, node: str, image: str, held: str, now: str) -> None:
        """``node`` holds the tag ``image`` under ``held``, and its registry names ``now``: it pulls it again."""
        images = self.missing.setdefault(node, [])
        if image not in images:
            images.append(image)
            images.sort()
        self.moved[(node, image)] = (held, now)

    def excluded_as_dict(self) -> dict[str, dict[str, dict[str, str]]]:
        return {node: {image: why.to_dict() for image, why in sorted(images.items())}
                for node, images in sorted(self.excluded.items())}

    def holders(self, image: str, platform: str | None = None, digest: str | None = None,
                via_agent: bool | None = None) -> tuple[list[str], str | None]:
        """The reachable nodes that hold ``image`` and can export it, and the digest they hold.

        Holders whose runtime names no digest for it count only when no holder
        names one (the digest is then None). When holders disagree (tag drift),
        the digest most of them hold wins,
        so that a copy spreads what the cluster mostly runs. With ``platform``,
        only holders of that platform count: a node keeps only its own
        platform's layers of a multi-platform image. With ``digest``, only its holders
        count (a moved tag's, under the digest its registry names now). With ``via_agent``, only
        holders reached the same way: agent nodes copy from agents, SSH nodes from SSH nodes.
        """
        candidates = [node for node, facts in self.facts.items() if facts.can_copy
                      and not (platform and facts.platform and facts.platform != platform)
                      and via_agent in (None, facts.via_agent)]
        by_digest = self.by_digest(image, candidates)
        if digest is not None:
            return by_digest.get(digest, []), digest
        if not by_digest:
            # holders whose runtime names no digest (an image imported with ctr):
            # the copy then checks against the digest the source exports
            return [node for node in sorted(set(candidates) & set(self.holdings)) if self.held(node, image)[0]], None
        digest = most_held(by_digest)
        return by_digest[digest], digest

    def digest_held(self, image: str, platform: str | None = None) -> str | None:
        """The digest most nodes (of ``platform``) that hold ``image`` hold it under, whether or
        not they can export it: the digest the cluster runs, which a restore must arrive under."""
        nodes = [node for node in self.holdings if not (platform and (facts := self.facts.get(node))
                                                        and facts.platform and facts.platform != platform)]
        return most_held(self.by_digest(image, nodes))

    def by_digest(self, image: str, nodes: Iterable[str] | None = None) -> dict[str, list[str]]:
        """digest -> the nodes (of ``nodes``, every node by default) holding ``image`` under it, sorted.
        A holder whose runtime names no digest for it is not counted."""
        found: dict[str, list[str]] = {}
        for node in sorted(self.holdings if nodes is None else set(nodes) & set(self.holdings)):
            held, digest = self.held(node, image)
            if held and digest:
                found.setdefault(digest, []).append(node)
        return found

    def to_dict(self) -> dict:
        return {
            "nodes": self.nodes,
            "skipped": self.skipped,
            "wanted": self.wanted,
            "missing": self.missing,
            "routes": {node: {image: self.route(node, image).to_dict() | {"from": self.route(node, image).describe()}
                              for image in images}
                       for node, images in self.missing.items()},
            "excluded": self.excluded_as_dict(),
            "evicted": dict(sorted(self.evicted.items())),
            "facts": {node: facts.to_dict() for node, facts in sorted(self.facts.items())},
            "labels": {node: list(labels) for node, labels in sorted(self.labels.items()) if labels},
            "drift": [{"reference": d.reference, "digests": dict(d.digests)} for d in self.drift],
            "moved": {node: {image: {"held": held, "now": now} for (n, image), (held, now) in sorted(self.moved.items())
                             if n == node}
                      for node in sorted({n for n, _ in self.moved})},
            "refused": [r.__dict__ for r in self.refused],
            "notes": self.notes,
        }


#: a condition looks at a plan and excludes what does not belong (plan.exclude)
Condition = Callable[[Plan], None]


@dataclass(frozen=True)
class Policy:
    """How a plan decides beyond what the nodes hold: what belongs where, and where it comes from."""

    #: "registry": every node pulls from the registry, other sources are fallbacks;
    #: "peers-first": one registry copy per image, then node to node
    source: str = "registry"
    #: copy from a node that holds the image when the registry cannot serve it
    transfer: bool = True
    #: restore from the backup registry when the registry cannot serve it
    backup: bool = False
    #: applied in order; each may exclude (node, image) pairs
    conditions: Sequence[Condition] = ()
    #: references the conditions need to see in the holdings, wanted or not
    #: (the per-architecture references of a declared entry)
    watch: frozenset[str] = frozenset()
    #: declared images to pin where the node's containerd can (pin = true)
    pinned: frozenset[str] = frozenset()


def most_held(by_digest: Mapping[str, Sequence[str]]) -> str | None:
    """The digest most holders hold (of a tie, the first in order): what the cluster mostly runs.
    None when nobody holds it (``by_digest`` is empty)."""
    if not by_digest:
        return None
    return max(sorted(by_digest), key=lambda digest: len(by_digest[digest]))


#: what :func:`held_as` answers for a reference the node does not hold
NOT_HELD = "not held"


def held_as(held: Mapping[str, str | None], ref: str) -> str | None:
    """The digest under which a node holding ``held`` holds ``ref`` (None when
    unknown), or ``NOT_HELD``.

    A digest reference is held when the node holds that digest under any name
    of the repository: tagged, untagged, or pinned (containerd keeps
    ``repo:tag@digest`` as ``repo@digest``).
    """
    if ref in held:
        return held[ref]
    if "@" not in ref:
        return NOT_HELD
    wanted = _repo_digest(ref)
    for name, digest in held.items():
        if digest and _repo_digest(name, digest) == wanted:
            return digest
    return NOT_HELD


def _repo_digest(ref: str, digest: str | None = None) -> tuple[str, str | None]:
    """(repository, digest) of a normalized reference: its own digest, or the one given."""
    parsed = references.parse(ref)
    return parsed.repository, parsed.digest or digest

