"""Image references: validation against the OCI grammar, normalization, prefixes.

Image names come from one node's runtime and end up in a command on another
node, so nothing reaches a command line unless it parses here. The grammar is
the one of github.com/distribution/reference, restricted to ASCII::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [domain "/"] path-component ["/" path-component]*
    domain     := host [":" port]
    path-component := [a-z0-9]+ (([._]|__|-*) [a-z0-9]+)*
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := algorithm ":" hex (32 or more)

Normalization follows the runtimes (containerd, CRI-O): ``nginx`` is
``docker.io/library/nginx:latest``.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import RefusedReference

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAINS = {"index.docker.io", "registry-1.docker.io"}
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255
MAX_REFERENCE_LENGTH = 1024

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_REFERENCE = re.compile(
    rf"(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?", re.ASCII
)
_PREFIX = re.compile(rf"(?:{_DOMAIN}|{_NAME})(?:/{_PATH_COMPONENT})*", re.ASCII)


@dataclass(frozen=True, order=True)
class Reference:
    """A parsed, normalized image reference."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``domain/path``, e.g. ``docker.io/library/nginx``."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def familiar(self) -> str:
        """The short form people type: ``nginx:latest`` for docker.io/library/nginx:latest."""
        name = self.repository
        if self.domain == DEFAULT_DOMAIN:
            name = self.path.removeprefix(OFFICIAL_REPO_PREFIX)
        if self.tag:
            name += f":{self.tag}"
        if self.digest:
            name += f"@{self.digest}"
        return name


def _refuse(text: str, reason: str) -> RefusedReference:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return RefusedReference(shown, reason)


def parse(text: str) -> Reference:
    """Parse and normalize ``text``; raise RefusedReference if it is not a valid reference."""
    if not isinstance(text, str):
        raise _refuse(repr(text), "not a string")
    return _parse(text)


# The same names come back from every node and every pull's check, and a
# Reference is immutable: parsing each distinct name once made planning
# 100 nodes x 2,000 images several times faster (bench/README.md).
@functools.lru_cache(maxsize=1 << 16)
def _parse(text: str) -> Reference:
    if len(text) > MAX_REFERENCE_LENGTH:
        raise _refuse(text, f"longer than {MAX_REFERENCE_LENGTH} characters")
    if not text.isascii() or not text.isprintable():
        raise _refuse(text, "contains non-ASCII or control characters")
    match = _REFERENCE.fullmatch(text)
    if match is None:
        raise _refuse(text, "not a valid OCI image reference")
    name, tag, digest = match.group("name"), match.group("tag"), match.group("digest")
    if len(name) > MAX_NAME_LENGTH:
        raise _refuse(text, f"repository name longer than {MAX_NAME_LENGTH} characters")
    domain, _, path = name.partition("/")
    if not path or not _looks_like_domain(domain):
        domain, path = DEFAULT_DOMAIN, name
    if domain in LEGACY_DOMAINS:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    if not _is_lowercase_path(path):
        raise _refuse(text, "repository path must be lowercase")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest.lower() if digest else None)


