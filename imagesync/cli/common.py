"""What every ``imagesync`` command shares: the exit codes, the consoles, one-line
messages, the version line, the settings and the Redis client.

The commands print through :data:`out` and :data:`err`, looked up here when
they print, so that a test can replace them. Tables and lines on stdout go
through :func:`show` and :func:`line`: off a terminal (a pipe, a file, a log)
nothing is cut or wrapped, since what a reader copies from there (a run id, a
trigger, a path) must be whole, and a row must stay on its line for grep.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ..errors import ImagesyncError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ..config import Settings

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_RUNNING = 0, 1, 2, 3

#: the consoles of stdout and stderr (rich), made on first use: a command that prints
#: no table or progress bar (``--version``) never imports rich
out: Console
err: Console


def __getattr__(name: str) -> Any:
    if name not in ("out", "err"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console

    console = Console(stderr=name == "err", highlight=False)
    globals()[name] = console
    return console


def say(message: str) -> None:
    """One plain line on stderr: never wrapped, whatever the terminal's width."""
    print(message, file=sys.stderr, flush=True)


def line(text: str) -> None:
    """One plain line on stdout, as it is: never wrapped nor cut, whatever the width."""
    _console("out").print(text, markup=False, highlight=False, soft_wrap=True)


def show(table: Table) -> None:
    """A table on stdout: on a terminal, fitted to its width; anywhere else, as wide
    as its widest cells and title, so that no cell is cut (``202612…``) or wrapped."""
    from rich.console import Console
    from rich.measure import Measurement

    out = _console("out")
    if out.is_terminal:
        out.print(table)
        return
    unbounded = out.options.update_width(1_000_000)
    width = Measurement.get(out, unbounded, table).maximum
    if table.title:
        width = max(width, out.render_str(str(table.title)).cell_len)
    wide = Console(file=out.file, width=width, color_system=out.color_system, no_color=out.no_color, highlight=False)
    wide.print(table)


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


def _console(name: str) -> Console:
    """``out`` or ``err`` as it is now (a test may have replaced it)."""
    return getattr(sys.modules[__name__], name)


class CommandError(ImagesyncError):
    """Ends a command with one line and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def read_settings(ssh: bool = True) -> Settings:
    """The configuration, as every command reads it (a :class:`ConfigError` ends the command).

    A command that reaches no node over SSH in this process passes ``ssh=False``:
    the OpenSSH client configuration is then not read, nor paramiko imported
    (``load_settings``).
    """
    from ..config import load_settings

    return load_settings(ssh=ssh)


def redis_client(settings: Settings, ping: bool = True, socket_timeout: float = 30):
    """A Redis client with timeouts; with ``ping``, one that answers, or one line and exit 1.

    The long-running servers (exporter, webhook) do not ping: they start while
    Redis is down and report it, rather than not start.
    """
    from redis.exceptions import RedisError

    from ..config import mask_url
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
