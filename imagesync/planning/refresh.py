"""Moved tags: a tag pushed again names a new digest in its registry, and the nodes that
hold it under the old one pull it again (``refresh``, on by default).

A node that holds a tag lacks nothing by its name, so the plan alone never
updates it: this condition asks each wanted tag's registry which digest the tag
names now, one ``HEAD`` per tag, in parallel, within the registry budget of a
plan (:func:`imagesync.registry.current_all`, with the logins of
``[registries]``). Every target node holding the tag under another digest pulls
it again (:meth:`Plan.move <imagesync.planning.plan.Plan.move>`): its route names
both digests, so that the pull fetches the tag although the node holds its
name, and reports "updated".

A run asks after sending the pulls that no answer can change (:class:`Later`); ``plan``
asks as it plans.

What the registry cannot settle (it does not answer, or the tag is gone there)
stays as it was: tag drift, reported, and no failure.

The digests a tag moved away from are remembered in Redis (:data:`imagesync.keys.MOVED`):
a node whose image came through the CRI keeps the old image as an untagged
``repo@digest`` name, and untagged images travel by digest, so every push of
``latest`` would otherwise spread one more old image to every node. Such a name
is not wanted (unless it is declared): a node keeps it until its image GC or a
prune takes it. Digest references
(``repo@sha256:...``) never move, and a per-architecture entry is held under a
digest per architecture, so neither is asked about. Tags no target node holds
are pulled anyway, and not asked about either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from .. import keys, references
from ..registry import LOOKUP_BUDGET, RegistryClient, current_all
from .plan import REGISTRY, Condition, Plan

if TYPE_CHECKING:
    from redis import Redis

    from ..config import Settings

log = logging.getLogger("imagesync")


#: seconds a digest a tag moved away from is remembered (refreshed whenever a holder is seen again)
MOVED_TTL = 90 * 24 * 3600


class Later:
    """Moved tags asked about after the first pulls (``later`` of :func:`moved_tags`).

    The condition then asks nothing: it notes the tags to ask about (:attr:`tags`) and the
    digest names an answer may turn into leftovers (:attr:`leftovers`), and moves no tag. The
    run sends the pulls that depend on no answer (:meth:`waiting` tells them apart), then
    asks (:meth:`ask`), and plans again with the answers (``answers`` of :func:`moved_tags`):
    what that plan adds, the moved tags' pulls first among them, follows in the same run.
    """

    def __init__(self) -> None:
        #: the wanted tags a target node holds under a known digest
        self.tags: list[str] = []
        #: the wanted ``repo@digest`` names of those tags' repositories
        self.leftovers: set[str] = set()

    def waiting(self, plan: Plan) -> set[tuple[str, str]]:
        """The planned pulls an answer may change: a digest name that may be a moved tag's
        leftover, and a tag asked about that is copied from its holders first (a copy must
        arrive under the digest the registry names now). A tag pulled from its registry first
        gets the digest the registry names, whatever the answer."""
        tags = set(self.tags)
        return {(node, image) for node, image in plan.pulls
                if image in self.leftovers or (image in tags and plan.route(node, image).sources[0] != REGISTRY)}

    def ask(self, settings: Settings, client: RegistryClient | None = None,
            budget: float = LOOKUP_BUDGET) -> dict[str, str]:
        """tag -> the digest its registry names now, for :attr:`tags`."""
        return _ask(settings, client, self.tags, budget)


def _ask(settings: Settings, client: RegistryClient | None, tags: list[str], budget: float) -> dict[str, str]:
    began = time.monotonic()
    now = current_all(client or RegistryClient(settings), tags, budget)
    log.info("current digests of %d of %d tags from their registries in %.2f s",
             len(now), len(tags), time.monotonic() - began)
    return now


def moved_tags(settings: Settings, client: RegistryClient | None = None, budget: float = LOOKUP_BUDGET,
               redis: Redis | None = None, later: Later | None = None,
               answers: Mapping[str, str] | None = None) -> Condition:
    """The condition that makes every target node holding a wanted tag under a digest its
    registry no longer names pull it again, and keeps the old digests' names from spreading
    (remembered in ``redis``; without it, only those of this plan).

    With ``later``, it asks nothing and moves nothing yet (see :class:`Later`); with
    ``answers`` (tag -> digest, asked already), it goes by them instead of asking."""
    per_arch = frozenset(settings.per_architecture())
    declared = references.normalized(settings.declared_images())

    def condition(plan: Plan) -> None:
        held = tags_held(plan, per_arch)
        left: set[str] = set()
        if held and later is not None:
            later.tags = held
            repositories = {references.parse(tag).repository for tag in held}
            later.leftovers = {ref for ref in plan.wanted if "@" in ref and ref not in declared
                               and references.parse(ref).repository in repositories}
        elif held:
            now = _ask(settings, client, held, budget) if answers is None else dict(answers)
            for image, digest in sorted(now.items()):
                for node in plan.nodes:
                    holds, old = plan.held(node, image)
                    if holds and old and old != digest:
                        plan.move(node, image, old, digest)
                left |= {_digest_name(image, old) for old in plan.by_digest(image) if old != digest}
            remember(redis, left)
        candidates = [ref for ref in plan.wanted if "@" in ref and ref not in declared]
        for ref in sorted(left.union(recalled(redis, candidates)).intersection(candidates)):
            plan.wanted.remove(ref)  # a leftover of a moved tag: nobody needs it spread
            for node in list(plan.missing):
                plan.drop(node, ref)

    return condition


def remember(redis: Redis | None, names: Iterable[str]) -> None:
    """Keep ``names`` (``repo@digest``) as digests a tag moved away from."""
    names = sorted(names)
    if redis is None or not names:
        return
    with redis.pipeline(transaction=False) as pipe:
        pipe.hset(keys.MOVED, mapping=dict.fromkeys(names, int(time.time())))
        pipe.expire(keys.MOVED, MOVED_TTL)
        pipe.execute()


def recalled(redis: Redis | None, names: list[str]) -> set[str]:
    """Those of ``names`` that a tag moved away from, as earlier plans saw it."""
    if redis is None or not names:
        return set()
    found = redis.hmget(keys.MOVED, names)
    return {name for name, when in zip(names, found, strict=True) if when is not None}


def _digest_name(image: str, digest: str) -> str:
    """``repo@digest``, normalized as the holdings name an untagged image."""
    return str(references.parse(f"{references.parse(image).repository}@{digest}"))




def tags_held(plan: Plan, skip: frozenset[str] = frozenset()) -> list[str]:
    """The wanted tags (not digest references, nor those in ``skip``) that a target node holds
    under a known digest: those a registry's answer may move."""
    return [image for image in plan.wanted
            if "@" not in image and image not in skip
            and any(plan.held(node, image)[1] for node in plan.nodes)]
