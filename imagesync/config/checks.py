"""The checks of single values, and how a user's value is shown in a problem.

Every field of the settings model (:mod:`.model`) is checked by one of these
functions before pydantic's own type check.  They raise errors that already
carry the final line, less its location, so that :mod:`.problems` is left with
the shape of the document.  ``_show``, ``_suggest`` and :func:`mask_url` are
shared with the readers (:mod:`.sources`, :mod:`.shellconf`) for their own
problem lines.

Celery's crontab parser and redis-py are imported by the checks that use them,
when a value is checked: a command that needs neither (``imagesync history``
needs no Celery) does not load them for the rest of the settings.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args
from urllib.parse import parse_qs, urlsplit

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

from .. import references
from ..errors import RefusedReference
from ..redisurl import is_sentinel, parse_sentinel_url
from ..sizes import MinFree

#: a place in the settings document, as pydantic gives it: ("nodes", 1, "port")
Location = tuple[str | int, ...]

_PREFIX = re.compile(r"[A-Za-z0-9._:/-]+")
_PREFIX_RULE = "use letters, digits and . _ : / -"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")

# the five crontab fields in crontab order: name, crontab_parser bounds, what is allowed
_CRONTAB_FIELDS = (
    ("minute", (60,), "0-59"),
    ("hour", (24,), "0-23"),
    ("day-of-month", (31, 1), "1-31"),
    ("month", (12, 1), "1-12 or jan-dec"),
    ("day-of-week", (7,), "0-6 (Sunday is 0) or sun-sat"),
)


# --- checking single values ---------------------------------------------------
#
# Every field is checked by one of these functions, which raise errors that
# already carry the final text.  Translating pydantic's own errors
# (problems.explain) is then left with the shape of the document: missing
# keys, unknown keys, a value where a table or a list belongs.


def _invalid(problem: str, at: Location | None = None) -> PydanticCustomError:
    """An error whose text is the finished line, less its location.

    ``at`` replaces pydantic's location, for checks that involve several keys.
    The text goes in through the context, not the template, so that braces in
    a user's value cannot be taken for placeholders.
    """
    context: dict[str, Any] = {"problem": problem}
    if at is not None:
        context["at"] = at
    return PydanticCustomError("imagesync", "{problem}", context)


def _show(value: object) -> str:
    """A user's value, short and on one line, spelt as in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(str(value)) if isinstance(value, str | Path) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The choice closest to a misspelt ``word``, if one is close enough."""
    lowered = {choice.lower(): choice for choice in choices}
    matches = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[matches[0]] if matches else None


def _check(check: Callable[[Any], Any], *, optional: bool = False) -> BeforeValidator:
    """Run ``check`` on the value as written, before pydantic's type check.

    An optional field lets None through: code may pass it explicitly.
    """

    def run(value: Any) -> Any:
        return None if optional and value is None else check(value)

    return BeforeValidator(run)


def _is_digits(value: Any) -> bool:
    """Whether ``value`` is a string of ASCII digits, blanks around it allowed."""
    return isinstance(value, str) and value.strip().isascii() and value.strip().isdigit()


def _whole_number(what: str, low: int, high: int | None = None) -> Callable[[Any], int]:
    """A whole number from ``low`` to ``high``.

    Strings of digits count too: environment variables and shell files only
    have strings.
    """
    allowed = f"{low} to {high}" if high is not None else f"at least {low}"

    def check(value: Any) -> int:
        if _is_digits(value):
            # int() refuses thousands of digits, and 19 are out of any range here
            if len(value.strip()) > 18:
                raise _invalid(f"{_show(value)} is out of range: use {allowed}")
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(f"{_show(value)} is not {what}")
        if value < low or (high is not None and value > high):
            raise _invalid(f"{_show(value)} is out of range: use {allowed}")
        return value

    return check


