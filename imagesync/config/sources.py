"""Where the settings come from: the file, the ``IMAGESYNC_*`` environment, the defaults.

imagesync reads one file: the path it is given, else ``$IMAGESYNC_CONFIG``,
else ``/etc/imagesync/imagesync.toml``, in TOML or in the seed tool's
``image-sync.conf`` format (read by :mod:`.shellconf`).  ``IMAGESYNC_*``
environment variables then override single keys.  Precedence, highest first:
environment, file, default; ``Settings.sources`` records which one supplied
each key, for ``config show``.

:func:`load_settings` does all of it and validates the result; every problem
found becomes one line (see :mod:`.problems`) of the one
:class:`~imagesync.errors.ConfigError` it raises.  No other exception escapes it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from imagesync.errors import ConfigError

from .backup import BackupSettings
from .checks import Location, _show, _suggest
from .model import _TOP_KEYS, Settings, SSHSettings
from .problems import explain
from .shellconf import _is_legacy, _read_legacy

DEFAULT_CONFIG_PATH = Path("/etc/imagesync/imagesync.toml")

#: the environment variable that names the configuration file
CONFIG_VARIABLE = "IMAGESYNC_CONFIG"
#: what the container images' entrypoint reads (workers/entrypoint.sh): the role
#: and node of a container, not settings. They stay in the environment of every
#: `docker compose exec` into it, where the CLI must not refuse them.
CONTAINER_VARIABLES = ("IMAGESYNC_ROLE", "IMAGESYNC_NODE")
#: what `imagesync agent` hands its worker: the node it serves, as JSON (imagesync.agents); not a setting
AGENT_VARIABLE = "IMAGESYNC_AGENT_NODE"

#: environment variables that override one key each, and the key they set
ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "IMAGESYNC_PREFIXES": ("prefixes",),
    "IMAGESYNC_IMAGES": ("images",),
    "IMAGESYNC_IMAGES_FILE": ("images_file",),
    "IMAGESYNC_TIME_OUT": ("time_out",),
    "IMAGESYNC_MAX_PARALLEL": ("max_parallel",),
    "IMAGESYNC_LOG_DIR": ("log_dir",),
    "IMAGESYNC_LOG_KEEP_DAYS": ("log_keep_days",),
    "IMAGESYNC_SCHEDULE": ("schedule",),
    "IMAGESYNC_TIMEZONE": ("timezone",),
    "IMAGESYNC_REDIS_URL": ("redis_url",),
    "IMAGESYNC_REDIS_MASTER_NAME": ("redis_master_name",),
    "IMAGESYNC_HISTORY": ("history",),
    "IMAGESYNC_RETRIES": ("retries",),
    "IMAGESYNC_SOURCE": ("source",),
    "IMAGESYNC_TRANSFER": ("transfer",),
    "IMAGESYNC_PEER_SSH": ("peer_ssh",),
    "IMAGESYNC_REFRESH": ("refresh",),
    "IMAGESYNC_MIN_FREE": ("min_free",),
    "IMAGESYNC_EXCLUDE": ("exclude",),
    "IMAGESYNC_PRUNE": ("prune",),
    "IMAGESYNC_BACKUP_REGISTRY": ("backup", "registry"),
    "IMAGESYNC_BACKUP_USERNAME": ("backup", "username"),
    "IMAGESYNC_BACKUP_PASSWORD": ("backup", "password"),
    "IMAGESYNC_BACKUP_PASSWORD_FILE": ("backup", "password_file"),
    "IMAGESYNC_BACKUP_IMAGES": ("backup", "images"),
    "IMAGESYNC_BACKUP_INSECURE": ("backup", "insecure"),
    "IMAGESYNC_BACKUP_INSECURE_SOURCES": ("backup", "insecure_sources"),
    "IMAGESYNC_EXPORTER_ADDRESS": ("exporter_address",),
    "IMAGESYNC_EXPORTER_PORT": ("exporter_port",),
    "IMAGESYNC_WEBHOOK_ADDRESS": ("webhook_address",),
    "IMAGESYNC_WEBHOOK_PORT": ("webhook_port",),
    "IMAGESYNC_WEBHOOK_SECRET": ("webhook_secret",),
    "IMAGESYNC_WEBHOOK_SECRET_FILE": ("webhook_secret_file",),
    "IMAGESYNC_AGENTS": ("agents",),
    "IMAGESYNC_AGENT_HEARTBEAT": ("agent_heartbeat",),
    "IMAGESYNC_AGENT_LAPSE": ("agent_lapse",),
    "IMAGESYNC_AGENT_INVENTORY_TIMEOUT": ("agent_inventory_timeout",),
    "IMAGESYNC_AGENT_FORGET": ("agent_forget",),
    "IMAGESYNC_AGENT_RUNTIME": ("agent_runtime",),
    "IMAGESYNC_AGENT_ENDPOINT": ("agent_endpoint",),
    "IMAGESYNC_AGENT_NAMESPACE": ("agent_namespace",),
    "IMAGESYNC_AGENT_HOSTS_DIR": ("agent_hosts_dir",),
    "IMAGESYNC_AGENT_IMAGE_FS": ("agent_image_fs",),
    "IMAGESYNC_AGENT_LABELS": ("agent_labels",),
    "IMAGESYNC_AGENT_PEER_PORT": ("agent_peer_port",),
    "IMAGESYNC_AGENT_PEER_ADDRESS": ("agent_peer_address",),
    "IMAGESYNC_AGENT_PEER_ADVERTISE": ("agent_peer_advertise",),
    "IMAGESYNC_SSH_USER": ("ssh", "user"),
    "IMAGESYNC_SSH_KEY_FILE": ("ssh", "key_file"),
    "IMAGESYNC_SSH_KNOWN_HOSTS": ("ssh", "known_hosts"),
    "IMAGESYNC_SSH_HOST_KEY_POLICY": ("ssh", "host_key_policy"),
    "IMAGESYNC_SSH_CONNECT_TIMEOUT": ("ssh", "connect_timeout"),
    "IMAGESYNC_SSH_CONFIG_FILE": ("ssh", "config_file"),
}

#: keys whose environment variable holds a comma-separated list
_LIST_KEYS = {("prefixes",), ("images",), ("exclude",), ("backup", "images"), ("backup", "insecure_sources"),
              ("agent_labels",)}


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
        keys += [f"backup.{key}" for key in BackupSettings.model_fields]
        return {key: self.sources.get(key, "default") for key in keys}


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None, *,
                  ssh: bool = True) -> Settings:
    """Read the configuration, apply the environment over it and validate it.

    ``path`` defaults to ``$IMAGESYNC_CONFIG``, then :data:`DEFAULT_CONFIG_PATH`;
    ``environ`` to ``os.environ``.  Raises :class:`ConfigError` listing every
    problem found, and nothing else.

    With ``ssh`` (the default), the OpenSSH client configuration of every SSH
    node is read here too, so that a broken line there is one of these
    problems.  A caller that reaches no node over SSH itself (``imagesync
    sync``, ``history``) passes ``ssh=False``: it is then read, and paramiko
    imported, only if :meth:`Settings.ssh_target` is ever asked.
    """
    environ = os.environ if environ is None else environ
    chosen = _config_path(path, environ)
    text = _read_text(chosen)
    problems: list[str] = []
    if _is_legacy(chosen, text):
        document: _Document | None = _Document(*_read_legacy(text, f"file {chosen}", problems))
    else:
        document = _read_toml(text, f"file {chosen}", problems)
    environment_problems = _apply_environment(document, environ)

    settings = None
    if document is not None:
        try:
            settings = Settings.model_validate(document.values)
        except ValidationError as exc:
            problems += [explain(error, document.labels) for error in exc.errors(include_url=False)]
    problems += environment_problems
    if problems or settings is None or document is None:
        # values are shown with repr-style escapes; this is for anything else
        raise ConfigError([" ".join(problem.splitlines()) for problem in problems], source=str(chosen))
    settings._sources = document.all_sources()
    settings._path = chosen
    # the OpenSSH client configuration, once the rest is valid: a broken line there is a problem too
    ssh_problems = settings.resolve_ssh() if ssh else []
    if ssh_problems:
        raise ConfigError([" ".join(problem.splitlines()) for problem in ssh_problems], source=str(chosen))
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
    for table, model in (("ssh", SSHSettings), ("backup", BackupSettings)):
        if isinstance(values.get(table), dict):
            for key in values[table]:
                if key in model.model_fields:
                    document.sources[f"{table}.{key}"] = source
    return document


def _apply_environment(document: _Document | None, environ: Mapping[str, str]) -> list[str]:
    """Apply the IMAGESYNC_* overrides to ``document``; problems for unknown variables.

    Unknown names are errors because a misspelt override would otherwise be
    ignored without a word.  An empty variable counts as unset, as an empty
    value does in image-sync.conf.
    """
    problems = []
    for variable in sorted(environ):
        if not variable.startswith("IMAGESYNC_") or variable in (CONFIG_VARIABLE, AGENT_VARIABLE,
                                                                       *CONTAINER_VARIABLES):
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
