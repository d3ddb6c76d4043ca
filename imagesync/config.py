"""The one configuration loader: read the file, apply the environment, validate.

imagesync reads one file: the path it is given, else ``$IMAGESYNC_CONFIG``,
else ``/etc/imagesync/imagesync.toml``.  Two formats are understood:

* TOML, the native format (``imagesync.sample.toml`` documents every key);
* the seed tool's shell file ``image-sync.conf`` (``NODE1=...``, ``PREFIX1=...``,
  ``LOG_DIR``, ``TIME_OUT``, ``MAX_PARALLEL``), read as it is, so that an
  existing install keeps working while it moves to TOML.

``IMAGESYNC_*`` environment variables then override single keys.  Precedence,
highest first: environment, file, default; ``Settings.sources`` records which
one supplied each key.

Every problem found is collected and :func:`load_settings` raises one
:class:`~imagesync.errors.ConfigError` listing them, one line each, naming the
key as the user wrote it (``nodes[1].port``, ``TIME_OUT``,
``IMAGESYNC_RETRIES``) and saying what to do.  No other exception escapes it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import parse_qs, urlsplit

from celery.schedules import crontab_parser
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from redis import ConnectionPool, RedisError

from imagesync.errors import ConfigError

__all__ = [
    "CONFIG_VARIABLE",
    "DEFAULT_CONFIG_PATH",
    "ENVIRONMENT",
    "HostKeyPolicy",
    "Node",
    "Runtime",
    "SSHSettings",
    "Settings",
    "Transport",
    "load_settings",
    "mask_url",
]

DEFAULT_CONFIG_PATH = Path("/etc/imagesync/imagesync.toml")

#: the environment variable that names the configuration file
CONFIG_VARIABLE = "IMAGESYNC_CONFIG"

#: environment variables that override one key each, and the key they set
ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "IMAGESYNC_PREFIXES": ("prefixes",),
    "IMAGESYNC_IMAGES": ("images",),
    "IMAGESYNC_TIME_OUT": ("time_out",),
    "IMAGESYNC_MAX_PARALLEL": ("max_parallel",),
    "IMAGESYNC_LOG_DIR": ("log_dir",),
    "IMAGESYNC_SCHEDULE": ("schedule",),
    "IMAGESYNC_REDIS_URL": ("redis_url",),
    "IMAGESYNC_HISTORY": ("history",),
    "IMAGESYNC_RETRIES": ("retries",),
    "IMAGESYNC_SSH_USER": ("ssh", "user"),
    "IMAGESYNC_SSH_KEY_FILE": ("ssh", "key_file"),
    "IMAGESYNC_SSH_KNOWN_HOSTS": ("ssh", "known_hosts"),
    "IMAGESYNC_SSH_HOST_KEY_POLICY": ("ssh", "host_key_policy"),
    "IMAGESYNC_SSH_CONNECT_TIMEOUT": ("ssh", "connect_timeout"),
}

#: keys whose environment variable holds a comma-separated list
_LIST_KEYS = {("prefixes",), ("images",)}

#: the seed's image-sync.conf keys besides NODEn and PREFIXn, and the keys they became
LEGACY_KEYS = {"LOG_DIR": "log_dir", "TIME_OUT": "time_out", "MAX_PARALLEL": "max_parallel"}

Runtime = Literal["crictl", "ctr"]
Transport = Literal["ssh", "local"]
HostKeyPolicy = Literal["reject", "accept-new"]

#: a place in the settings document, as pydantic gives it: ("nodes", 1, "port")
Location = tuple[str | int, ...]

# A node's name becomes its Celery queue name, hence the narrow alphabet.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NODE_NAME_RULE = "use up to 63 letters, digits, '.', '_' and '-', starting with a letter or digit"
# containerd's own rule for namespace names
_NAMESPACE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
_NAMESPACE_RULE = "use letters and digits joined by . _ -"
_PREFIX = re.compile(r"[A-Za-z0-9._:/-]+")
_PREFIX_RULE = "use letters, digits and . _ : / -"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# a registry as image references name it: host[:port]
_REGISTRY = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                       r"|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?")
_REGISTRY_RULE = "write the registry as image names spell it, such as nvcr.io or harbor.example.com:8443"

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
# already carry the final text.  Translating pydantic's own errors (_explain)
# is then left with the shape of the document: missing keys, unknown keys, a
# value where a table or a list belongs.


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
    for (name, bounds, allowed), text in zip(_CRONTAB_FIELDS, fields, strict=True):
        try:
            crontab_parser(*bounds).parse(text)
        except Exception:  # celery raises ValueError, its ParseException, and more
            raise _invalid(f"{_show(value)} has an invalid {name} field {_show(text)}: use {allowed}") from None
    return " ".join(fields)


def _redis_url(value: Any) -> str:
    """A redis://, rediss:// or unix:// URL that redis-py can use, shown masked as it may hold a password."""
    if isinstance(value, str) and value.startswith(_REDIS_SCHEMES) and value.isprintable() and " " not in value:
        problem = _redis_url_problem(value)
        if problem is None:
            return value
        raise _invalid(f"{_show(mask_url(value))}: {problem}")
    shown = _show(mask_url(value) if isinstance(value, str) else value)
    raise _invalid(
        f"{shown} is not a Redis URL: use redis://HOST:6379/0, rediss:// for TLS or unix:///path/to/redis.sock"
    )