def _positive_seconds(value: Any) -> float:
    """A number of seconds above zero, whole or not."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise _invalid(f"{_show(value)} is not a number of seconds") from None
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise _invalid(f"{_show(value)} is not a number of seconds")
    try:
        seconds = float(number)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise _invalid(f"{_show(value)} is out of range: use a number of seconds above 0")
    return seconds


def _text(what: str, pattern: re.Pattern[str] | None = None, rule: str = "") -> Callable[[Any], str]:
    """A non-empty string without spaces or control characters, matching ``pattern``."""

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _invalid(f"{_show(value)} is not {what}")
        if not value:
            raise _invalid(f"empty value: write {what}")
        if not value.isprintable() or any(c.isspace() for c in value):
            raise _invalid(f"{_show(value)} contains spaces or control characters: write {what}")
        if pattern is not None and not pattern.fullmatch(value):
            raise _invalid(f"{_show(value)} is not {what}: {rule}")
        return value

    return check


def _choice(options: Any) -> Callable[[Any], str]:
    """One of the values of the Literal type ``options``, with a suggestion for a near miss."""
    choices: tuple[str, ...] = get_args(options)

    def check(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return value
        problem = f"{_show(value)} is not one of {', '.join(choices)}"
        guess = _suggest(value, choices) if isinstance(value, str) else None
        raise _invalid(f"{problem}: did you mean {guess}?" if guess else problem)

    return check


def _path(value: Any) -> Path:
    """A local path, with ``~`` expanded."""
    if not isinstance(value, str | Path):
        raise _invalid(f"{_show(value)} is not a path")
    text = str(value)
    if not text.strip():
        raise _invalid("empty value: write a path")
    if "\0" in text:
        raise _invalid(f"{_show(value)} contains a NUL character: write a path")
    # os.path.expanduser leaves an unknown "~someone" alone where Path.expanduser raises
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        home = expanded.split("/")[0]
        raise _invalid(f"{_show(value)}: there is no home directory {home}: write the path out")
    return Path(expanded)


def _existing_file(value: Any) -> Path:
    """A path that names an existing file, such as an SSH private key."""
    path = _path(value)
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as exc:
        raise _invalid(f"{_show(value)} cannot be looked at ({exc.strerror}): fix the path") from None
    if not exists:
        raise _invalid(f"{_show(value)} does not exist: create the file or fix the path")
    if not is_file:
        raise _invalid(f"{_show(value)} is not a file: name the file itself")
    return path


def _ssh_config_file(value: Any) -> Path | None:
    """An OpenSSH client configuration file that exists; ``""`` or ``"none"`` (``ssh -F none``) reads none (None)."""
    if isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    return _existing_file(value)


def host_timezone() -> str:
    """This host's time zone as an IANA name (``Europe/Berlin``), UTC if it cannot be told."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        candidates.append(Path("/etc/timezone").read_text().strip())
    except OSError:
        pass
    try:
        link = os.readlink("/etc/localtime")
        candidates.append(link.split("zoneinfo/", 1)[1] if "zoneinfo/" in link else "")
    except OSError:
        pass
    for name in candidates:
        if name and _zone(name) is not None:
            return name
    return "UTC"


def _zone(name: str) -> Any:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _timezone(value: Any) -> str:
    """An IANA time zone name, as in /usr/share/zoneinfo: ``UTC``, ``Asia/Kolkata``."""
    if not isinstance(value, str) or not value.strip():
        raise _invalid(f"{_show(value)} is not a time zone: use a name such as UTC or Asia/Kolkata")
    name = value.strip()
    if _zone(name) is None:
        raise _invalid(f"{_show(value)} is not a time zone known to this host: use a name from "
                       "/usr/share/zoneinfo, such as UTC or Asia/Kolkata")
    return name


def _schedule(value: Any) -> int | str:
    """Seconds between runs (at least 10), or a five-field crontab expression.

    Each crontab field goes through Celery's own parser, so that what passes
    here is what celery beat accepts.
    """
    if (isinstance(value, int) and not isinstance(value, bool)) or _is_digits(value):
        return _whole_number("a number of seconds", 10)(value)
    fields = value.split() if isinstance(value, str) else []
    if len(fields) != 5:
        raise _invalid(
            f"{_show(value)} is not a crontab expression: write five fields, "
            "minute hour day-of-month month day-of-week, such as '*/30 * * * *', or a number of seconds"
        )
    from celery.schedules import crontab_parser

    for (name, bounds, allowed), text in zip(_CRONTAB_FIELDS, fields, strict=True):
        try:
            crontab_parser(*bounds).parse(text)
        except Exception:  # celery raises ValueError, its ParseException, and more
            raise _invalid(f"{_show(value)} has an invalid {name} field {_show(text)}: use {allowed}") from None
    return " ".join(fields)


