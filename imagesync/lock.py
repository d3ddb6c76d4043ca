"""The single-run lock.

Unlike redis-py's ``Lock`` (whose token is thread-local), this lock must
outlive the task that took it: the sync task acquires it, and whichever pull
task finishes the run releases it, in another process. So the token is the
run id, it has a TTL, the run renews it each time it makes progress, and
release is compare-and-delete. A run that dies holding it loses it when the
TTL runs out; nobody ever has to remove it by hand.
"""

from __future__ import annotations

from redis import Redis

from . import keys
from .redisvalues import as_text

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class RunLock:
    """A lock held by one run at a time, identified by its run id."""

    def __init__(self, redis: Redis, ttl: int, key: str = keys.LOCK) -> None:
        self.redis = redis
        self.ttl = int(ttl)
        self.key = key
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def acquire(self, run_id: str) -> bool:
        """Take the lock for ``run_id``; False if another run holds it."""
        return bool(self.redis.set(self.key, run_id, nx=True, ex=self.ttl))

    def holder(self) -> str | None:
        return as_text(self.redis.get(self.key))

    def renew(self, run_id: str) -> bool:
        """Extend the lock by its TTL, if ``run_id`` still holds it."""
        return bool(self._renew(keys=[self.key], args=[run_id, self.ttl]))

    def release(self, run_id: str) -> bool:
        """Release the lock, if ``run_id`` holds it (never someone else's)."""
        return bool(self._release(keys=[self.key], args=[run_id]))
