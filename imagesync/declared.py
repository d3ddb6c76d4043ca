"""The images declared in some run, remembered in Redis: which images imagesync manages
besides those under its prefixes, once the configuration declares them no more.

``imagesync prune`` removes an image from a node only if imagesync manages it. An
image under a configured prefix is managed as long as the prefix is configured. A
declared image would stop being managed the moment its line leaves the
configuration, which is exactly when prune should take it back: so every run
records what it declares (:func:`remember`), and prune reads it back
(:func:`remembered`). Nothing is ever forgotten: an image once declared stays
imagesync's to remove.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from redis import Redis

from . import keys, references
from .redisvalues import as_text

if TYPE_CHECKING:
    from .config import Settings


def declared_now(settings: Settings) -> frozenset[str]:
    """Every image the configuration declares, normalized: the ``ref`` of each entry and each of
    its per-architecture references (what a node of that architecture pulls and holds).
    Names the grammar refuses are left out (the plan reports them)."""
    names = [*settings.declared_images(), *(ref for arch in settings.per_architecture().values()
                                            for ref in arch.values())]
    return references.normalized(names)


def remember(redis: Redis, settings: Settings, run_id: str) -> None:
    """Record that run ``run_id`` declared what the configuration declares now (one round trip)."""
    declared = declared_now(settings)
    if declared:
        redis.hset(keys.DECLARED, mapping={image: run_id for image in sorted(declared)})


def remembered(redis: Redis) -> dict[str, str]:
    """Every image declared in some run -> the id of the last run that declared it."""
    return {as_text(image): as_text(run_id) for image, run_id in redis.hgetall(keys.DECLARED).items()}
