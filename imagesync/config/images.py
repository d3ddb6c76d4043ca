"""The declared images written as tables, and seed 003's ``image.config``.

:class:`ImageEntry` is an image with a reference per architecture (and a pin);
``images`` in the settings holds them next to plain references (:data:`Images`).
:func:`read_images_file` reads ``images_file``, the seed's JSON list of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from .. import references
from ..errors import RefusedReference
from .checks import _check, _invalid, _text
from .labels import Labels

if TYPE_CHECKING:
    from .model import Settings

_ImageRef = Annotated[str, _check(_text("an image reference"))]
# an architecture as per-architecture references and OCI platforms name it (amd64, arm64, ppc64le)
_ARCH = re.compile(r"[a-z0-9_]+")
_ARCH_RULE = "write it as OCI platforms do, such as amd64, arm64 or ppc64le"
_Arch = Annotated[str, _check(_text("an architecture", _ARCH, _ARCH_RULE))]


class ImageEntry(BaseModel):
    """A declared image with a reference per architecture (seed 003's image.config):
    each node pulls ``arch[<its architecture>]`` and, where its runtime can, holds it as ``ref`` too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: _ImageRef
    arch: dict[_Arch, _ImageRef] = Field(default_factory=dict)
    # keep it from the kubelet's image garbage collection, where containerd can (>= 1.7)
    pin: bool = False
    # the labels a node needs to receive it (none: every node)
    nodes: Labels = Field(default_factory=list)


#: ``images``: plain references and tables, each read as what it looks like
Images = list[Annotated[
    Annotated[_ImageRef, Tag("reference")] | Annotated[ImageEntry, Tag("table")],
    Discriminator(lambda value: "table" if isinstance(value, (dict, ImageEntry)) else "reference"),
]]


def _normalized(entry: ImageEntry) -> str | None:
    """The entry's ``ref`` normalized; None when it is no valid reference (the plan refuses it)."""
    try:
        return references.normalize(entry.ref)
    except RefusedReference:
        return None


def pinned_images(items: list[str | ImageEntry]) -> frozenset[str]:
    """The entries of ``items`` written with ``pin = true``, normalized."""
    return frozenset(ref for item in items if isinstance(item, ImageEntry) and item.pin
                     and (ref := _normalized(item)) is not None)


def per_architecture(items: list[str | ImageEntry]) -> dict[str, dict[str, str]]:
    """The per-architecture entries of ``items``: ``ref`` (normalized) -> architecture -> the reference to pull."""
    return {ref: dict(item.arch) for item in items if isinstance(item, ImageEntry) and item.arch
            and (ref := _normalized(item)) is not None}


def image_selections(items: list[str | ImageEntry]) -> dict[str, tuple[str, ...]]:
    """The entries of ``items`` written with ``nodes = [...]``: ``ref`` (normalized) -> the labels a node needs."""
    return {ref: tuple(item.nodes) for item in items if isinstance(item, ImageEntry) and item.nodes
            and (ref := _normalized(item)) is not None}


def read_images_file(path: Path, settings: Settings) -> list[ImageEntry]:
    """The entries of seed 003's ``image.config``: a JSON list of ``{ref, registry, private,
    config, arch}`` objects. ``arch`` becomes the entry's per-architecture references;
    ``private`` demands a login for ``registry`` in ``[registries]``; ``config`` (the name of
    the Docker config secret the DaemonSet mounted) has no counterpart: imagesync keeps one
    login per registry host."""
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _invalid(f"{path} cannot be read as JSON ({exc}): fix the file", at=("images_file",)) from None
    if not isinstance(document, list):
        raise _invalid(f"{path} is not a JSON list of images: write [{{\"ref\": ...}}, ...]", at=("images_file",))
    entries, problems = [], []
    for index, item in enumerate(document):
        name = f"{path} entry {index + 1}"
        if not isinstance(item, dict) or not isinstance(item.get("ref"), str):
            problems.append(f"{name} has no \"ref\": give each entry its image name")
            continue
        name += f" ({item['ref']})"
        unknown = sorted(set(item) - {"ref", "registry", "private", "config", "arch"})
        if unknown:
            problems.append(f"{name}: unknown key {unknown[0]!r}: the keys are ref, registry, private, config, arch")
            continue
        registry = item.get("registry")
        if item.get("private") is True and (not isinstance(registry, str) or settings.login_for(registry) is None):
            problems.append(f"{name} is private on {registry}: add a [registries.\"{registry}\"] login "
                            "(username, and password or password_file)")
            continue
        try:
            entries.append(ImageEntry.model_validate({"ref": item["ref"], "arch": item.get("arch") or {}}))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            what = (first.get("ctx") or {}).get("problem") or first["msg"]
            problems.append(f"{name}: {'.'.join(str(part) for part in first['loc'])}: {what}")
    if problems:
        raise _invalid("; ".join(problems), at=("images_file",))
    return entries
