"""Each SSH node's settings in effect: imagesync's own, the OpenSSH client
configuration's (:mod:`imagesync.config.sshconfig`), then the defaults.

Which value wins, highest first: what imagesync's own configuration sets
explicitly (for the node, or in ``[ssh]``), then the SSH config, then
imagesync's defaults.  :func:`resolve` gives every SSH node's
:class:`SSHTarget`, each value with its source, for the transport, ``config
show`` and ``check``.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sshconfig import _NOTHING, SSHClientConfig, _Found, _Hop, _hops, _seconds, config_files

if TYPE_CHECKING:
    from .model import Node, Settings


@dataclass(frozen=True)
class SSHTarget:
    """How one node, or its jump host, is reached: each value in effect and where it came from.

    ``sources`` has an entry for host, port, user, key_file, known_hosts,
    connect_timeout and proxy_jump: "default", "file PATH", "env VARIABLE",
    "argument" or "ssh config, Host NAME".  ``key_files`` empty means SSH's
    usual keys and agent.  The first of ``known_hosts`` is where accept-new
    records keys.
    """

    name: str
    host: str
    port: int
    user: str
    key_files: tuple[Path, ...]
    known_hosts: tuple[Path, ...]
    connect_timeout: float
    sources: Mapping[str, str]
    jump: SSHTarget | None = None
    notes: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def route(self) -> str:
        """``user@host:port``, and the jump host it goes through."""
        return self.address + (f" via {self.jump.name} ({self.jump.address})" if self.jump else "")

    def provenance(self) -> str:
        """Where the values came from, grouped: ``host, port: ssh config, Host w1; user: default``."""
        grouped: dict[str, list[str]] = {}
        for key in ("host", "port", "user", "key_file", "known_hosts", "connect_timeout", "proxy_jump"):
            source = self.sources[key]
            grouped.setdefault("file" if source.startswith("file ") else source, []).append(key)
        return "; ".join(f"{', '.join(keys)}: {source}" for source, keys in grouped.items())


def resolve(settings: Settings) -> tuple[dict[str, SSHTarget], list[str]]:
    """Every SSH node's target, by node name, and the problems found (one line each)."""
    files = config_files(settings.ssh)
    config = SSHClientConfig(files) if files else None
    if config is not None and config.problems:
        return {}, list(dict.fromkeys(config.problems))
    targets: dict[str, SSHTarget] = {}
    problems: list[str] = []
    for node in settings.nodes:
        if node.transport == "ssh":
            targets[node.name] = _resolve_node(settings, node, config, problems)
    return targets, list(dict.fromkeys(problems))


def _explicit(settings: Settings, key: str) -> str | None:
    """The source of ``ssh.KEY`` if imagesync's configuration sets it, else None."""
    source = settings.sources.get(f"ssh.{key}", "default")
    return None if source == "default" else source


def _resolve_node(settings: Settings, node: Node, config: SSHClientConfig | None, problems: list[str]) -> SSHTarget:
    ssh = settings.ssh
    given = node.model_fields_set
    node_source = settings.sources.get("nodes", "default")
    found = config.lookup(node.host) if config is not None else _NOTHING
    sources: dict[str, str] = {}

    def pick(key: str, *choices: tuple[bool, Any, str]) -> Any:
        for wanted, value, source in choices:
            if wanted:
                sources[key] = source
                return value
        raise AssertionError("the last choice is the default")

    in_config = found.get
    host = pick("host", (in_config("hostname") is not None, in_config("hostname"), _source(found, "hostname")),
                (True, node.host, node_source if "host" in given else "default"))
    port = pick("port", ("port" in given, node.port, node_source),
                (in_config("port") is not None, int(in_config("port") or 0), _source(found, "port")),
                (True, node.port, "default"))
    user = pick("user", (node.user is not None, node.user, node_source),
                (_explicit(settings, "user") is not None, ssh.user, _explicit(settings, "user") or ""),
                (in_config("user") is not None, in_config("user"), _source(found, "user")),
                (True, ssh.user, "default"))
    notes: list[str] = []
    identities = _identity_files(found, node.name, notes)
    key_files = pick("key_file", (node.key_file is not None, (node.key_file,), node_source),
                     (ssh.key_file is not None and _explicit(settings, "key_file") is not None, (ssh.key_file,),
                      _explicit(settings, "key_file") or ""),
                     (bool(identities), identities, _source(found, "identityfile")),
                     (True, (), "default"))
    timeout = pick("connect_timeout",
                   (_explicit(settings, "connect_timeout") is not None, ssh.connect_timeout,
                    _explicit(settings, "connect_timeout") or ""),
                   (in_config("connecttimeout") is not None, _seconds(in_config("connecttimeout") or ""),
                    _source(found, "connecttimeout")),
                   (True, ssh.connect_timeout, "default"))
    known_hosts = _known_hosts(settings, found, host, port, user, sources)
    _refuse_forgetful_accept_new(settings, found, known_hosts, sources["known_hosts"], problems)
    notes += _host_key_notes(settings, found, node.name, node.host, known_hosts[0])
    _refuse_proxy_command(found, node.host, problems)
    jump = None
    value = in_config("proxyjump")
    sources["proxy_jump"] = _source(found, "proxyjump") if value else "default"
    if value and value.lower() != "none":
        hops = _hops(value)
        assert not isinstance(hops, str)  # checked when the file was read
        if len(hops) > 1:
            problems.append(f"ssh config {found.where('proxyjump')}: ProxyJump {value} for {node.host} has "
                            f"{len(hops)} hops: imagesync goes through one jump host; give it one "
                            "(a Host block for the jump host may set its own ProxyJump none)")
        else:
            jump = _resolve_jump(settings, config, hops[0], found, timeout, sources["connect_timeout"],
                                 node, problems, notes)
    return SSHTarget(node.host, host, port, user, key_files, known_hosts, timeout, sources, jump, tuple(notes))


