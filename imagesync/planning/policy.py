"""The planner's policy for this configuration: what belongs on which node, and
where a missing image comes from (see :class:`imagesync.planning.plan.Policy`).

This is the one place where the conditions (platform, room, ...) and the
sources (registry, backup, peers) are put together from the settings. A new
condition is a function of the plan added to the list; a new source is a name
in the route and a fetcher in :data:`imagesync.pulls.SOURCES`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from . import labels, platforms, refresh, room
from .plan import Condition, Policy

if TYPE_CHECKING:
    from redis import Redis

    from ..config import Settings


def policy_for(settings: Settings, redis: Redis | None = None, limited: bool = False,
               nodes: Iterable[str] = (), platform_check: platforms.PlatformCheck | None = None,
               later: refresh.Later | None = None, answers: Mapping[str, str] | None = None) -> Policy:
    """The policy of ``settings``; ``redis`` holds what earlier runs learned of ``nodes``
    (every node a run may target; conditions that need Redis do without, and say so,
    when it is None). ``limited``: the run wants only some images (it cannot tell about
    the others). ``platform_check``: the platform condition to use, one that a run
    settles after sending the pulls that need no registry's answer (by default, the
    condition asks the registries itself). ``later`` and ``answers``: moved tags asked
    about after the first pulls, and the answers then (:class:`refresh.Later`)."""
    conditions: list[Condition] = []
    conditions.append(platforms.per_architecture(settings.per_architecture()))
    if settings.refresh:
        # moved tags: a node holding a tag under another digest than its registry names now pulls it again
        conditions.append(refresh.moved_tags(settings, redis=redis, later=later, answers=answers))
    # labels after refresh: a node outside an image's selection is neither given it nor updated
    conditions.append(labels.label_condition(settings, redis))
    conditions.append(platform_check or platforms.platform_condition(settings, redis))
    # evicted images first, so that the room check promises nothing to them
    conditions += room.conditions_for(settings, redis, limited, nodes)
    return Policy(
        source=settings.source,
        transfer=settings.transfer,
        # with a backup configured, a pull the registry cannot serve is restored
        # from it: registry, then backup, then peers (planning.routes)
        backup=settings.backup is not None,
        conditions=tuple(conditions),
        watch=platforms.arch_references(settings.per_architecture()),
        pinned=settings.pinned_images(),
    )