def _redis_url_problem(url: str) -> str | None:
    """What keeps redis-py from using ``url``, found as every process would read it, without connecting.

    Without this check, a wrong port or query option passed the loader and
    ended every process that made a Redis client in a traceback.
    """
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
    """An image-name prefix; a trailing "/" is dropped, so "bcm11/" means "bcm11"."""
    text = _text("an image prefix", _PREFIX, _PREFIX_RULE)(value).rstrip("/")
    if not text:
        raise _invalid(f"{_show(value)} is not an image prefix: name a registry or a repository")
    return text


def _secret(value: Any) -> str:
    """A password: any non-empty text on one line (spaces allowed); never shown back."""
    if not isinstance(value, str) or not value or "\n" in value or "\0" in value:
        raise _invalid("is not a password: write it as one line of text, or use password_file")
    return value


def _without_repeats(items: list[str]) -> list[str]:
    """The same list with each item once, in the order first written."""
    return list(dict.fromkeys(items))


# --- the settings -------------------------------------------------------------

# The types of the values, each with the check that gives its error text.
_NodeName = Annotated[str, _check(_text("a node name", _NODE_NAME, _NODE_NAME_RULE))]
_Port = Annotated[int, _check(_whole_number("a port number", 1, 65535))]
_UserName = Annotated[str, _check(_text("a user name"))]
_OptionalUserName = Annotated[str | None, _check(_text("a user name"), optional=True)]
_KeyFile = Annotated[Path | None, _check(_existing_file, optional=True)]
_LocalPath = Annotated[Path, _check(_path)]
_Namespace = Annotated[str, _check(_text("a containerd namespace", _NAMESPACE, _NAMESPACE_RULE))]
_Prefixes = Annotated[list[Annotated[str, _check(_prefix)]], AfterValidator(_without_repeats)]
_Images = list[Annotated[str, _check(_text("an image reference"))]]