def _looks_like_domain(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or (
        component.startswith("[")
    )


def _is_lowercase_path(path: str) -> bool:
    return path == path.lower()


def normalize(text: str) -> str:
    """The normalized string form of ``text`` (raises RefusedReference)."""
    return str(parse(text))


_DIGEST_ONLY = re.compile(_DIGEST, re.ASCII)


def parse_digest(text: object) -> str:
    """``text`` as a content digest (``algorithm:hex``, lowercased); RefusedReference unless it is one."""
    if not isinstance(text, str):
        raise _refuse(repr(text), "not a string")
    if len(text) > MAX_REFERENCE_LENGTH or _DIGEST_ONLY.fullmatch(text) is None:
        raise _refuse(text, "not a content digest (algorithm:hex, e.g. sha256:...)")
    return text.lower()


def normalized(texts: Iterable[str]) -> frozenset[str]:
    """The normalized form of each of ``texts`` that the grammar accepts; the others are left out
    (whoever plans with them reports them)."""
    found = set()
    for text in texts:
        try:
            found.add(normalize(text))
        except RefusedReference:
            continue
    return frozenset(found)


def is_valid(text: str) -> bool:
    try:
        parse(text)
    except RefusedReference:
        return False
    return True


def validate_prefix(prefix: str) -> str:
    """Check a configured prefix (a registry, or a registry plus path) and return it normalized.

    Normalized as references are, so that it can match what a runtime reports:
    the registry host in lower case, ``index.docker.io`` as ``docker.io``, and
    ``library/nginx`` as ``docker.io/library/nginx``. A prefix that could never
    match a reference is refused, with the reason and, where there is one, the
    prefix that was probably meant.
    """
    prefix = prefix.strip().rstrip("/")
    if "://" in prefix:
        bare = prefix.split("://", 1)[1].rstrip("/")
        raise _refuse(prefix, f"a prefix names a registry, not a URL: did you mean {bare}?")
    first, _, rest = prefix.partition("/")
    if _looks_like_domain(first) and not first.startswith("["):
        domain = first.lower()
        if domain in LEGACY_DOMAINS:
            domain = DEFAULT_DOMAIN
        prefix = f"{domain}/{rest}" if rest else domain
    last = prefix.rsplit("/", 1)[-1]
    tagged = ":" in last and ("/" in prefix or not last.rsplit(":", 1)[1].isdigit())
    if "@" in last or tagged:
        meant = prefix.split("@", 1)[0]
        meant = meant.rsplit(":", 1)[0] if ":" in meant.rsplit("/", 1)[-1] and tagged else meant
        raise _refuse(prefix, f"a prefix names a registry or repository, not a tag or digest: did you mean {meant}?")
    path = rest if _looks_like_domain(first) else prefix
    if path and not _is_lowercase_path(path):
        fixed = prefix[: len(prefix) - len(path)] + path.lower()
        raise _refuse(prefix, f"repository paths are lowercase, so this matches nothing: did you mean {fixed}?")
    if not prefix or not prefix.isascii() or _PREFIX.fullmatch(prefix) is None:
        raise _refuse(prefix, "not a registry host or repository path")
    if not _looks_like_domain(first) and prefix.startswith(OFFICIAL_REPO_PREFIX):
        prefix = f"{DEFAULT_DOMAIN}/{prefix}"
    return prefix


def matches_prefix(ref: Reference, prefix: str) -> bool:
    """Whether ``ref`` lies under ``prefix``, on a path-component boundary.

    ``nvcr.io/nvidia`` matches ``nvcr.io/nvidia/pytorch:24.01-py3`` but not
    ``nvcr.io/nvidiax/...``. The prefix is compared with the normalized
    repository and with the familiar one, so ``bcm11`` matches both
    ``bcm11/app`` and ``docker.io/bcm11/app``; a prefix naming a whole
    repository also matches it (``nvcr.io/nvidia/pytorch``).
    """
    # Registry hosts are case-insensitive; prefixes come normalized from
    # validate_prefix, but a runtime may report a host as it was typed.
    for name in (ref.repository.lower(), _familiar_repository(ref), _hub_short(ref)):
        if name and (name == prefix or name.startswith(prefix + "/")):
            return True
    return False


def _hub_short(ref: Reference) -> str:
    """``docker.io/nginx`` for ``docker.io/library/nginx``: how a prefix may name an official image."""
    if ref.domain == DEFAULT_DOMAIN and ref.path.startswith(OFFICIAL_REPO_PREFIX):
        return f"{DEFAULT_DOMAIN}/{ref.path.removeprefix(OFFICIAL_REPO_PREFIX)}"
    return ""


def _familiar_repository(ref: Reference) -> str:
    if ref.domain == DEFAULT_DOMAIN:
        return ref.path.removeprefix(OFFICIAL_REPO_PREFIX)
    return ref.repository


def matches_any(ref: Reference, prefixes: list[str] | tuple[str, ...]) -> bool:
    return any(matches_prefix(ref, prefix) for prefix in prefixes)


#: the characters that make a pattern a shell-style wildcard pattern
_WILDCARDS = frozenset("*?[")


def validate_pattern(pattern: str) -> str:
    """Check an image pattern (``exclude``, ``backup.images``) and return it normalized.

    A pattern with a wildcard (``*``, ``?``, ``[...]``) is matched, as written,
    against the whole normalized name (``registry/path:tag``); one without is a
    prefix, as ``prefixes`` are, or else one exact image reference.
    """
    text = pattern.strip()
    if _WILDCARDS & set(text):
        if not text.isascii() or not text.isprintable() or " " in text:
            raise _refuse(text, "a pattern is one word of printable ASCII")
        return text
    try:
        return validate_prefix(text)
    except RefusedReference as exc:
        try:
            return normalize(text)
        except RefusedReference:
            raise exc from None


def matches_pattern(ref: Reference, pattern: str) -> bool:
    """Whether ``ref`` matches a pattern of :func:`validate_pattern`."""
    if _WILDCARDS & set(pattern):
        return fnmatch.fnmatchcase(str(ref), pattern) or fnmatch.fnmatchcase(ref.familiar, pattern)
    return str(ref) == pattern or matches_prefix(ref, pattern)


def matches_any_pattern(ref: Reference, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(matches_pattern(ref, pattern) for pattern in patterns)


def backup_name(backup: str, image: str) -> str | None:
    """The name of ``image`` in the backup registry ``backup`` (``host[:port][/path]``):
    ``<backup>/<original registry>/<path>:<tag>``, the registry's ``:port`` written ``_port``.

    ``nvcr.io/nvidia/cuda:12`` in ``harbor.example.com/backup`` is
    ``harbor.example.com/backup/nvcr.io/nvidia/cuda:12``; ``127.0.0.1:5000/app:1``
    is ``.../127.0.0.1_5000/app:1`` (a ``:`` cannot stand in a path). None for an
    image without a tag (a registry takes a push by tag), or whose registry cannot
    be written as a path component (an IPv6 address).
    """
    ref = parse(image)
    if not ref.tag or ref.domain.startswith("["):
        return None
    registry = ref.domain.lower().replace(":", "_")
    return normalize(f"{backup.rstrip('/')}/{registry}/{ref.path}:{ref.tag}")
