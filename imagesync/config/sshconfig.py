"""The operator's OpenSSH client configuration, read as ``ssh`` reads it.

imagesync reaches a node as ``ssh HOST`` reaches it, HOST being the node's
``host`` (its name, unless set): it reads the user's ``~/.ssh/config``, then
``/etc/ssh/ssh_config`` (or only the file ``ssh.config_file`` names, or none
when that is ``""``), through paramiko's :class:`~paramiko.config.SSHConfig`,
and applies HostName, Port, User, IdentityFile, UserKnownHostsFile,
ConnectTimeout and ProxyJump (one hop).

Which value wins, highest first: what imagesync's own configuration sets
explicitly (for the node, or in ``[ssh]``), then the SSH config, then
imagesync's defaults.  ``host`` is the name looked up, as the argument of
``ssh`` is: the HostName the SSH config gives it is where imagesync connects.
A jump host is reached as ``ssh JUMP`` would reach it: ProxyJump's own
``user@`` and ``:port``, then its SSH config entry, then imagesync's
``[ssh]`` user and key as fallbacks; known_hosts, host_key_policy and
connect_timeout are the same as for the node.

paramiko is imported when the files are first read (:class:`SSHClientConfig`),
not with this module: a command that reaches no node over SSH (``imagesync
sync``, ``history``) never loads it.

paramiko does not follow ``Include``; this module does, by inlining the
included files before paramiko parses the text (inside a Host or Match block,
their own blocks apply only where the enclosing one does, as in OpenSSH).  It
also checks each line first, so that a broken one is a problem naming its
file and line.  ``StrictHostKeyChecking`` is never followed: host keys are
checked as ``ssh.host_key_policy`` says, and a node whose SSH config says
otherwise gets a note (:attr:`SSHTarget.notes`).

:class:`SSHClientConfig` answers for one host name; how its answers combine
with imagesync's own settings, node by node, is in
:mod:`imagesync.config.sshtargets`.
"""

from __future__ import annotations

import glob
import io
import os
import re
import shlex
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import _show, _suggest

if TYPE_CHECKING:
    from .model import SSHSettings

#: the user's own SSH client configuration, read first
USER_CONFIG = "~/.ssh/config"
#: the system-wide one, read after it (not when ssh.config_file names a file: ``ssh -F`` does the same)
SYSTEM_CONFIG = Path("/etc/ssh/ssh_config")
#: OpenSSH's own limit on nested Include
_MAX_DEPTH = 16

# The keywords of ssh_config(5) (OpenSSH 10), with a few old and vendor ones
# that OpenSSH still accepts: an unknown keyword close to one of these is a
# misspelling; one close to none may be newer than this list and is ignored.
_KEYWORDS = (
    "AddKeysToAgent AddressFamily BatchMode BindAddress BindInterface CanonicalDomains "
    "CanonicalizeFallbackLocal CanonicalizeHostname CanonicalizeMaxDots CanonicalizePermittedCNAMEs "
    "CASignatureAlgorithms CertificateFile ChallengeResponseAuthentication ChannelTimeout CheckHostIP Cipher "
    "Ciphers ClearAllForwardings Compression CompressionLevel ConnectionAttempts ConnectTimeout ControlMaster "
    "ControlPath ControlPersist DynamicForward EnableEscapeCommandline EnableSSHKeysign EscapeChar "
    "ExitOnForwardFailure FingerprintHash ForkAfterAuthentication ForwardAgent ForwardX11 ForwardX11Timeout "
    "ForwardX11Trusted GatewayPorts GlobalKnownHostsFile GSSAPIAuthentication GSSAPIClientIdentity "
    "GSSAPIDelegateCredentials GSSAPIKeyExchange GSSAPIKexAlgorithms GSSAPIRenewalForcesRekey "
    "GSSAPIServerIdentity GSSAPITrustDns HashKnownHosts Host HostbasedAcceptedAlgorithms HostbasedAuthentication "
    "HostbasedKeyTypes HostKeyAlgorithms HostKeyAlias HostName IdentitiesOnly IdentityAgent IdentityFile "
    "IgnoreUnknown Include IPQoS KbdInteractiveAuthentication KbdInteractiveDevices KexAlgorithms "
    "KnownHostsCommand LocalCommand LocalForward LogLevel LogVerbose MACs Match NoHostAuthenticationForLocalhost "
    "NumberOfPasswordPrompts ObscureKeystrokeTiming PasswordAuthentication PermitLocalCommand PermitRemoteOpen "
    "PKCS11Provider Port PreferredAuthentications Protocol ProxyCommand ProxyJump ProxyUseFdpass "
    "PubkeyAcceptedAlgorithms PubkeyAcceptedKeyTypes PubkeyAuthentication RefuseConnection RekeyLimit "
    "RemoteCommand RemoteForward RequestTTY RequiredRSASize RevokedHostKeys RSAAuthentication "
    "SecurityKeyProvider SendEnv ServerAliveCountMax ServerAliveInterval SessionType SetEnv StdinNull "
    "StreamLocalBindMask StreamLocalBindUnlink StrictHostKeyChecking SyslogFacility Tag TCPKeepAlive Tunnel "
    "TunnelDevice UpdateHostKeys UseKeychain UsePrivilegedPort User UserKnownHostsFile UseRoaming "
    "VerifyHostKeyDNS VisualHostKey WarnWeakCrypto XAuthLocation"
).split()
_KNOWN = {keyword.lower() for keyword in _KEYWORDS}
# the Match criteria paramiko evaluates; it would take any other for a match
_MATCH_ALONE = ("all", "canonical", "final")
_MATCH_WITH_ARGUMENT = ("host", "originalhost", "user", "localuser", "exec")
_TIME = re.compile(r"(?:[0-9]+[sSmMhHdDwW]?)+")
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# --- reading the files ---------------------------------------------------------------