def _source(found: _Found, key: str) -> str:
    return found.source(key) if key in found.origins else "default"


def _identity_files(found: _Found, node: str, notes: list[str]) -> tuple[Path, ...]:
    """The IdentityFiles the SSH config gives that exist (ssh warns about the others and goes on)."""
    existing = []
    for name in found.get("identityfile") or []:
        path = Path(os.path.expanduser(name))
        if path.is_file():
            existing.append(path)
        else:
            notes.append(f"{node}: IdentityFile {path} of the ssh config does not exist: it is skipped, "
                         "as ssh skips it")
    return tuple(existing)


def _known_hosts(settings: Settings, found: _Found, host: str, port: int, user: str,
                 sources: dict[str, str]) -> tuple[Path, ...]:
    explicit = _explicit(settings, "known_hosts")
    value = found.get("userknownhostsfile")
    if explicit is not None or value is None:
        sources["known_hosts"] = explicit or "default"
        return (settings.ssh.known_hosts,)
    sources["known_hosts"] = found.source("userknownhostsfile")
    try:
        names = shlex.split(value)
    except ValueError:
        names = value.split()
    # "none" is no file at all: nothing is known, and nothing can be recorded
    tokens = {"%%": "%", "%d": os.path.expanduser("~"), "%u": _local_user(), "%h": host, "%n": host,
              "%p": str(port), "%r": user}
    paths = []
    for name in names:
        if name.lower() == "none":
            paths.append(Path(os.devnull))
            continue
        expanded = re.sub(r"%[%dunhpr]", lambda m: tokens[m.group()], name)
        paths.append(Path(os.path.expanduser(expanded)))
    return tuple(paths) or (Path(os.devnull),)


def keeps_nothing(path: Path) -> bool:
    """Whether ``path`` forgets what is written to it: /dev/null (``none`` in the SSH config),
    or anything but a regular file. accept-new may not record host keys there."""
    return os.path.realpath(path) == os.devnull or (path.exists() and not path.is_file())


def forgetful_accept_new(setting: str) -> str:
    """The line that refuses accept-new recording host keys into a file that keeps nothing.

    Each connection would find no key there and accept whatever the host shows, a
    changed key too: an impostor or a reinstalled node would get root commands and
    registry passwords.  ``setting`` names the file and what chose it.
    """
    return (f'{setting} keeps nothing, so ssh.host_key_policy = "accept-new" would accept '
            "any host key on every connection, a changed one too: set ssh.known_hosts to a file that keeps them, "
            'such as ~/.ssh/known_hosts (it wins over UserKnownHostsFile), or use "reject" and add the keys')


