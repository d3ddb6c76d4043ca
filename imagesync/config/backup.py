"""The ``[backup]`` table and the image patterns of ``exclude`` and ``backup.images``.

A backup registry keeps a copy of every synced image under a name derived
from the original (:func:`imagesync.references.backup_name`); see
:mod:`imagesync.backup` for what a run does with it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from imagesync import references
from imagesync.errors import RefusedReference

from .checks import _check, _existing_file, _invalid, _secret, _show, _text, _without_repeats


def _pattern(value: Any) -> str:
    """An image pattern: a prefix, one image, or a wildcard pattern (``references.validate_pattern``)."""
    text = _text("an image pattern")(value)
    try:
        return references.validate_pattern(text)
    except RefusedReference as exc:
        raise _invalid(f"{_show(value)} is not a usable image pattern: {exc.reason}") from None


def _backup_registry(value: Any) -> str:
    """``host[:port][/path]``: where backup copies are pushed, normalized as prefixes are."""
    text = _text("a registry")(value).strip().rstrip("/")
    first = text.split("/", 1)[0]
    looks_like_host = "." in first or ":" in first or first == "localhost"
    if "://" in text or not looks_like_host:
        raise _invalid(f"{_show(value)} is not a registry: write host[:port][/path], "
                       "such as harbor.example.com/backup or 127.0.0.1:5000")
    try:
        prefix = references.validate_prefix(text)
    except RefusedReference as exc:
        raise _invalid(f"{_show(value)} is not a usable backup registry: {exc.reason}") from None
    return prefix


def _registry_host(value: Any) -> str:
    """``host[:port]`` as image names spell a registry, in lower case."""
    text = _text("a registry", _REGISTRY_HOST, "write host[:port], such as harbor.local:8443")(value)
    return text.lower()


_REGISTRY_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?")

Patterns = Annotated[list[Annotated[str, _check(_pattern)]], AfterValidator(_without_repeats)]


class BackupSettings(BaseModel):
    """A registry that keeps a copy of every synced image, and restores it when upstream lost it.

    The password is never shown (``config show`` masks it, reprs omit it);
    ``password_file`` keeps it out of the configuration file altogether.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    registry: Annotated[str, _check(_backup_registry)]
    username: Annotated[str | None, _check(_text("a user name"), optional=True)] = None
    password: Annotated[str | None, _check(_secret, optional=True)] = Field(default=None, repr=False)
    password_file: Annotated[Path | None, _check(_existing_file, optional=True)] = None
    # which wanted images are backed up: all of them when empty
    images: Patterns = []
    # the registry speaks plain HTTP (or HTTPS with a certificate nobody can verify)
    insecure: bool = False
    # upstream registries (host[:port]) the control host copies from without TLS verification
    insecure_sources: Annotated[list[Annotated[str, _check(_registry_host)]], AfterValidator(_without_repeats)] = []

    @model_validator(mode="after")
    def _login(self) -> BackupSettings:
        given = (self.password is not None) + (self.password_file is not None)
        if given == 2:
            raise _invalid("give either password or password_file, not both", at=("backup", "password"))
        if self.username is None and given:
            raise _invalid("a password needs its username: set username too", at=("backup", "username"))
        if self.username is not None and not given:
            raise _invalid("a username needs its password: set password or password_file", at=("backup", "password"))
        return self

    @property
    def host(self) -> str:
        """The registry's host[:port], as credentials are keyed."""
        return self.registry.split("/", 1)[0]

    def login(self) -> tuple[str, str] | None:
        """(username, password), read from password_file when that is how it is given; None without one."""
        if self.username is None:
            return None
        if self.password is not None:
            return self.username, self.password
        assert self.password_file is not None
        return self.username, self.password_file.read_text().strip()

    def wants(self, image: str) -> bool:
        """Whether ``image`` (a normalized reference) is one this backup keeps."""
        if not self.images:
            return True
        return references.matches_any_pattern(references.parse(image), tuple(self.images))
