"""Planning: from what each node holds, what each node must pull. Pure functions, no I/O.

The wanted set is the union, over the reachable nodes, of the references that
lie under a configured prefix, plus the declared images. A node lacks a
reference it does not hold. Unreachable nodes take no part: they are neither
sources (their images do not become wanted) nor targets.

References are normalized as the runtime does it; a name that fails the
grammar is refused and reported, and never becomes a pull.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from . import references
from .errors import RefusedReference
from .runtimes import Image


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


@dataclass
class Plan:
    nodes: list[str]
    skipped: dict[str, str]
    wanted: list[str]
    holdings: dict[str, dict[str, str | None]]
    missing: dict[str, list[str]]
    drift: list[Drift] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

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

    def to_dict(self) -> dict:
        return {
            "nodes": self.nodes,
            "skipped": self.skipped,
            "wanted": self.wanted,
            "missing": self.missing,
            "drift": [{"reference": d.reference, "digests": dict(d.digests)} for d in self.drift],
            "refused": [r.__dict__ for r in self.refused],
        }


#: what holdings() decided about one name: (reference, its string) if it is kept,
#: None if it lies outside the prefixes, or (shown name, reason) if it was refused
_Verdict = tuple[references.Reference, str] | tuple[str, str] | None


def holdings(
    node: str,
    images: Iterable[Image],
    prefixes: Iterable[str],
    exact: Iterable[str] = (),
    memo: dict[str, _Verdict] | None = None,
) -> Holdings:
    """The references of ``images`` under ``prefixes`` or in ``exact``, normalized, with digests.

    Tags are kept with the digest of the same repository; an untagged image is
    kept by its digest references (``repo@sha256:...``). ``memo`` carries the
    verdict on each name from one node to the next: it must only be shared
    between calls with the same ``prefixes`` and ``exact``.
    """
    prefixes = tuple(prefixes)
    exact = frozenset(exact)
    held: dict[str, str | None] = {}
    refused: list[Refusal] = []
    verdicts: dict[str, _Verdict] = {} if memo is None else memo

    def judge(text: str) -> _Verdict:
        try:
            ref = references.parse(text)
        except RefusedReference as exc:
            return (exc.reference, exc.reason)
        name = str(ref)
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
                held[kept[1]] = digests.get(kept[0].repository)
                tagged = True
        if not tagged:
            for name, digest in digest_refs:
                held[name] = digest
    return Holdings(node, held, tuple(refused))


def make_plan(
    inventories: Mapping[str, Iterable[Image]],
    prefixes: Iterable[str],
    declared: Iterable[str] = (),
    unreachable: Mapping[str, str] | None = None,
    targets: Iterable[str] | None = None,
) -> Plan:
    """Plan a run.

    ``inventories`` maps each reachable node to its images; ``unreachable``
    maps each node that could not be asked to the reason. ``targets`` limits
    which nodes receive pulls (all reachable nodes by default); every
    reachable node is still a source.
    """
    prefixes = tuple(prefixes)
    refused: list[Refusal] = []
    wanted: set[str] = set()
    for text in declared:
        try:
            wanted.add(references.normalize(text))
        except RefusedReference as exc:
            refused.append(Refusal("config", exc.reference, exc.reason))
    # every node reports mostly the same names: judge each name once
    memo: dict[str, _Verdict] = {}
    declared_wanted = frozenset(wanted)
    per_node = {
        node: holdings(node, images, prefixes, exact=declared_wanted, memo=memo)
        for node, images in inventories.items()
    }
    for h in per_node.values():
        refused.extend(h.refused)
        wanted.update(h.references)

    chosen = set(per_node) if targets is None else set(targets) & set(per_node)
    nodes = sorted(chosen)
    missing = {}
    for node in nodes:
        held = per_node[node].references
        missing[node] = sorted(ref for ref in wanted if held_as(held, ref) is _NOT_HELD)
    return Plan(
        nodes=nodes,
        skipped=dict(sorted((unreachable or {}).items())),
        wanted=sorted(wanted),
        holdings={node: dict(h.references) for node, h in sorted(per_node.items())},
        missing={node: images for node, images in missing.items() if images},
        drift=find_drift(per_node.values()),
        refused=refused,
    )


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
