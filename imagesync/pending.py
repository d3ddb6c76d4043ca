"""The pushed images waiting for a run (``imagesync webhook``), kept until a run has sent their pulls.

A pushed image that no node holds yet is wanted by no later run: if it left
the set and its run then failed (the inventory or the plan raised, the run
lost its lock or was cancelled, reached no node, or its control worker died
mid-start), it would never be synced. So a run reads which of its images are
still pending when it takes the lock (:meth:`Pending.take`) and removes them
only once it has sent their pulls, or found that no reachable node lacks them
(:meth:`Pending.settle`); until then they stay, and the webhook's loop sends
them again once the lock frees.

Each push also counts up the image's number in a hash beside the set: a run
removes an image only if it was not pushed again since the run read it, so a
push of the same tag during a run (a new digest, perhaps) is run after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from redis import Redis

from . import keys
from .redisvalues import as_text

# KEYS[1] the pending set, KEYS[2] the push counts; ARGV: image, count read, image, count read, ...
# Removes each image whose count is still the one read ("" for none); returns how many it removed.
_SETTLE = """
local removed = 0
for i = 1, #ARGV, 2 do
    local now = redis.call('HGET', KEYS[2], ARGV[i]) or ''
    if now == ARGV[i + 1] then
        removed = removed + redis.call('SREM', KEYS[1], ARGV[i])
        redis.call('HDEL', KEYS[2], ARGV[i])
    end
end
return removed
"""


class Pending:
    """The webhook's pending images: a set, and how many times each was pushed."""

    def __init__(self, redis: Redis, key: str = keys.WEBHOOK_PENDING, counts: str = keys.WEBHOOK_PUSHES) -> None:
        self.redis, self.key, self.counts = redis, key, counts
        self._settle = redis.register_script(_SETTLE)

    def add(self, images: Iterable[str]) -> None:
        """A push of ``images``: pending, each counted once more."""
        images = list(dict.fromkeys(images))
        if not images:
            return
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self.key, *images)
            for image in images:
                pipe.hincrby(self.counts, image, 1)
            pipe.execute()

    def images(self) -> list[str]:
        return sorted(as_text(member) or "" for member in self.redis.smembers(self.key))

    def take(self, images: Iterable[str]) -> dict[str, str]:
        """Those of ``images`` still pending -> their push count as read now ("" for none).

        They stay in the set: :meth:`settle` removes them once their run has sent their pulls.
        """
        images = list(dict.fromkeys(images))
        if not images:
            return {}
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.smismember(self.key, images)
            pipe.hmget(self.counts, images)
            member, counts = pipe.execute()
        return {image: as_text(count) or "" for image, there, count in zip(images, member, counts, strict=True)
                if there}

    def settle(self, taken: Mapping[str, str]) -> int:
        """Remove the images of ``taken`` that were not pushed again since :meth:`take`; how many."""
        if not taken:
            return 0
        args = [value for image, count in taken.items() for value in (image, count)]
        return int(self._settle(keys=[self.key, self.counts], args=args))
