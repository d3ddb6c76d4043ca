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

    def to_dict(self) -> dict:
        return {
            "nodes": self.nodes,
            "skipped": self.skipped,
            "wanted": self.wanted,
            "missing": self.missing,
            "drift": [{"reference": d.reference, "digests": dict(d.digests)} for d in self.drift],
            "refused": [r.__dict__ for r in self.refused],
        }


def holdings(
    node: str, images: Iterable[Image], prefixes: Iterable[str], exact: Iterable[str] = ()
) -> Holdings:
    """The references of ``images`` under ``prefixes`` or in ``exact``, normalized, with digests.

    Tags are kept with the digest of the same repository; an untagged image is
    kept by its digest references (``repo@sha256:...``).
    """
    prefixes = tuple(prefixes)
    exact = frozenset(exact)
    held: dict[str, str | None] = {}
    refused: list[Refusal] = []

    def accept(text: str) -> references.Reference | None:
        try:
            ref = references.parse(text)
        except RefusedReference as exc:
            refused.append(Refusal(node, exc.reference, exc.reason))
            return None
        if str(ref) in exact or references.matches_any(ref, prefixes):
            return ref
        return None

    for image in images:
        digests: dict[str, str] = {}
        digest_refs = []
        for text in image.digests:
            ref = accept(text)
            if ref is not None and ref.digest:
                digests[ref.repository] = ref.digest
                digest_refs.append(ref)
        tagged = False
        for text in image.tags:
            ref = accept(text)
            if ref is not None:
                held[str(ref)] = digests.get(ref.repository)
                tagged = True
        if not tagged:
            for ref in digest_refs:
                held[str(ref)] = ref.digest
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
    per_node = {
        node: holdings(node, images, prefixes, exact=wanted) for node, images in inventories.items()
    }
    for h in per_node.values():
        refused.extend(h.refused)
        wanted.update(h.references)

    chosen = set(per_node) if targets is None else set(targets) & set(per_node)
    nodes = sorted(chosen)
    missing = {
        node: sorted(ref for ref in wanted if ref not in per_node[node].references)
        for node in nodes
    }
    return Plan(
        nodes=nodes,
        skipped=dict(sorted((unreachable or {}).items())),
        wanted=sorted(wanted),
        holdings={node: dict(h.references) for node, h in sorted(per_node.items())},
        missing={node: images for node, images in missing.items() if images},
        drift=find_drift(per_node.values()),
        refused=refused,
    )


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
