"""What each node holds: the references of its images that the run cares about,
normalized, with their digests, and the tags whose digest differs between nodes.
Pure functions, no I/O.

References are normalized as the runtime does it; a name that fails the
grammar is refused and reported, and never becomes a pull.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import references
from ..errors import RefusedReference
from ..runtimes import Image
from .plan import Drift, Holdings, Refusal

#: what holdings() decided about one name: (reference, its string) if it is kept,
#: None if it lies outside the prefixes, or (shown name, reason) if it was refused
NameVerdict = tuple[references.Reference, str] | tuple[str, str] | None


def holdings(
    node: str,
    images: Iterable[Image],
    prefixes: Iterable[str],
    exact: Iterable[str] = (),
    memo: dict[str, NameVerdict] | None = None,
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
    verdicts: dict[str, NameVerdict] = {} if memo is None else memo

    def judge(text: str) -> NameVerdict:
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
