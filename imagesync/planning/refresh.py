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

What the registry cannot settle (it does not answer, or the tag is gone there)
stays as it was: tag drift, reported, and no failure. Digest references
(``repo@sha256:...``) never move, and a per-architecture entry is held under a
digest per architecture, so neither is asked about. Tags no target node holds
are pulled anyway, and not asked about either.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..registry import LOOKUP_BUDGET, RegistryClient, current_all
from .plan import Condition, Plan

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger("imagesync")


def moved_tags(settings: Settings, client: RegistryClient | None = None, budget: float = LOOKUP_BUDGET
               ) -> Condition:
    """The condition that makes every target node holding a wanted tag under a digest its
    registry no longer names pull it again."""
    per_arch = frozenset(settings.per_architecture())

    def condition(plan: Plan) -> None:
        held = tags_held(plan, per_arch)
        if not held:
            return
        began = time.monotonic()
        now = current_all(client or RegistryClient(settings), held, budget)
        log.info("current digests of %d of %d tags from their registries in %.2f s",
                 len(now), len(held), time.monotonic() - began)
        for image, digest in sorted(now.items()):
            for node in plan.nodes:
                holds, old = plan.held(node, image)
                if holds and old and old != digest:
                    plan.move(node, image, old, digest)

    return condition


def tags_held(plan: Plan, skip: frozenset[str] = frozenset()) -> list[str]:
    """The wanted tags (not digest references, nor those in ``skip``) that a target node holds
    under a known digest: those a registry's answer may move."""
    return [image for image in plan.wanted
            if "@" not in image and image not in skip
            and any(plan.held(node, image)[1] for node in plan.nodes)]
