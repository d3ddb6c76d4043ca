"""The settings model and its validators.

:class:`Settings` is the whole configuration; its tables are :class:`Node`,
:class:`SSHSettings` and :class:`RegistryLogin`.

Each field's type carries the check of :mod:`.checks` that gives its error
text; the validators here check what involves several keys (distinct node
names, something to sync, one password).  :class:`Settings` also answers
``config show``: :attr:`Settings.sources` and :meth:`Settings.describe` (whose
rows :mod:`.show` lays out).  Reading a file into it is :mod:`.sources`' job;
the image tables and ``images_file`` are :mod:`.images`'.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from imagesync.errors import ConfigError
from imagesync.redisurl import is_sentinel

from . import show
from .backup import BackupSettings, Patterns
from .checks import (
    _check,
    _choice,
    _existing_file,
    _invalid,
    _min_free,
    _path,
    _positive_seconds,
    _redis_url,
    _schedule,
    _secret,
    _ssh_config_file,
    _text,
    _timezone,
    _whole_number,
    _without_repeats,
    host_timezone,
)
from .images import ImageEntry, Images, image_selections, per_architecture, pinned_images, read_images_file
from .labels import Labels, Prefix
from .sshtargets import SSHTarget, resolve

Runtime = Literal["crictl", "ctr"]
Transport = Literal["ssh", "local"]
HostKeyPolicy = Literal["reject", "accept-new"]
#: how a run spreads an image: each node from the registry, or one registry copy then node to node
SourceMode = Literal["registry", "peers-first"]

# A node's name becomes its Celery queue name, hence the narrow alphabet.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NODE_NAME_RULE = "use up to 63 letters, digits, '.', '_' and '-', starting with a letter or digit"
# containerd's own rule for namespace names
_NAMESPACE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
_NAMESPACE_RULE = "use letters and digits joined by . _ -"
# a registry as image references name it: host[:port]
_REGISTRY = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                       r"|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?")
# os/arch[/variant] as OCI image indexes name platforms
_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")
_PLATFORM_RULE = "write os/arch or os/arch/variant, such as linux/amd64 or linux/arm64/v8"
_REGISTRY_RULE = "write the registry as image names spell it, such as nvcr.io or harbor.example.com:8443"


# The types of the values, each with the check that gives its error text.
_NodeName = Annotated[str, _check(_text("a node name", _NODE_NAME, _NODE_NAME_RULE))]
_Port = Annotated[int, _check(_whole_number("a port number", 1, 65535))]
_UserName = Annotated[str, _check(_text("a user name"))]
_OptionalUserName = Annotated[str | None, _check(_text("a user name"), optional=True)]
_KeyFile = Annotated[Path | None, _check(_existing_file, optional=True)]
_LocalPath = Annotated[Path, _check(_path)]
_Namespace = Annotated[str, _check(_text("a containerd namespace", _NAMESPACE, _NAMESPACE_RULE))]
_Prefixes = Annotated[list[Prefix], AfterValidator(_without_repeats)]


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
    # the OpenSSH client configuration read: unset, ~/.ssh/config then /etc/ssh/ssh_config;
    # a file, that file only (ssh -F); "" or "none" (None), none (see sshconfig.config_files)
    config_file: Annotated[Path | None, _check(_ssh_config_file, optional=True)] = Field(
        default_factory=lambda: Path(os.path.expanduser("~/.ssh/config")))


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
    # the node's platform, when uname -m on the node would not tell it right
    platform: Annotated[str | None, _check(_text("a platform", _PLATFORM, _PLATFORM_RULE), optional=True)] = None
    # the filesystem that holds the runtime's images (containerd's root), for the room check
    image_fs: Annotated[str, _check(_text("a directory on the node"))] = "/var/lib/containerd"
    # what the node is, for the prefixes and images that name the labels they need (config.labels)
    labels: Labels = Field(default_factory=list)
    # peer_ssh: how the other nodes' own ssh reaches this node (host, and the port and
    # user set here, unless given; what is left unset, their SSH client config decides)
    peer_host: Annotated[str | None, _check(_text("a host name"), optional=True)] = None
    peer_port: Annotated[int | None, _check(_whole_number("a port number", 1, 65535), optional=True)] = None
    peer_user: _OptionalUserName = None

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

    # the nodes reached over SSH (or served by a worker configured for them); with
    # agents = true, may be empty: the agents alive in Redis are the nodes then
    nodes: list[Node] = Field(default_factory=list)
    prefixes: _Prefixes = []
    images: Images = Field(default_factory=list)
    # seed 003's image.config (JSON): more declared images, with per-architecture references;
    # checked even when left out, so that _something_to_sync runs with the other checks
    images_file: Annotated[Path | None, _check(_existing_file, optional=True)] = Field(
        default=None, validate_default=True)
    time_out: Annotated[int, _check(_whole_number("a whole number of seconds", 1))] = 1800
    max_parallel: Annotated[int, _check(_whole_number("a whole number of pulls", 1, 256))] = 4
    log_dir: _LocalPath = Path("/var/log/imagesync")
    # day folders of log_dir older than this many days are removed; 0 keeps them all
    log_keep_days: Annotated[int, _check(_whole_number("a whole number of days", 0))] = 30
    schedule: Annotated[int | str, _check(_schedule)] = "*/30 * * * *"
    # the zone a crontab schedule is read in; the logs use the host's local time
    timezone: Annotated[str, _check(_timezone)] = Field(default_factory=host_timezone)
    # repr=False: the URL may carry a password, and reprs end up in logs
    redis_url: Annotated[str, _check(_redis_url)] = Field(default="redis://127.0.0.1:6379/0", repr=False)
    # with a sentinel:// redis_url, the name the sentinels monitor the master by
    redis_master_name: Annotated[str | None, _check(_text("a master name"), optional=True)] = None
    history: Annotated[int, _check(_whole_number("a whole number of runs", 1))] = 200
    retries: Annotated[int, _check(_whole_number("a whole number of retries", 0, 20))] = 3
    # where a node's missing image comes from first (see imagesync.planning.routes)
    source: Annotated[SourceMode, _check(_choice(SourceMode))] = "registry"
    # copy from a node that holds the image when the registry cannot serve it
    transfer: bool = True
    # the nodes copy from each other over their own SSH (ssh HOLDER ctr export | ctr import,
    # run on the target), rather than through the worker's two SSH channels
    peer_ssh: bool = False
    # ask each run which digest every held tag names in its registry now, and update moved tags
    refresh: bool = True
    # images never synced nor backed up, though under a prefix (scratch, CI builds)
    exclude: Patterns = []
    # after each run that beat started and that completed, remove retired images from the nodes (imagesync.prune)
    prune: bool = False
    # a registry that keeps a copy of every synced image: [backup]
    backup: BackupSettings | None = None
    # what a pull must leave free on a node's image filesystem: "20%" keeps the node
    # under the kubelet's default image GC threshold (85 %); or bytes, such as "50GiB"
    min_free: Annotated[str, _check(_min_free)] = "20%"
    # where `imagesync exporter` serves Prometheus metrics; loopback unless widened on purpose
    exporter_address: Annotated[str, _check(_text("a listening address"))] = "127.0.0.1"
    exporter_port: _Port = 9808
    # where `imagesync webhook` receives registry push notifications; loopback unless widened on purpose
    webhook_address: Annotated[str, _check(_text("a listening address"))] = "127.0.0.1"
    webhook_port: _Port = 9809
    # the shared secret a registry sends in its Authorization header; never shown
    webhook_secret: Annotated[str | None, _check(_secret, optional=True)] = Field(default=None, repr=False)
    webhook_secret_file: _KeyFile = None
    # logins for private registries, by registry host: [registries."nvcr.io"]
    registries: dict[_RegistryHost, RegistryLogin] = Field(default_factory=dict)
    # agent mode (imagesync.agents): the nodes also include every `imagesync agent` alive in Redis
    agents: bool = False
    # seconds between an agent's heartbeats, and without one after which it counts as gone
    agent_heartbeat: Annotated[float, _check(_positive_seconds)] = 10.0
    agent_lapse: Annotated[float, _check(_positive_seconds)] = 30.0
    # seconds a run waits for the agents' inventory answers; a node silent past it is skipped
    agent_inventory_timeout: Annotated[float, _check(_positive_seconds)] = 30.0
    # seconds after its last heartbeat that a gone agent is forgotten (no longer reported as skipped)
    agent_forget: Annotated[int, _check(_whole_number("a whole number of seconds", 1))] = 86400
    # the runtime of an agent's node, unless `imagesync agent` is told otherwise (flags)
    agent_runtime: Annotated[Runtime, _check(_choice(Runtime))] = "crictl"
    agent_endpoint: Annotated[str | None, _check(_text("a socket address"), optional=True)] = None
    agent_namespace: _Namespace = "k8s.io"
    agent_hosts_dir: Annotated[str | None, _check(_text("a directory on the node"), optional=True)] = None
    agent_image_fs: Annotated[str, _check(_text("a directory on the node"))] = "/var/lib/containerd"
    agent_labels: Labels = Field(default_factory=list)
    # where an agent serves its node's images to the other agents (imagesync.peerserve): none,
    # no server, and agent nodes get no copies; 0, a free port (registered for the peers)
    agent_peer_port: Annotated[int | None, _check(_whole_number("a port number, or 0 for a free one", 0, 65535),
                                                  optional=True)] = None
    agent_peer_address: Annotated[str, _check(_text("a listening address"))] = "0.0.0.0"
    # the address the other agents reach this one at: default $POD_IP, else agent_peer_address
    # unless it is 0.0.0.0 or ::, else the address the node's name resolves to
    agent_peer_advertise: Annotated[str | None, _check(_text("an address"), optional=True)] = None
    # a factory, for the same reason as known_hosts' default
    ssh: SSHSettings = Field(default_factory=SSHSettings)

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    _path: Path | None = PrivateAttr(default=None)
    # each SSH node's target (see ssh_target), resolved once
    _ssh_targets: dict[str, SSHTarget] | None = PrivateAttr(default=None)
    # the entries of images_file, read once
    _file_images: list[ImageEntry] = PrivateAttr(default_factory=list)

    @field_validator("nodes", mode="after")
    @classmethod
    def _distinct_nodes(cls, nodes: list[Node]) -> list[Node]:
        # Runs only when every node is valid, so a duplicate name next to an
        # invalid node is reported once that node is fixed.
        seen: set[str] = set()
        for index, node in enumerate(nodes):
            if node.name in seen:
                raise _invalid(
                    f"{node.name!r} is the name of another node too: give each node its own name",
                    at=("nodes", index, "name"),
                )
            seen.add(node.name)
        return nodes

    @field_validator("images_file", mode="after")
    @classmethod
    def _something_to_sync(cls, images_file: Path | None, info: ValidationInfo) -> Path | None:
        # no "prefixes" or "images" in info.data means they were invalid: that is reported
        if info.data.get("prefixes") == [] and info.data.get("images") == [] and images_file is None:
            raise _invalid(
                "no prefixes and no images are configured: list at least one prefix or image to keep in sync",
                at=("prefixes",),
            )
        return images_file

    @model_validator(mode="after")
    def _some_nodes(self) -> Settings:
        if not self.nodes and not self.agents:
            raise _invalid("no nodes are configured: list at least one worker node, "
                           "or set agents = true for nodes that run imagesync agent", at=("nodes",))
        if self.agent_lapse <= self.agent_heartbeat:
            raise _invalid(f"{self.agent_lapse:g} s is not longer than agent_heartbeat ({self.agent_heartbeat:g} s): "
                           "give an agent at least two heartbeats, such as 3 x agent_heartbeat", at=("agent_lapse",))
        return self

    @model_validator(mode="after")
    def _read_images_file(self) -> Settings:
        if self.images_file is not None:
            self._file_images = read_images_file(self.images_file, self)
        return self

    @model_validator(mode="after")
    def _one_webhook_secret(self) -> Settings:
        if self.webhook_secret is not None and self.webhook_secret_file is not None:
            raise _invalid("give either webhook_secret or webhook_secret_file, not both", at=("webhook_secret",))
        return self

    @model_validator(mode="after")
    def _master_name_with_sentinel(self) -> Settings:
        if is_sentinel(self.redis_url) and self.redis_master_name is None:
            raise _invalid(
                "not set: a sentinel:// redis_url needs the name the sentinels know the master by "
                "(NAME in their 'sentinel monitor NAME HOST PORT QUORUM' line)",
                at=("redis_master_name",),
            )
        # A name without sentinels is likely a redis_url that is not the one meant.
        if not is_sentinel(self.redis_url) and self.redis_master_name is not None:
            raise _invalid(
                f"{self.redis_master_name!r} is set but redis_url is not a sentinel:// URL: "
                "remove redis_master_name, or list the sentinels in redis_url",
                at=("redis_master_name",),
            )
        return self

    def webhook_token(self) -> str | None:
        """The webhook's shared secret, read from webhook_secret_file when that is how it is given."""
        if self.webhook_secret is not None:
            return self.webhook_secret
        if self.webhook_secret_file is not None:
            return self.webhook_secret_file.read_text().strip() or None
        return None

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

    def declared_images(self) -> list[str]:
        """Every declared image as written: the plain references, and each table's ``ref``
        (those of ``images`` first, then those of ``images_file``)."""
        return [item if isinstance(item, str) else item.ref for item in [*self.images, *self._file_images]]

    def pinned_images(self) -> frozenset[str]:
        """The declared images written with ``pin = true``, normalized (invalid ones left to the plan)."""
        return pinned_images([*self.images, *self._file_images])

    def per_architecture(self) -> dict[str, dict[str, str]]:
        """The per-architecture entries: ``ref`` (normalized) -> architecture -> the reference to pull.

        A ``ref`` that is not a valid reference is left out here; the plan refuses it.
        """
        return per_architecture([*self.images, *self._file_images])

    def image_selections(self) -> dict[str, tuple[str, ...]]:
        """The declared images written with ``nodes = [...]``, normalized -> the labels a node needs."""
        return image_selections([*self.images, *self._file_images])

    def node_key_file(self, node: Node) -> Path | None:
        """The SSH key for ``node``: its own, else ``ssh.key_file``; None leaves it to SSH."""
        return node.key_file or self.ssh.key_file

    def resolve_ssh(self) -> list[str]:
        """Read the OpenSSH client configuration for every SSH node; the problems found, one line each."""
        targets, problems = resolve(self)
        if not problems:
            self._ssh_targets = targets
        return problems

    def ssh_target(self, node: Node) -> SSHTarget:
        """How ``node`` is reached over SSH: each value in effect, with its source.

        imagesync's own settings given explicitly win, then the OpenSSH client
        configuration, then the defaults (see :mod:`.sshconfig`).  Raises
        ConfigError if that configuration is broken, ValueError for a local node.
        """
        if self._ssh_targets is None:
            problems = self.resolve_ssh()
            if problems:
                raise ConfigError(problems, source=str(self._path) if self._path else None)
        assert self._ssh_targets is not None
        if node.name not in self._ssh_targets:
            raise ValueError(f"node {node.name} is not reached over SSH (transport = {node.transport!r})")
        return self._ssh_targets[node.name]

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
        """(key, value, source) for every key and every node's fields, for ``config show`` (:mod:`.show`)."""
        return show.describe(self, _TOP_KEYS)


#: the top-level keys besides the ssh table, in the order they are documented
_TOP_KEYS = [key for key in Settings.model_fields if key != "ssh"]