class RegistryLogin(BaseModel):
    """Credentials for one registry, given to the runtime with every pull from it.

    The password is never shown (``config show`` masks it, reprs omit it);
    ``password_file`` keeps it out of the configuration file altogether.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: _UserName
    password: Annotated[str | None, _check(_secret, optional=True)] = Field(default=None, repr=False)
    password_file: _KeyFile = None

    @model_validator(mode="after")
    def _one_password(self) -> RegistryLogin:
        if (self.password is None) == (self.password_file is None):
            raise _invalid("give either password or password_file (one of them)")
        return self

    def secret(self) -> str:
        """The password, read from password_file when that is how it is given."""
        if self.password is not None:
            return self.password
        assert self.password_file is not None
        return self.password_file.read_text().strip()


_RegistryHost = Annotated[str, _check(_text("a registry", _REGISTRY, _REGISTRY_RULE))]


class SSHSettings(BaseModel):
    """How the manager reaches nodes over SSH; a node may set its own user and key_file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: _UserName = "root"
    key_file: _KeyFile = None
    # a factory, so that ~ is the home of whoever loads the settings, not of the import
    known_hosts: _LocalPath = Field(default_factory=lambda: Path(os.path.expanduser("~/.ssh/known_hosts")))
    # "reject" by default: a node whose key we do not know may not be the node we think
    host_key_policy: Annotated[HostKeyPolicy, _check(_choice(HostKeyPolicy))] = "reject"
    connect_timeout: Annotated[float, _check(_positive_seconds)] = 10.0