def _refuse_forgetful_accept_new(settings: Settings, found: _Found, known_hosts: tuple[Path, ...], source: str,
                                 problems: list[str]) -> None:
    """A problem when accept-new would record host keys where they are forgotten (the first file)."""
    if settings.ssh.host_key_policy != "accept-new" or not keeps_nothing(known_hosts[0]):
        return
    if source.startswith("ssh config"):
        setting = f"ssh config {found.where('userknownhostsfile')}: UserKnownHostsFile {known_hosts[0]}"
    else:
        setting = f"ssh.known_hosts {known_hosts[0]} ({source})"
    problems.append(forgetful_accept_new(setting))


def _local_user() -> str:

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _host_key_notes(settings: Settings, found: _Found, node: str, name: str, known_hosts: Path) -> list[str]:
    """A note when the SSH config asks for host keys to be checked otherwise than imagesync does."""
    value = (found.get("stricthostkeychecking") or "").lower()
    policy = settings.ssh.host_key_policy
    where = f"ssh config {found.where('stricthostkeychecking')}" if value else ""
    if value in ("no", "off"):
        # accept-new needs a file that keeps what it records (_refuse_forgetful_accept_new)
        fix = ('add the key to known_hosts, or set host_key_policy = "accept-new"' if not keeps_nothing(known_hosts)
               else f'{known_hosts} keeps no keys: set ssh.known_hosts to a file that does, and add the key there')
        return [f"{node}: {where} says StrictHostKeyChecking {value} for {name}: imagesync does not follow it and "
                f'checks host keys with ssh.host_key_policy = "{policy}" (docs/configuration.md, Host keys: {fix})']
    if value == "accept-new" and policy != "accept-new":
        return [f"{node}: {where} says StrictHostKeyChecking accept-new for {name}: imagesync does not follow it: "
                'set ssh.host_key_policy = "accept-new" for the same']
    return []


def _refuse_proxy_command(found: _Found, name: str, problems: list[str]) -> None:
    if found.get("proxycommand"):
        problems.append(f"ssh config {found.where('proxycommand')}: ProxyCommand for {name} is not supported by "
                        "imagesync: use ProxyJump, or set ProxyCommand none for it in a block above this one")


def _resolve_jump(settings: Settings, config: SSHClientConfig | None, hop: _Hop, via: _Found, timeout: float,
                  timeout_source: str, node: Node, problems: list[str], notes: list[str]) -> SSHTarget:
    """The jump host of ``node``, reached as ``ssh JUMP`` would reach it."""
    found = config.lookup(hop.host) if config is not None else _NOTHING
    named = f"{via.source('proxyjump')} (ProxyJump)"
    ssh = settings.ssh
    sources: dict[str, str] = {}
    configured_port = found.get("port")
    configured_user = found.get("user")
    host = found.get("hostname") or hop.host
    sources["host"] = _source(found, "hostname") if found.get("hostname") else named
    if hop.port is not None:
        port, sources["port"] = hop.port, named
    elif configured_port is not None:
        port, sources["port"] = int(configured_port), found.source("port")
    else:
        port, sources["port"] = 22, "default"
    if hop.user is not None:
        user, sources["user"] = hop.user, named
    elif configured_user is not None:
        user, sources["user"] = configured_user, found.source("user")
    else:
        user, sources["user"] = ssh.user, settings.sources.get("ssh.user", "default")
    key_files = _identity_files(found, node.name, notes)
    if key_files:
        sources["key_file"] = found.source("identityfile")
    else:
        key_files = (ssh.key_file,) if ssh.key_file is not None else ()
        sources["key_file"] = settings.sources.get("ssh.key_file", "default")
    known_hosts = _known_hosts(settings, found, host, port, user, sources)
    _refuse_forgetful_accept_new(settings, found, known_hosts, sources["known_hosts"], problems)
    sources["connect_timeout"] = timeout_source
    sources["proxy_jump"] = "default"
    notes += _host_key_notes(settings, found, node.name, hop.host, known_hosts[0])
    _refuse_proxy_command(found, hop.host, problems)
    further = found.get("proxyjump")
    if further and further.lower() != "none":
        hops = _hops(further)
        if isinstance(hops, str) or [(h.host, h.port) for h in hops] != [(hop.host, hop.port)]:
            problems.append(f"ssh config {found.where('proxyjump')}: the jump host {hop.host} of {node.host} has a "
                            f"ProxyJump {further} of its own: imagesync goes through one jump host; set "
                            f"ProxyJump none for {hop.host} in a block above this one")
    return SSHTarget(hop.host, host, port, user, key_files, known_hosts, timeout, sources)
