"""The rows of ``config show``: each key's value in effect and where it came from.

:meth:`Settings.describe <imagesync.config.Settings.describe>` answers with
:func:`describe`; the provenance itself is :attr:`Settings.sources`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backup import BackupSettings
from .checks import mask_url
from .sshconfig import describe_config_files

if TYPE_CHECKING:
    from .model import Settings
    from .sshtargets import SSHTarget


def describe(settings: Settings, top_keys: list[str]) -> list[tuple[str, str, str]]:
    """(key, value, source) for every key and every node's fields, for ``config show``.

    A node's user and key_file show the value in effect, which may come
    from the ssh table; the Redis password is masked.  An SSH node's host,
    port, user and key_file, and the rows known_hosts, connect_timeout and
    proxy_jump after its fields, are those in effect once the OpenSSH client
    configuration is applied (:meth:`Settings.ssh_target`).
    """
    sources = settings.sources
    rows = []
    for key in top_keys:
        value = getattr(settings, key)
        if key == "nodes":
            value = [node.name for node in settings.nodes]
        elif key == "registries":
            value = list(settings.registries)
        elif key == "prefixes":
            value = [prefix.describe() for prefix in settings.prefixes]
        elif key == "images":
            value = [item if isinstance(item, str) else f"{item.ref} ({', '.join(item.arch) or 'no arch'}"
                     + (f"; nodes: {', '.join(item.nodes)})" if item.nodes else ")") for item in settings.images]
        elif key == "redis_url":
            value = mask_url(value)
        elif key == "webhook_secret" and value is not None:
            value = "****"
        elif key == "backup":
            value = settings.backup.registry if settings.backup else None
        rows.append((key, _display(value), sources[key]))
    for key in type(settings.ssh).model_fields:
        shown = describe_config_files(settings.ssh) if key == "config_file" else _display(getattr(settings.ssh, key))
        rows.append((f"ssh.{key}", shown, sources[f"ssh.{key}"]))
    for host, login in settings.registries.items():
        rows.append((f"registries.{host}.username", login.username, sources["registries"]))
        if login.password_file is not None:
            rows.append((f"registries.{host}.password_file", str(login.password_file), sources["registries"]))
        else:
            rows.append((f"registries.{host}.password", "****", sources["registries"]))
    if settings.backup is not None:
        for key in BackupSettings.model_fields:
            value = getattr(settings.backup, key)
            if key == "password" and value is not None:
                value = "****"
            rows.append((f"backup.{key}", _display(value), sources.get(f"backup.{key}", sources["backup"])))
    for node in settings.nodes:
        target = settings.ssh_target(node) if node.transport == "ssh" else None
        for key in type(node).model_fields:
            value = getattr(node, key)
            source = sources["nodes"] if key in node.model_fields_set else "default"
            if key in ("user", "key_file") and value is None:
                value, source = getattr(settings.ssh, key), sources[f"ssh.{key}"]
            if target is not None and key in ("host", "port", "user", "key_file"):
                value = list(target.key_files) or None if key == "key_file" else getattr(target, key)
                source = target.sources[key]
            rows.append((f"nodes.{node.name}.{key}", _display(value), source))
        if target is not None:
            rows += [(f"nodes.{node.name}.{key}", value, target.sources[key]) for key, value in _ssh_rows(target)]
    return rows


def _ssh_rows(target: SSHTarget) -> list[tuple[str, str]]:
    """The rows ``config show`` adds for an SSH node: what its fields do not say."""
    jump = target.jump
    route = "(none)"
    if jump is not None:
        keys = ", ".join(str(path) for path in jump.key_files) or "SSH's usual keys"
        route = f"{jump.name}: {jump.address}, key {keys}, known_hosts {_display(list(jump.known_hosts))}"
    return [("known_hosts", _display(list(target.known_hosts))),
            ("connect_timeout", _display(target.connect_timeout)),
            ("proxy_jump", route)]


def _display(value: object) -> str:
    """A value as ``config show`` prints it."""
    if value is None:
        return "(not set)"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "(none)"
    return str(value)
