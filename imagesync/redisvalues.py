"""Values read back from Redis, as the rest of imagesync uses them.

redis-py hands back bytes unless a client decodes its replies, and imagesync's
clients do not (Celery's and kombu's share the connection settings). Redis
``TIME`` is the one clock every host of a deployment shares: run records,
agent heartbeats and the exporter date things by it, never by a host's own.
"""

from __future__ import annotations

from typing import Any

from redis import Redis


def as_text(value: Any) -> Any:
    """A value read from Redis as text (redis-py gives bytes); anything else as it is."""
    return value.decode() if isinstance(value, bytes) else value


def seconds_of(reply: tuple[int, int]) -> float:
    """A ``TIME`` reply (seconds, microseconds), as in a pipeline's answers, in seconds."""
    seconds, micros = reply
    return seconds + micros / 1e6


def server_time(redis: Redis) -> float:
    """Redis's clock, in seconds."""
    return seconds_of(redis.time())  # type: ignore[arg-type]
