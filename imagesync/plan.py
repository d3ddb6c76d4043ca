"""Planning: from what each node holds, what each node must pull. Pure functions, no I/O.

The wanted set is the union, over the reachable nodes, of the references that
lie under a configured prefix, plus the declared images. A node lacks a
reference it does not hold. Unreachable nodes take no part: they are neither
sources (their images do not become wanted) nor targets.

References are normalized as the runtime does it; a name that fails the
grammar is refused and reported, and never becomes a pull.

Two more decisions are made here, once, for every (node, image) the node lacks:

* whether the image belongs on the node at all. Each *condition* of the
  :class:`Policy` (the platform check, the room check, ...) may exclude a
  pair, with a kind (``n/a``, ``skipped``) and a reason; an excluded pair is
  not pulled and is not a failure.
* where the image comes from: a :class:`Route`, the sources tried in order
  (the registry, the backup registry, nodes that hold it) and what each needs.
  The pull path (:mod:`imagesync.pulls`) follows the route.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from . import references
from .errors import RefusedReference
from .facts import NodeFacts
from .runtimes import Image

#: the sources a node's missing image can come from
REGISTRY, BACKUP, PEERS = "registry", "backup", "peers"
#: kinds of exclusion: the image is not for this node (nothing for its platform, shown "n/a");
#: it would be, but is not pulled there now. A pull's outcome "not_applicable" is runs.NOT_APPLICABLE.
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
        if len(words) == 1:
            return words[0]
        return words[0] + "".join(f", then {word}" for word in words[1:]) + " if not found"

    def to_dict(self) -> dict:
        data: dict = {"sources": list(self.sources)}
        for name in ("peers", "digest", "seed", "platform", "pull_as", "pin"):
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
        )


DEFAULT_ROUTE = Route()


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
        return (False, None) if digest is _NOT_HELD else (True, digest)

    def route(self, node: str, image: str) -> Route:
        return self.routes.get((node, image), DEFAULT_ROUTE)

    def exclude(self, node: str, image: str, kind: str, reason: str) -> None:
        """Keep ``image`` off ``node`` in this run, saying why: a condition's one way to act."""
        images = self.missing.get(node)
        if images is not None and image in images:
            images.remove(image)
            if not images:
                del self.missing[node]
        self.excluded.setdefault(node, {})[image] = Exclusion(kind, reason)

    def excluded_as_dict(self) -> dict[str, dict[str, dict[str, str]]]:
        return {node: {image: why.to_dict() for image, why in sorted(images.items())}
                for node, images in sorted(self.excluded.items())}

    def holders(self, image: str, platform: str | None = None) -> tuple[list[str], str | None]:
        """The reachable nodes that hold ``image`` and can export it, and the digest they hold.

        Holders whose runtime names no digest for it count only when no holder
        names one (the digest is then None). When holders disagree (tag drift),
        the digest most of them hold wins,
        so that a copy spreads what the cluster mostly runs. With ``platform``,
        only holders of that platform count: a node keeps only its own
        platform's layers of a multi-platform image.
        """
        candidates = [node for node, facts in self.facts.items() if facts.can_copy
                      and not (platform and facts.platform and facts.platform != platform)]
        by_digest = self.by_digest(image, candidates)
        if not by_digest:
            # holders whose runtime names no digest (an image imported with ctr):
            # the copy then checks against the digest the source exports
            return [node for node in sorted(set(candidates) & set(self.holdings)) if self.held(node, image)[0]], None
        digest = most_held(by_digest)
        return by_digest[digest], digest

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
            "drift": [{"reference": d.reference, "digests": dict(d.digests)} for d in self.drift],
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


def routes(plan: Plan, policy: Policy) -> dict[tuple[str, str], Route]:
    """Where each pull of ``plan`` comes from, under ``policy``.

    The registry comes first, then the backup, then the nodes that hold the
    image. Under ``peers-first`` the holders come first; an image no node
    holds yet is pulled from the registry by one node (its *seed*; seeds are
    spread over the nodes), and the others copy it from whoever holds it.
    """
    chosen: dict[tuple[str, str], Route] = {}
    load: Counter[str] = Counter()  # images each node seeds
    for image, lacking in _by_image(plan.missing).items():
        seed = None
        for node in lacking:
            facts = plan.facts.get(node)
            platform = facts.platform if facts else None
            can_copy = policy.transfer and facts is not None and facts.can_copy
            # with a backup, the digest even without copies: a restore must arrive under it
            peers, digest = plan.holders(image, platform) if can_copy or policy.backup else ([], None)
            peers = peers if can_copy else []
            sources = [REGISTRY] + ([BACKUP] if policy.backup else [])
            waits_for = None
            if can_copy and policy.source == "peers-first":
                if not peers and seed is None:
                    # nobody holds it: the least loaded node that lacks it fetches it for the others
                    seed = min((n for n in lacking if _can_copy(plan, policy, n)), key=lambda n: (load[n], n))
                    load[seed] += 1
                if peers or node != seed:
                    sources.insert(0, PEERS)
                    waits_for = None if peers else seed
                else:
                    sources.append(PEERS)
            elif peers:
                sources.append(PEERS)
            route = Route(tuple(sources), tuple(peers), digest, waits_for, platform if can_copy else None,
                          plan.pull_as.get((node, image)), pin=image in policy.pinned and bool(facts and facts.can_pin))
            if route.sources != (REGISTRY,) or route.pull_as or route.pin:
                chosen[(node, image)] = route
    return chosen