def _redis_url(value: Any) -> str:
    """A redis://, rediss://, unix:// or sentinel:// URL redis-py can use, shown masked (it may hold a password)."""
    if isinstance(value, str) and value.startswith(_REDIS_SCHEMES) and value.isprintable() and " " not in value:
        problem = _redis_url_problem(value)
        if problem is None:
            return value
        raise _invalid(f"{_show(mask_url(value))}: {problem}")
    shown = _show(mask_url(value) if isinstance(value, str) else value)
    raise _invalid(
        f"{shown} is not a Redis URL: use redis://HOST:6379/0, rediss:// for TLS, unix:///path/to/redis.sock "
        "or sentinel://HOST:26379;sentinel://HOST:26379/0 for Redis Sentinel"
    )


def _redis_url_problem(url: str) -> str | None:
    """What keeps redis-py from using ``url``, found as every process would read it, without connecting.

    Without this check, a wrong port or query option passed the loader and
    ended every process that made a Redis client in a traceback.
    """
    if is_sentinel(url):
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            return f"{exc}: fix the URL"
        return None
    from redis import ConnectionPool, RedisError

    try:
        options = parse_qs(urlsplit(url).query)
        tls = sorted(name for name in options if name.startswith("ssl_"))
        if tls and not url.startswith("rediss://"):
            return f"{tls[0]} is a TLS option: use a rediss:// URL"
        ConnectionPool.from_url(url).make_connection()
    except TypeError as exc:  # an option no connection takes
        option = re.search(r"argument '(\w+)'", str(exc))
        return f"redis-py takes no option {option.group(1) if option else 'of that name'}: remove it from the query"
    except (ValueError, RedisError) as exc:
        return f"{str(exc).rstrip('.')}: fix the URL"
    return None


def _prefix(value: Any) -> str:
    """An image-name prefix, normalized as references are (``references.validate_prefix``);
    a trailing "/" is dropped, so "bcm11/" means "bcm11"."""
    if isinstance(value, str) and "://" in value:
        text = value
    else:
        text = _text("an image prefix", _PREFIX, _PREFIX_RULE)(value).rstrip("/")
    if not text:
        raise _invalid(f"{_show(value)} is not an image prefix: name a registry or a repository")
    try:
        return references.validate_prefix(text)
    except RefusedReference as exc:
        raise _invalid(f"{_show(value)} is not a usable image prefix: {exc.reason}") from None


def _secret(value: Any) -> str:
    """A password: any non-empty text on one line (spaces allowed); never shown back."""
    if not isinstance(value, str) or not value or "\n" in value or "\0" in value:
        raise _invalid("is not a password: write it as one line of text, or use password_file")
    return value


def _without_repeats(items: list[str]) -> list[str]:
    """The same list with each item once, in the order first written."""
    return list(dict.fromkeys(items))


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``****``; a URL without one is unchanged.

    The password is found where redis-py looks for it: after the first ":" of
    the user information, or in a ``password=`` query parameter; in each
    sentinel of a ``sentinel://`` URL.
    """
    if is_sentinel(url) and ";" in url:
        return ";".join(map(mask_url, url.split(";")))
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    end = min((index for index in map(rest.find, "/?#") if index >= 0), default=len(rest))
    authority, remainder = rest[:end], rest[end:]
    userinfo, at, hostport = authority.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if at and colon and password:
        authority = f"{user}:****@{hostport}"
    remainder = re.sub(r"([?&]password=)[^&#]+", r"\1****", remainder)
    return f"{scheme}://{authority}{remainder}"


def _min_free(value: Any) -> str:
    """A percentage ("20%") or a size ("50GiB", or a number of bytes), kept as written."""
    try:
        MinFree.parse(value)
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    return str(value).strip()