@dataclass
class _Block:
    """One Host or Match block as written: what ``config show`` names as a value's source."""

    label: str  # "Host k8s-worker1", "Match host 10.*", "top of /etc/ssh/ssh_config"
    where: str  # "FILE line N" of its header
    lines: dict[str, str] = field(default_factory=dict)  # keyword (lower case) -> "FILE line N"


@dataclass(frozen=True)
class _Scope:
    """The block lines belong to: the criteria it stands for, and the line that opens it for paramiko."""

    criteria: tuple[str, ...]  # as Match criteria; () for every host
    header: str
    label: str
    where: str


@cache
def _traced_config_class() -> type:
    """paramiko's SSHConfig, also noting which block gave each option of a lookup.

    Made on first use, so that paramiko is imported only when an SSH
    configuration is read.
    """
    import paramiko
    from paramiko.config import SSHConfigDict

    class _TracedSSHConfig(paramiko.SSHConfig):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.origins: dict[str, int] = {}

        def _lookup(self, hostname, options=None, canonical=False, final=False):  # type: ignore[no-untyped-def]
            # paramiko's own _lookup, plus the line that records the block
            if options is None:
                options = SSHConfigDict()
            for index, context in enumerate(self._config):
                if not (
                    self._pattern_matches(context.get("host", []), hostname)
                    or self._does_match(context.get("matches", []), hostname, canonical, final, options)
                ):
                    continue
                for key, value in context["config"].items():
                    if key not in options:
                        options[key] = value[:] if value is not None else value
                        self.origins[key] = index
                    elif key == "identityfile":
                        options[key].extend(x for x in value if x not in options[key])
            if final:
                options = self._expand_variables(options, hostname)
            return options

    return _TracedSSHConfig


@dataclass(frozen=True)
class _Found:
    """The options the SSH config gives one host name, and the block each came from."""

    options: Mapping[str, Any]
    origins: Mapping[str, _Block]

    def get(self, key: str) -> Any:
        """The value of ``key`` (lower case) if a block sets it; None otherwise."""
        return self.options.get(key) if key in self.origins else None

    def source(self, key: str) -> str:
        return f"ssh config, {self.origins[key].label}"

    def where(self, key: str) -> str:
        block = self.origins[key]
        return block.lines.get(key, block.where)


_NOTHING = _Found({}, {})


