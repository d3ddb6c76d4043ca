"""``redis_url`` read: one server, or Redis Sentinel (``sentinel://HOST:26379;sentinel://HOST:26379/DB``),
and the same URL written for Celery's broker and result backend. No connection is made here."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

SENTINEL_SCHEME = "sentinel://"
#: the port a sentinel listens on when its URL names none
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """A ``sentinel://`` URL read: the sentinels, and the master's database and login."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None

    def celery_url(self) -> str:
        """The URL for Celery, every sentinel written with the database and the login.

        kombu takes the database and the password from the first sentinel's
        URL, Celery's result backend from the first too; the URL as people
        write it puts the database at the end, after the last sentinel.
        """
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        elif self.username is not None:
            auth = f"{quote(self.username, safe='')}@"
        return ";".join(f"{SENTINEL_SCHEME}{auth}{_host(host)}:{port}/{self.db}" for host, port in self.sentinels)


def is_sentinel(url: str) -> bool:
    """Whether ``url`` names Redis Sentinel rather than one server."""
    return url.startswith(SENTINEL_SCHEME)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read ``sentinel://[[USER]:PASSWORD@]HOST[:PORT][/DB];sentinel://...``.

    The database and the login may be written on any of the sentinels (the
    database usually after the last); written on several, they must agree.
    Raises ``ValueError`` with what is wrong.
    """
    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    logins: set[tuple[str | None, str | None]] = set()
    for chunk in url.split(";"):
        if not chunk.startswith(SENTINEL_SCHEME):
            shown = repr(_without_login(chunk)) if chunk else "an empty part"
            raise ValueError(f"{shown} is not a sentinel:// URL: separate sentinels with ';'")
        parts = urlsplit(chunk)
        if parts.query or parts.fragment:
            raise ValueError("a sentinel:// URL takes no query options")
        if not parts.hostname:
            raise ValueError(f"{_without_login(chunk)!r} names no host")
        try:
            port = parts.port or SENTINEL_PORT
        except ValueError as exc:  # not a number, or out of range
            raise ValueError(f"{_without_login(chunk)!r}: {exc}") from None
        sentinels.append((parts.hostname, port))
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"{_without_login(chunk)!r}: the database must be a number, not {path!r}")
            dbs.add(int(path))
        if parts.username is not None or parts.password is not None:
            logins.add((unquote(parts.username) if parts.username else None,
                        unquote(parts.password) if parts.password is not None else None))
    if len(dbs) > 1:
        raise ValueError(f"the sentinels name different databases ({', '.join(map(str, sorted(dbs)))}): name one")
    if len(logins) > 1:
        raise ValueError("the sentinels carry different logins: write one login, or the same on each")
    username, password = next(iter(logins), (None, None))
    return SentinelURL(tuple(sentinels), db=next(iter(dbs), 0), username=username or None, password=password)


def celery_url(url: str) -> str:
    """``redis_url`` as Celery's broker and result backend should read it."""
    return parse_sentinel_url(url).celery_url() if is_sentinel(url) else url


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _without_login(chunk: str) -> str:
    """One sentinel's URL as it may be shown: without its user information."""
    scheme, _, rest = chunk.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
