"""A counting semaphore in Redis whose leases outlive their holder only by a TTL.

At most ``limit`` holders at once hold a slot. The semaphore is one sorted
set: member = holder, score = the instant its lease runs out, on Redis's
clock (``TIME``), the one clock every host of a deployment shares. Each
operation is one Lua script that first drops the leases that have run out,
so taking the last slot, giving one back and counting are exact however many
processes on however many hosts race for them. A holder that dies without
releasing its slot holds it until its lease runs out, never longer; nobody
has to clear it by hand.

A holder names one taking of a slot: two processes must never use the same
name, or the second takes no slot of its own (``acquire`` answers True for a
holder that already holds one).
"""

from __future__ import annotations

import math

from redis import Redis

from .redisvalues import as_text

# KEYS[1] the set; ARGV[1] holder, ARGV[2] limit, ARGV[3] lease in ms.
# A holder that already holds a slot keeps it and its lease is renewed.
# The key expires with its longest lease, so an idle semaphore leaves nothing.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local function lease(ms)
    redis.call('ZADD', KEYS[1], now + ms, ARGV[1])
    if redis.call('PTTL', KEYS[1]) < ms then redis.call('PEXPIRE', KEYS[1], ms) end
end
"""

_ACQUIRE = _PRELUDE + """
local ms = tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    lease(ms)
    return 1
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
    lease(ms)
    return 1
end
return 0
"""

# ARGV[1] holder, ARGV[2] lease in ms; 0 if the holder had no (live) lease.
_REFRESH = _PRELUDE + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
lease(tonumber(ARGV[2]))
return 1
"""

_HOLDERS = _PRELUDE + """
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


class Semaphore:
    """At most ``limit`` holders of ``key`` at once, each for ``ttl`` seconds at most
    unless it refreshes its lease."""

    def __init__(self, redis: Redis, key: str, limit: int, ttl: float) -> None:
        if limit < 1:
            raise ValueError(f"a semaphore needs a limit of at least 1, not {limit}")
        if ttl <= 0:
            raise ValueError(f"a lease needs a positive TTL, not {ttl}")
        self.redis = redis
        self.key = key
        self.limit = int(limit)
        self.ttl = float(ttl)
        self._ttl_ms = max(1, math.ceil(self.ttl * 1000))
        self._acquire = redis.register_script(_ACQUIRE)
        self._refresh = redis.register_script(_REFRESH)
        self._holders = redis.register_script(_HOLDERS)

    def acquire(self, holder: str) -> bool:
        """Take a slot for ``holder`` without waiting; True if it holds one now
        (a holder that already held one keeps it, its lease renewed)."""
        return bool(self._acquire(keys=[self.key], args=[holder, self.limit, self._ttl_ms]))

    def release(self, holder: str) -> None:
        """Give ``holder``'s slot back (nothing happens if it holds none)."""
        self.redis.zrem(self.key, holder)

    def refresh(self, holder: str) -> bool:
        """Extend ``holder``'s lease by ``ttl`` from now; False if it no longer holds a
        slot (its lease ran out, and the slot may have gone to someone else)."""
        return bool(self._refresh(keys=[self.key], args=[holder, self._ttl_ms]))

    def holders(self) -> list[str]:
        """Who holds a slot now, leases that ran out left out."""
        return [as_text(h) for h in self._holders(keys=[self.key])]