class SSHClientConfig:
    """OpenSSH client configuration files, read and checked once; :meth:`lookup` a host as ssh would.

    ``files`` are (path, is_user_config) in the order read; a missing one is
    skipped, as ssh skips it.  :attr:`problems` holds one line per broken line.
    """

    def __init__(self, files: Sequence[tuple[Path, bool]]) -> None:
        import paramiko

        self.files = [path for path, _ in files]
        self.problems: list[str] = []
        self._blocks: list[_Block] = []
        self._text: list[str] = []
        for path, user in files:
            self._read(path, user, 0, None)
        self._config = _traced_config_class()()
        self._lock = threading.Lock()
        try:
            self._config.parse(io.StringIO("".join(line + "\n" for line in self._text)))
        except paramiko.ConfigParseError as exc:  # every line was checked above: this is a safety net
            self.problems.append(f"ssh config: {exc}: fix it there")

    def _problem(self, where: str, text: str) -> None:
        self.problems.append(f"ssh config {where}: {text}")

    def _open(self, scope: _Scope) -> None:
        """Start a block for paramiko (the first of its contexts is its own empty one)."""
        self._text.append(scope.header)
        self._blocks.append(_Block(scope.label, scope.where))

    def _read(self, path: Path, user: bool, depth: int, outer: _Scope | None) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._problem(str(path), f"cannot read it ({exc.strerror or exc}): fix its mode, or set ssh.config_file")
            return
        text = data.decode("utf-8", "replace")
        settings_line = _settings_regex()
        if outer is None or not outer.criteria:
            # ssh starts every file afresh: lines before its first Host apply to every host
            scope = _Scope((), "Host *", f"top of {path}", f"{path} line 1")
        else:
            scope = outer
        self._open(scope)
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path} line {number}"
            match = settings_line.match(line)
            if not match:
                self._problem(where, f"{_show(line)} is not a 'Keyword value' line: give the keyword its value")
                continue
            keyword, value = match.group(1), match.group(2)
            key = keyword.lower()
            if key == "include":
                self._include(value, user, depth, scope, where)
                self._open(scope)  # the lines after it belong to the block it sits in again
            elif key in ("host", "match"):
                opened = self._scope(key, value, outer, where)
                if opened is not None:
                    scope = opened
                    self._open(scope)
            elif key not in _KNOWN:
                guess = _suggest(keyword, _KEYWORDS)
                if guess:
                    self._problem(where, f"unknown keyword {keyword}: did you mean {guess}?")
            else:
                problem = _check_value(key, value)
                if problem:
                    self._problem(where, problem)
                    continue
                self._blocks[-1].lines.setdefault(key, where)
                self._text.append(line)

    def _scope(self, key: str, value: str, outer: _Scope | None, where: str) -> _Scope | None:
        """The block a Host or Match line opens; None, and a problem, if the line is broken."""
        try:
            words = shlex.split(value)
        except ValueError:
            self._problem(where, f"{_show(value)} has an unmatched quote: close it")
            return None
        if key == "host":
            if not words:
                self._problem(where, "Host without a pattern: name the hosts it is for")
                return None
            criteria: tuple[str, ...] = ("originalhost", ",".join(words))
            label, own_header = "Host " + " ".join(words), f"Host {value}"
        else:
            checked = _check_match(words)
            if isinstance(checked, str):
                self._problem(where, checked)
                return None
            criteria = checked
            label, own_header = "Match " + " ".join(words), f"Match {value}"
        if outer is None or not outer.criteria:
            return _Scope(criteria, own_header, label, where)
        # inside a block of an including file: both must match, as Match criteria do
        combined = outer.criteria + criteria
        return _Scope(combined, "Match " + shlex.join(combined) if combined else "Host *", label, where)

    def _include(self, value: str, user: bool, depth: int, scope: _Scope, where: str) -> None:
        if depth >= _MAX_DEPTH:
            self._problem(where, f"Include nested more than {_MAX_DEPTH} deep: is a file including itself?")
            return
        try:
            names = shlex.split(value)
        except ValueError:
            self._problem(where, f"{_show(value)} has an unmatched quote: close it")
            return
        for name in names:
            # as ssh: ~ in user configurations; a relative path is under ~/.ssh or /etc/ssh
            pattern = os.path.expanduser(name) if user else name
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.expanduser("~/.ssh") if user else "/etc/ssh", pattern)
            for found in sorted(glob.glob(pattern)):
                if not os.path.isdir(found):
                    self._read(Path(found), user, depth + 1, scope)

    def lookup(self, name: str) -> _Found:
        """The options for ``name``, as ``ssh name`` would apply them, and the block of each."""
        with self._lock:
            self._config.origins = {}
            options = self._config.lookup(name)
            origins = dict(self._config.origins)
        # paramiko's first context is its own, empty one: block i is context i + 1
        return _Found(options, {key: self._blocks[index - 1] for key, index in origins.items() if index > 0})


