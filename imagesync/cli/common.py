"""What every ``imagesync`` command shares: the exit codes, the consoles, one-line
messages, the version line, the settings and the Redis client.

The commands print through :data:`out` and :data:`err`, looked up here when
they print, so that a test can replace them.
"""

from __future__ import annotations

import sys

from rich.console import Console

from ..config import Settings, load_settings, mask_url
from ..errors import ImagesyncError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_RUNNING = 0, 1, 2, 3

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def say(message: str) -> None:
    """One plain line on stderr: never wrapped, whatever the terminal's width."""
    print(message, file=sys.stderr, flush=True)


#: the distributions whose versions a bug report needs, as ``--version`` names them
_VERSIONS = (("celery", "celery"), ("kombu", "kombu"), ("redis-py", "redis"), ("paramiko", "paramiko"))


def version_line() -> str:
    """imagesync's version and those of the libraries it stands on, in one line."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    parts = []
    for name, distribution in _VERSIONS:
        try:
            parts.append(f"{name} {version(distribution)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    python = ".".join(str(n) for n in sys.version_info[:3])
    return f"imagesync {__version__} ({', '.join(parts)}; Python {python})"


class CommandError(ImagesyncError):
    """Ends a command with one line and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def read_settings() -> Settings:
    """The configuration, as every command reads it (a :class:`ConfigError` ends the command)."""
    return load_settings()


def redis_client(settings: Settings, ping: bool = True, socket_timeout: float = 30):
    """A Redis client with timeouts; with ``ping``, one that answers, or one line and exit 1.

    The long-running servers (exporter, webhook) do not ping: they start while
    Redis is down and report it, rather than not start.
    """
    from redis.exceptions import RedisError

    from ..redisclient import connect, error_line

    client = connect(settings, socket_connect_timeout=5, socket_timeout=socket_timeout)
    if not ping:
        return client
    try:
        client.ping()
    except RedisError as exc:
        fix = "fix redis_url and redis_master_name" if settings.redis_master_name else "fix redis_url"
        raise CommandError(
            f"cannot reach Redis at {mask_url(settings.redis_url)} ({error_line(exc)}): start redis-server or {fix}"
        ) from exc
    return client
