"""The one place where imagesync makes a Redis client from its settings.

``redis_url`` is either one server (``redis://``, ``rediss://``, ``unix://``)
or Redis Sentinel: ``sentinel://HOST:26379;sentinel://HOST:26379/DB`` with
``redis_master_name``, the name the sentinels monitor the master by. A
Sentinel client asks the sentinels where the master is before it connects,
and asks again when a connection fails or the server it reached turns out to
be a replica (redis-py's ``SentinelConnectionPool``), so a client with a
``retry`` rides out a failover as it rides out a restart.

Celery's broker and result backend read the same URL themselves (kombu's and
Celery's own Sentinel support); :func:`imagesync.redisurl.celery_url` writes it
so that both read the same database and password from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis import BlockingConnectionPool, Redis
from redis.sentinel import MasterNotFoundError, Sentinel

from .redisurl import is_sentinel, parse_sentinel_url

if TYPE_CHECKING:
    from .config import Settings

#: connections of a client shared by a worker's threads (``threads=True``): a command takes
#: one for well under a millisecond, so a few serve thousands of threads, and Redis sees a
#: bounded number of clients (its maxclients is 10,000) however many nodes a worker serves
THREAD_POOL_SIZE = 64
#: seconds a thread waits for one of them before its command fails
THREAD_POOL_WAIT = 60.0

#: seconds a question to one sentinel may take, when the caller sets no socket timeout:
#: a sentinel that hangs must not hold up the discovery, the next one is asked
SENTINEL_TIMEOUT = 5.0


def connect(settings: Settings, threads: bool = False, **options: Any) -> Redis:
    """A client of imagesync's Redis (the master, with Sentinel); ``options`` are
    redis-py's connection options (timeouts, ``retry``, ``health_check_interval``).

    ``threads``: a client that many threads share, whose commands wait for one
    of its ``THREAD_POOL_SIZE`` connections rather than fail: redis-py's own
    pool refuses a command past 100 connections at once ("Too many connections").
    """
    return connect_url(settings.redis_url, settings.redis_master_name, threads, **options)


def connect_url(url: str, master_name: str | None = None, threads: bool = False, **options: Any) -> Redis:
    """:func:`connect` for a URL and a master name (required with ``sentinel://``)."""
    if not is_sentinel(url):
        if threads:
            pool = BlockingConnectionPool.from_url(url, max_connections=THREAD_POOL_SIZE, timeout=THREAD_POOL_WAIT,
                                                   **options)
            return Redis(connection_pool=pool)
        return Redis.from_url(url, **options)
    if threads:  # redis-py's Sentinel pool cannot wait for a connection: room for every thread instead
        options.setdefault("max_connections", 10_000)
    if not master_name:
        raise ValueError("a sentinel:// URL needs the master's name (redis_master_name)")
    parsed = parse_sentinel_url(url)
    # The login and database are the master's; the sentinels are asked without them.
    ask = {key: value for key, value in options.items() if key.startswith("socket_") and value is not None}
    ask.setdefault("socket_timeout", SENTINEL_TIMEOUT)
    ask.setdefault("socket_connect_timeout", SENTINEL_TIMEOUT)
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=ask)
    return sentinel.master_for(master_name, db=parsed.db, username=parsed.username,
                               password=parsed.password, **options)


def error_line(exc: Exception) -> str:
    """A Redis error on one line; redis-py's "no master" lists every sentinel's client, password-less but long."""
    if isinstance(exc, MasterNotFoundError):
        found = str(exc).split(" : ", 1)[0]
        return f"{found}: no sentinel answered, or none names a master that is up"
    return str(exc)