def _settings_regex() -> re.Pattern[str]:
    """paramiko's own pattern of a ``Keyword value`` line, so that what passes here parses there."""
    import paramiko

    return paramiko.SSHConfig.SETTINGS_REGEX  # type: ignore[no-any-return]


def _check_match(words: list[str]) -> tuple[str, ...] | str:
    """The Match criteria without a bare ``all``; a problem if paramiko cannot evaluate them."""
    criteria: list[str] = []
    kinds = []
    rest = list(words)
    if not rest:
        return "Match without criteria: write Match host PATTERN (or all)"
    while rest:
        word = rest.pop(0)
        kind = word.removeprefix("!").lower()
        kinds.append(kind)
        if kind in _MATCH_ALONE:
            if word.lower() != "all":
                criteria.append(word)
        elif kind in _MATCH_WITH_ARGUMENT:
            if not rest:
                return f"Match {word} needs a value: write Match {word} PATTERN"
            criteria += [word, rest.pop(0)]
        else:
            return (f"Match {word} is not supported by paramiko, which reads the SSH config for imagesync: "
                    "use Match host, originalhost, user, localuser, exec, canonical, final or all")
    if "all" in kinds and any(kind not in ("all", "canonical") for kind in kinds):
        return "Match all may only be combined with canonical: remove the other criteria or the all"
    return tuple(criteria)


def _check_value(key: str, value: str) -> str | None:
    """What is wrong with the value of a keyword imagesync applies, if anything."""
    if key == "port" and not (value.isascii() and value.isdigit() and 1 <= int(value) <= 65535):
        return f"Port {_show(value)} is not a port number: use 1 to 65535"
    if key == "connecttimeout" and _seconds(value) is None:
        return f"ConnectTimeout {_show(value)} is not a number of seconds above 0 (such as 10, or 1m)"
    if key == "proxyjump" and value.lower() != "none":
        hops = _hops(value)
        if isinstance(hops, str):
            return f"ProxyJump {_show(value)}: {hops}"
    return None


def _seconds(value: str) -> float | None:
    """ssh_config's time format (``10``, ``30s``, ``1m30s``) in seconds; None if it is not one above 0."""
    if not _TIME.fullmatch(value):
        return None
    total = sum(int(number) * _TIME_UNITS[unit.lower()] for number, unit in re.findall(r"([0-9]+)([a-zA-Z]?)", value))
    return float(total) if total > 0 else None


@dataclass(frozen=True)
class _Hop:
    """One jump host as ProxyJump names it: ``[user@]host[:port]`` or an ``ssh://`` URI."""

    user: str | None
    host: str
    port: int | None


def _hops(value: str) -> list[_Hop] | str:
    """The hops of a ProxyJump value; a problem if one cannot be read."""
    hops = []
    for part in value.split(","):
        text = part.strip()
        if text.startswith("ssh://"):
            text = text.removeprefix("ssh://").rstrip("/")
        user, _, rest = text.rpartition("@")
        port = ""
        if rest.startswith("["):
            host, _, tail = rest[1:].partition("]")
            if tail and not tail.startswith(":"):
                return f"{_show(part.strip())} is not [user@]host[:port]"
            port = tail[1:]
        elif rest.count(":") == 1:
            host, _, port = rest.partition(":")
        else:
            host = rest
        if not host or any(c.isspace() for c in text) or (port and not (port.isdigit() and 1 <= int(port) <= 65535)):
            return f"{_show(part.strip())} is not [user@]host[:port]"
        hops.append(_Hop(user or None, host, int(port) if port else None))
    return hops


def config_files(ssh: SSHSettings) -> list[tuple[Path, bool]]:
    """The files to read, in order, each with whether it is a user configuration."""
    if "config_file" in ssh.model_fields_set:
        return [] if ssh.config_file is None else [(ssh.config_file, True)]
    return [(Path(os.path.expanduser(USER_CONFIG)), True), (SYSTEM_CONFIG, False)]


def describe_config_files(ssh: SSHSettings) -> str:
    """The files read, for ``config show``."""
    files = config_files(ssh)
    if not files:
        return "(none: not read)"
    return ", then ".join(f"{path}" if path.exists() else f"{path} (absent)" for path, _ in files)