def copy_notes(plan: Plan, policy: Policy) -> list[str]:
    """Why some reachable nodes take no part in node-to-node copies, one line per reason."""
    if not policy.transfer:
        return []
    no_ctr = [node for node, facts in sorted(plan.facts.items()) if not facts.ctr]
    agents = [node for node, facts in sorted(plan.facts.items()) if facts.ctr and facts.via_agent]
    notes = []
    if no_ctr:
        notes.append(f"no node-to-node copies to or from {', '.join(no_ctr)}: ctr is not on "
                     f"{'it' if len(no_ctr) == 1 else 'them'} (install containerd's ctr, or set transfer = false)")
    if agents:
        notes.append(f"no node-to-node copies to or from {', '.join(agents)}: agent nodes run commands on their "
                     "own node only")
    return notes


def _can_copy(plan: Plan, policy: Policy, node: str) -> bool:
    facts = plan.facts.get(node)
    return policy.transfer and facts is not None and facts.can_copy


def _by_image(missing: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """image -> the nodes that lack it, in name order; images in name order."""
    by_image: dict[str, list[str]] = {}
    for node in sorted(missing):
        for image in missing[node]:
            by_image.setdefault(image, []).append(node)
    return dict(sorted(by_image.items()))


#: what holdings() decided about one name: (reference, its string) if it is kept,
#: None if it lies outside the prefixes, or (shown name, reason) if it was refused
_Verdict = tuple[references.Reference, str] | tuple[str, str] | None


def holdings(
    node: str,
    images: Iterable[Image],
    prefixes: Iterable[str],
    exact: Iterable[str] = (),
    memo: dict[str, _Verdict] | None = None,
    exclude: Iterable[str] = (),
) -> Holdings:
    """The references of ``images`` under ``prefixes`` or in ``exact``, and matching none
    of the ``exclude`` patterns, normalized, with digests.

    Tags are kept with the digest of the same repository; an untagged image is
    kept by its digest references (``repo@sha256:...``). ``memo`` carries the
    verdict on each name from one node to the next: it must only be shared
    between calls with the same ``prefixes``, ``exact`` and ``exclude``.
    """
    prefixes = tuple(prefixes)
    excluded = tuple(exclude)
    exact = frozenset(exact)
    held: dict[str, str | None] = {}
    sizes: dict[str, int] = {}
    refused: list[Refusal] = []
    verdicts: dict[str, _Verdict] = {} if memo is None else memo

    def judge(text: str) -> _Verdict:
        try:
            ref = references.parse(text)
        except RefusedReference as exc:
            return (exc.reference, exc.reason)
        name = str(ref)
        if excluded and references.matches_any_pattern(ref, excluded):
            return None
        if name in exact or references.matches_any(ref, prefixes):
            return (ref, name)
        return None

    def accept(text: str) -> tuple[references.Reference, str] | None:
        """The reference and its normalized name, if ``text`` is kept."""
        try:
            verdict = verdicts[text]
        except KeyError:
            verdict = verdicts[text] = judge(text)
        except TypeError:  # a name that is not even a string
            verdict = judge(text)
        if verdict is None:
            return None
        if isinstance(verdict[0], str):
            refused.append(Refusal(node, verdict[0], verdict[1]))
            return None
        return verdict  # type: ignore[return-value]

    for image in images:
        digests: dict[str, str] = {}
        digest_refs: list[tuple[str, str]] = []
        for text in image.digests:
            kept = accept(text)
            if kept is not None and kept[0].digest:
                ref, name = kept
                digests[ref.repository] = ref.digest  # type: ignore[assignment]
                digest_refs.append((name, ref.digest))  # type: ignore[arg-type]
        tagged = False
        for text in image.tags:
            kept = accept(text)
            if kept is not None:
                # a declared tag outside the prefixes: its repo digest was not kept by itself
                digest = digests.get(kept[0].repository) or _digest_of_repository(image, kept[0].repository)
                held[kept[1]] = digest
                tagged = True
                if image.size:
                    sizes[kept[1]] = image.size
        if not tagged:
            for name, digest in digest_refs:
                held[name] = digest
                if image.size:
                    sizes[name] = image.size
    return Holdings(node, held, tuple(refused), sizes)


def _digest_of_repository(image: Image, repository: str) -> str | None:
    """The digest of ``image``'s repo digest reference in ``repository``, if it has one."""
    for text in image.digests:
        try:
            ref = references.parse(text)
        except (RefusedReference, TypeError):
            continue
        if ref.repository == repository and ref.digest:
            return ref.digest
    return None


def most_held(by_digest: Mapping[str, Sequence[str]]) -> str:
    """The digest most holders hold (of a tie, the first in order): what the cluster mostly runs."""
    return max(sorted(by_digest), key=lambda digest: len(by_digest[digest]))


def make_plan(
    inventories: Mapping[str, Iterable[Image]],
    prefixes: Iterable[str],
    declared: Iterable[str] = (),
    unreachable: Mapping[str, str] | None = None,
    targets: Iterable[str] | None = None,
    facts: Mapping[str, NodeFacts] | None = None,
    policy: Policy | None = None,
    exclude: Iterable[str] = (),
) -> Plan:
    """Plan a run.

    ``inventories`` maps each reachable node to its images; ``unreachable``
    maps each node that could not be asked to the reason. ``targets`` limits
    which nodes receive pulls (all reachable nodes by default); every
    reachable node is still a source. ``facts`` are the nodes' platforms,
    disks and abilities; ``policy`` the conditions and sources (pulls from
    the registry alone, and nothing excluded, without one). An image that
    matches an ``exclude`` pattern is never wanted, even when declared.
    """
    prefixes = tuple(prefixes)
    exclude = tuple(exclude)
    refused: list[Refusal] = []
    wanted: set[str] = set()
    for text in declared:
        try:
            ref = references.parse(text)
        except RefusedReference as exc:
            refused.append(Refusal("config", exc.reference, exc.reason))
            continue
        if not (exclude and references.matches_any_pattern(ref, exclude)):
            wanted.add(str(ref))
    # every node reports mostly the same names: judge each name once
    memo: dict[str, _Verdict] = {}
    declared_wanted = frozenset(wanted)
    # watched references are held like declared ones, but wanted only if a prefix wants them
    watched = (policy.watch if policy else frozenset()) - declared_wanted
    watched = frozenset(ref for ref in watched if not references.matches_any(references.parse(ref), prefixes))
    per_node = {
        node: holdings(node, images, prefixes, exact=declared_wanted | watched, memo=memo, exclude=exclude)
        for node, images in inventories.items()
    }
    for h in per_node.values():
        refused.extend(h.refused)
        wanted.update(ref for ref in h.references if ref not in watched)

    chosen = set(per_node) if targets is None else set(targets) & set(per_node)
    nodes = sorted(chosen)
    missing = {}
    for node in nodes:
        held = per_node[node].references
        missing[node] = sorted(ref for ref in wanted if held_as(held, ref) is _NOT_HELD)
    sizes: dict[str, int] = {}
    for h in per_node.values():
        for name, size in h.sizes.items():
            sizes.setdefault(name, size)
    plan = Plan(
        nodes=nodes,
        skipped=dict(sorted((unreachable or {}).items())),
        wanted=sorted(wanted),
        holdings={node: dict(h.references) for node, h in sorted(per_node.items())},
        missing={node: images for node, images in missing.items() if images},
        drift=find_drift(per_node.values()),
        refused=refused,
        facts=dict(facts or {}),
        sizes=sizes,
    )
    policy = policy or Policy(transfer=False)
    for condition in policy.conditions:
        condition(plan)
    plan.routes = routes(plan, policy)
    plan.notes = copy_notes(plan, policy)
    # a node's registry pulls go first: under peers-first, the copies other
    # nodes wait for never queue behind this node's own waiting copies
    for node, images in plan.missing.items():
        copies = {image for image in images if plan.route(node, image).sources[0] == PEERS}
        images.sort(key=copies.__contains__)
    return plan


_NOT_HELD = "not held"


def held_as(held: Mapping[str, str | None], ref: str) -> str | None:
    """The digest under which a node holding ``held`` holds ``ref`` (None when
    unknown), or ``_NOT_HELD``.

    A digest reference is held when the node holds that digest under any name
    of the repository: tagged, untagged, or pinned (containerd keeps
    ``repo:tag@digest`` as ``repo@digest``).
    """
    if ref in held:
        return held[ref]
    if "@" not in ref:
        return _NOT_HELD
    wanted = _repo_digest(ref)
    for name, digest in held.items():
        if digest and _repo_digest(name, digest) == wanted:
            return digest
    return _NOT_HELD


def _repo_digest(ref: str, digest: str | None = None) -> tuple[str, str | None]:
    """(repository, digest) of a normalized reference: its own digest, or the one given."""
    parsed = references.parse(ref)
    return parsed.repository, parsed.digest or digest


def find_drift(per_node: Iterable[Holdings]) -> list[Drift]:
    """Tags held by two or more nodes with different digests."""
    seen: dict[str, dict[str, str]] = {}
    for h in per_node:
        for ref, digest in h.references.items():
            if digest is not None and "@" not in ref:
                seen.setdefault(ref, {})[h.node] = digest
    return [
        Drift(ref, dict(sorted(digests.items())))
        for ref, digests in sorted(seen.items())
        if len(set(digests.values())) > 1
    ]