class Node(BaseModel):
    """One worker node whose images are kept in sync.

    Its name is also the name of its Celery queue; ``host`` defaults to it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _NodeName
    # None stands for "not written" and becomes the name in _host_or_name
    host: str = Field(default=None, validate_default=True)
    port: _Port = 22
    user: _OptionalUserName = None
    key_file: _KeyFile = None
    runtime: Annotated[Runtime, _check(_choice(Runtime))] = "crictl"
    endpoint: Annotated[str | None, _check(_text("a socket address"), optional=True)] = None
    namespace: _Namespace = "k8s.io"
    hosts_dir: Annotated[str | None, _check(_text("a directory on the node"), optional=True)] = None
    transport: Annotated[Transport, _check(_choice(Transport))] = "ssh"

    @field_validator("host", mode="before")
    @classmethod
    def _host_or_name(cls, value: Any, info: ValidationInfo) -> str:
        if value is None:
            # no "name" in info.data means it was invalid: that is reported,
            # and this placeholder never leaves the failed validation
            return str(info.data.get("name", ""))
        return _text("a host name")(value)


class Settings(BaseModel):
    """The whole configuration: which nodes, which images, and how to run.

    :func:`load_settings` builds it and records where each value came from
    (:attr:`sources`) and which file was read (:attr:`path`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: list[Node]
    prefixes: _Prefixes = []
    # checked even when left out, so that _something_to_sync runs with the other checks
    images: _Images = Field(default_factory=list, validate_default=True)
    time_out: Annotated[int, _check(_whole_number("a whole number of seconds", 1))] = 1800
    max_parallel: Annotated[int, _check(_whole_number("a whole number of pulls", 1, 256))] = 4
    log_dir: _LocalPath = Path("/var/log/imagesync")
    schedule: Annotated[int | str, _check(_schedule)] = "*/30 * * * *"
    # repr=False: the URL may carry a password, and reprs end up in logs
    redis_url: Annotated[str, _check(_redis_url)] = Field(default="redis://127.0.0.1:6379/0", repr=False)
    history: Annotated[int, _check(_whole_number("a whole number of runs", 1))] = 200
    retries: Annotated[int, _check(_whole_number("a whole number of retries", 0, 20))] = 3
    # logins for private registries, by registry host: [registries."nvcr.io"]
    registries: dict[_RegistryHost, RegistryLogin] = Field(default_factory=dict)
    # a factory, for the same reason as known_hosts' default
    ssh: SSHSettings = Field(default_factory=SSHSettings)

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    _path: Path | None = PrivateAttr(default=None)

    @field_validator("nodes", mode="after")
    @classmethod
    def _distinct_nodes(cls, nodes: list[Node]) -> list[Node]:
        # Runs only when every node is valid, so a duplicate name next to an
        # invalid node is reported once that node is fixed.
        if not nodes:
            raise _invalid("no nodes are configured: list at least one worker node")
        seen: set[str] = set()
        for index, node in enumerate(nodes):
            if node.name in seen:
                raise _invalid(
                    f"{node.name!r} is the name of another node too: give each node its own name",
                    at=("nodes", index, "name"),
                )
            seen.add(node.name)
        return nodes

    @field_validator("images", mode="after")
    @classmethod
    def _something_to_sync(cls, images: list[str], info: ValidationInfo) -> list[str]:
        # no "prefixes" in info.data means they were invalid: that is reported
        if info.data.get("prefixes") == [] and not images:
            raise _invalid(
                "no prefixes and no images are configured: list at least one prefix or image to keep in sync",
                at=("prefixes",),
            )
        return images

    def node(self, name: str) -> Node:
        """The node called ``name``; ConfigError if there is none."""
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(node.name for node in self.nodes)
        raise ConfigError(
            [f"no node named {name!r} in the configuration; known nodes: {known}"],
            source=str(self._path) if self._path else None,
        )

    def node_user(self, node: Node) -> str:
        """The SSH user for ``node``: its own, else ``ssh.user``."""
        return node.user or self.ssh.user

    def login_for(self, registry: str) -> tuple[str, str] | None:
        """(username, password) for pulls from ``registry`` (a host[:port]), if configured."""
        login = self.registries.get(registry)
        if login is None and registry in ("docker.io", "index.docker.io", "registry-1.docker.io"):
            login = next((self.registries[name] for name in ("docker.io", "index.docker.io",
                                                              "registry-1.docker.io") if name in self.registries), None)
        return None if login is None else (login.username, login.secret())

    def node_key_file(self, node: Node) -> Path | None:
        """The SSH key for ``node``: its own, else ``ssh.key_file``; None leaves it to SSH."""
        return node.key_file or self.ssh.key_file

    @property
    def path(self) -> Path | None:
        """The file these settings were loaded from; None if they were built in code."""
        return self._path

    @property
    def sources(self) -> dict[str, str]:
        """Where each key's value came from, by dotted key ("time_out", "ssh.user", "nodes").

        Each is "default", "file PATH" or "env VARIABLE"; settings built in
        code say "argument" for the keys they were given.
        """
        if self._sources:
            return dict(self._sources)
        given = self.model_fields_set
        sources = {key: "argument" if key in given else "default" for key in _TOP_KEYS}
        for key in SSHSettings.model_fields:
            given_here = "ssh" in given and key in self.ssh.model_fields_set
            sources[f"ssh.{key}"] = "argument" if given_here else "default"
        return sources

    def describe(self) -> list[tuple[str, str, str]]:
        """(key, value, source) for every key and every node's fields, for ``config show``.

        A node's user and key_file show the value in effect, which may come
        from the ssh table; the Redis password is masked.
        """
        sources = self.sources
        rows = []
        for key in _TOP_KEYS:
            value = getattr(self, key)
            if key == "nodes":
                value = [node.name for node in self.nodes]
            elif key == "registries":
                value = list(self.registries)
            elif key == "redis_url":
                value = mask_url(value)
            rows.append((key, _display(value), sources[key]))
        for key in SSHSettings.model_fields:
            rows.append((f"ssh.{key}", _display(getattr(self.ssh, key)), sources[f"ssh.{key}"]))
        for host, login in self.registries.items():
            rows.append((f"registries.{host}.username", login.username, sources["registries"]))
            if login.password_file is not None:
                rows.append((f"registries.{host}.password_file", str(login.password_file), sources["registries"]))
            else:
                rows.append((f"registries.{host}.password", "****", sources["registries"]))
        for node in self.nodes:
            for key in Node.model_fields:
                value = getattr(node, key)
                source = sources["nodes"] if key in node.model_fields_set else "default"
                if key in ("user", "key_file") and value is None:
                    value, source = getattr(self.ssh, key), sources[f"ssh.{key}"]
                rows.append((f"nodes.{node.name}.{key}", _display(value), source))
        return rows


#: the top-level keys besides the ssh table, in the order they are documented
_TOP_KEYS = [key for key in Settings.model_fields if key != "ssh"]


def _display(value: object) -> str:
    """A value as ``config show`` prints it."""
    if value is None:
        return "(not set)"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "(none)"
    return str(value)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``****``; a URL without one is unchanged.

    The password is found where redis-py looks for it: after the first ":" of
    the user information, or in a ``password=`` query parameter.
    """
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


# --- reading the file and the environment -------------------------------------


@dataclass
class _Document:
    """The settings as read, before validation, and where each came from."""

    #: TOML-shaped values, whatever the format read
    values: dict[str, Any]
    #: dotted key -> "file PATH" or "env VARIABLE", for the keys that were given
    sources: dict[str, str] = field(default_factory=dict)
    #: location -> the name the user wrote there, where that is not the TOML key
    #: (a legacy key such as NODE2, or an environment variable)
    labels: dict[Location, str] = field(default_factory=dict)

    def override(self, key: tuple[str, ...], value: Any, variable: str) -> None:
        """Set ``key`` from environment ``variable``, over what the file said."""
        table = self.values
        for part in key[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                return  # such as "ssh = 5" in the file: validation reports it
        table[key[-1]] = value
        self.sources[".".join(key)] = f"env {variable}"
        self.labels = {at: name for at, name in self.labels.items() if at[: len(key)] != key}
        self.labels[key] = variable

    def all_sources(self) -> dict[str, str]:
        """Sources for every key, "default" for the keys nobody gave."""
        keys = _TOP_KEYS + [f"ssh.{key}" for key in SSHSettings.model_fields]
        return {key: self.sources.get(key, "default") for key in keys}


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the configuration, apply the environment over it and validate it.

    ``path`` defaults to ``$IMAGESYNC_CONFIG``, then :data:`DEFAULT_CONFIG_PATH`;
    ``environ`` to ``os.environ``.  Raises :class:`ConfigError` listing every
    problem found, and nothing else.
    """
    environ = os.environ if environ is None else environ
    chosen = _config_path(path, environ)
    text = _read_text(chosen)
    problems: list[str] = []
    if _is_legacy(chosen, text):
        document: _Document | None = _read_legacy(text, f"file {chosen}", problems)
    else:
        document = _read_toml(text, f"file {chosen}", problems)
    environment_problems = _apply_environment(document, environ)

    settings = None
    if document is not None:
        try:
            settings = Settings.model_validate(document.values)
        except ValidationError as exc:
            problems += [_explain(error, document.labels) for error in exc.errors(include_url=False)]
    problems += environment_problems
    if problems or settings is None or document is None:
        # values are shown with repr-style escapes; this is for anything else
        raise ConfigError([" ".join(problem.splitlines()) for problem in problems], source=str(chosen))
    settings._sources = document.all_sources()
    settings._path = chosen
    return settings


def _config_path(path: str | Path | None, environ: Mapping[str, str]) -> Path:
    if path is None or str(path) == "":
        path = environ.get(CONFIG_VARIABLE) or DEFAULT_CONFIG_PATH
    return Path(os.path.expanduser(str(path)))


def _read_text(path: Path) -> str:
    """The file's text; a ConfigError of one line if it cannot be had."""

    def fail(problem: str) -> ConfigError:
        return ConfigError([problem], source=str(path))

    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise fail(
            f"no configuration file at {path}: create it (see imagesync.sample.toml) or point {CONFIG_VARIABLE} at one"
        ) from exc
    except IsADirectoryError as exc:
        raise fail(f"cannot read {path}: it is a directory: name the configuration file itself") from exc
    except PermissionError as exc:
        raise fail(f"cannot read {path}: permission denied: run as a user who may read it, or change its mode") from exc
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL character in the path
        raise fail(f"cannot read {_show(path)}: {exc}") from exc
    try:
        # utf-8-sig: some editors begin a file with a byte-order mark
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(f"cannot read {path}: byte {exc.start} is not UTF-8: save the file as UTF-8") from exc


# upper-case keys tell the seed's format from TOML, whose keys here are lower case
_LEGACY_LINE = re.compile(r"(?:export\s+)?[A-Z][A-Z0-9_]*=")


def _is_legacy(path: Path, text: str) -> bool:
    """Whether the file is the seed's shell format: a .conf file, or only KEY=value lines."""
    if path.suffix == ".conf":
        return True
    lines = [line.strip() for line in text.splitlines()]
    meaningful = [line for line in lines if line and not line.startswith("#")]
    return bool(meaningful) and all(_LEGACY_LINE.match(line) for line in meaningful)


def _read_toml(text: str, source: str, problems: list[str]) -> _Document | None:
    """The TOML document; None, and a problem, if it does not parse."""
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its text ends "(at line L, column C)"
        problems.append(f"not valid TOML: {exc}: fix the syntax there")
        return None
    except (ValueError, RecursionError):  # a number thousands of digits long; arrays nested thousands deep
        problems.append("not valid TOML: a value is too large or nested too deeply")
        return None
    document = _Document(values)
    document.sources = {key: source for key in values if key in _TOP_KEYS}
    if isinstance(values.get("ssh"), dict):
        for key in values["ssh"]:
            if key in SSHSettings.model_fields:
                document.sources[f"ssh.{key}"] = source
    return document


def _read_legacy(text: str, source: str, problems: list[str]) -> _Document:
    """The seed's image-sync.conf, read as bash would, as TOML-shaped values.

    NODEn become nodes named after their host, PREFIXn the prefixes, in the
    order of n; an empty value leaves the entry out, as in the seed tool.
    """
    assigned: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        lexer = shlex.shlex(line, posix=True)
        lexer.whitespace_split = True
        # shlex would start a comment at any "#", bash only at the start of a word
        lexer.commenters = ""
        try:
            words = list(lexer)
        except ValueError as exc:
            problems.append(f"line {number}: {str(exc).lower()}: check the quotes")
            continue
        comment = next((index for index, word in enumerate(words) if word.startswith("#")), len(words))
        words = words[:comment]
        if words[:1] == ["export"]:
            words = words[1:]
        if not words:
            continue
        key, equals, value = words[0].partition("=")
        if len(words) > 1 or not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            problems.append(
                f"line {number}: {_show(line.strip())} is not a KEY=value line: "
                "write KEY=\"value\", with no spaces around '='"
            )
        elif not (re.fullmatch(r"(NODE|PREFIX)[0-9]+", key) or key in LEGACY_KEYS):
            problems.append(_unknown_legacy_key(key))
        elif "$" in value or "`" in value:
            problems.append(f"{key}: imagesync does not expand shell variables or commands: write the value out")
        else:
            assigned[key] = value  # as in bash, a later assignment wins

    document = _Document({})

    def numbered(stem: str, name: str) -> list[tuple[str, str]]:
        """The non-empty NODEn or PREFIXn assignments, in the order of n."""
        keys = sorted(
            (key for key in assigned if re.fullmatch(stem + r"[0-9]+", key)), key=lambda k: int(k[len(stem) :])
        )
        if keys:
            document.sources[name] = source
        return [(key, assigned[key]) for key in keys if assigned[key]]

    nodes = []
    for index, (key, value) in enumerate(numbered("NODE", "nodes")):
        # the seed ran "ssh $NODE", so NODE1=admin@host meant user admin
        user, _, host = value.rpartition("@")
        nodes.append({"name": host, "host": host} | ({"user": user} if user else {}))
        document.labels[("nodes", index)] = key
    document.values["nodes"] = nodes
    document.labels[("nodes",)] = "NODE1"

    prefixes = numbered("PREFIX", "prefixes")
    if prefixes:
        document.values["prefixes"] = [value for _, value in prefixes]
    document.labels.update({("prefixes", index): key for index, (key, _) in enumerate(prefixes)})
    document.labels[("prefixes",)] = "PREFIX1"

    for key, name in LEGACY_KEYS.items():
        if assigned.get(key):
            document.values[name] = assigned[key]
            document.sources[name] = source
            document.labels[(name,)] = key
    return document


def _unknown_legacy_key(key: str) -> str:
    number = re.search(r"[0-9]+$", key)
    n = number.group() if number else "1"
    guess = _suggest(key, [f"NODE{n}", f"PREFIX{n}", *LEGACY_KEYS])
    if guess:
        return f"unknown key {key}: did you mean {guess}?"
    return (
        f"unknown key {key}: image-sync.conf takes NODE1.., PREFIX1.., LOG_DIR, TIME_OUT and MAX_PARALLEL; "
        "other settings need a TOML file (see imagesync.sample.toml)"
    )


def _apply_environment(document: _Document | None, environ: Mapping[str, str]) -> list[str]:
    """Apply the IMAGESYNC_* overrides to ``document``; problems for unknown variables.

    Unknown names are errors because a misspelt override would otherwise be
    ignored without a word.  An empty variable counts as unset, as an empty
    value does in image-sync.conf.
    """
    problems = []
    for variable in sorted(environ):
        if not variable.startswith("IMAGESYNC_") or variable == CONFIG_VARIABLE:
            continue
        key = ENVIRONMENT.get(variable)
        if key is None:
            # compared without the common IMAGESYNC_, which would make everything look close
            known = [name.removeprefix("IMAGESYNC_") for name in [*ENVIRONMENT, CONFIG_VARIABLE]]
            guess = _suggest(variable.removeprefix("IMAGESYNC_"), known)
            advice = (
                f"did you mean IMAGESYNC_{guess}?" if guess else "unset it (docs/configuration.md lists the variables)"
            )
            problems.append(f"unknown environment variable {variable}: {advice}")
        elif environ[variable] and document is not None:
            value: Any = environ[variable]
            if key in _LIST_KEYS:
                value = [item.strip() for item in value.split(",") if item.strip()]
            document.override(key, value, variable)
    return problems


# --- pydantic's errors as lines an operator can act on --------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _explain(error: ErrorDetails, labels: Mapping[Location, str]) -> str:
    """One line for one pydantic error: where, what is wrong, what to do."""
    context = error.get("ctx") or {}
    location: Location = tuple(context.get("at", error["loc"]))
    where = _where(location, labels)
    kind, value = error["type"], error.get("input")
    if kind == "imagesync":
        return f"{where}: {context['problem']}"
    if kind == "missing" and location == ("nodes",):
        return f"{where}: no nodes are configured: list at least one worker node in a [[nodes]] table"
    if kind == "missing" and location[-1] == "name":
        return f"{where} is missing: give every node a name (it becomes the node's Celery queue)"
    if kind == "missing":
        return f"{where} is missing"
    if kind == "extra_forbidden":
        return _unknown_key(location, where)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        table = "an [ssh]" if location == ("ssh",) else "a [[nodes]]"
        return f"{where}: {_show(value)} is not a table of keys: write it as {table} table"
    if kind == "list_type" and location == ("nodes",):
        return f"{where}: {_show(value)} is not a list of nodes: write each node as a [[nodes]] table"
    if kind == "list_type":
        example = f": write [{_show(value)}]" if isinstance(value, str) else ""
        return f"{where}: {_show(value)} is not a list{example}"
    return f"{where}: {_show(value)} is not a valid value: see docs/configuration.md"


def _where(location: Location, labels: Mapping[Location, str]) -> str:
    """The location as the user wrote it: nodes[1].port, NODE2 or IMAGESYNC_RETRIES."""
    for size in range(len(location), 0, -1):
        if location[:size] in labels:
            return labels[location[:size]]
    text = ""
    # pydantic marks an invalid key of a table (a registry host) with "[key]"
    for part in location[:-1] if location[-1:] == ("[key]",) else location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            text += f".{key}" if text else key
    return text


def _unknown_key(location: Location, where: str) -> str:
    """'unknown key' with the closest known key of the same table, or the list of them."""
    table = location[:1]
    models: dict[Location, type[BaseModel]] = {("ssh",): SSHSettings, ("nodes",): Node, ("registries",): RegistryLogin}
    model = models.get(table, Settings)
    known = list(model.model_fields)
    guess = _suggest(str(location[-1]), known)
    if guess:
        return f"unknown key {where}: did you mean {guess}?"
    return f"unknown key {where}: remove it (the keys here are {', '.join(known)})"
