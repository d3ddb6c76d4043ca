"""pydantic's validation errors as lines an operator can act on.

One line per error: where, as the user wrote it (``nodes[1].port``,
``NODE2``, ``IMAGESYNC_RETRIES``), what is wrong and what to do, with a
"did you mean" for a misspelt key.  The checks of :mod:`.checks` already
give finished text; what is left here is the shape of the document: missing
keys, unknown keys, a value where a table or a list belongs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from .checks import Location, _show, _suggest
from .images import ImageEntry
from .model import Node, RegistryLogin, Settings, SSHSettings

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def explain(error: ErrorDetails, labels: Mapping[Location, str]) -> str:
    """One line for one pydantic error: where, what is wrong, what to do."""
    context = error.get("ctx") or {}
    location: Location = _untagged(tuple(context.get("at", error["loc"])))
    where = _where(location, labels)
    kind, value = error["type"], error.get("input")
    if kind == "imagesync":
        return f"{where}: {context['problem']}"
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


def _untagged(location: Location) -> Location:
    """The location without the tag pydantic adds for the form of an ``images`` item."""
    if len(location) > 2 and location[0] == "images" and location[2] in ("reference", "table"):
        return location[:2] + location[3:]
    return location


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
    models: dict[Location, type[BaseModel]] = {("ssh",): SSHSettings, ("nodes",): Node, ("registries",): RegistryLogin,
                                               ("images",): ImageEntry}
    model = models.get(table, Settings)
    known = list(model.model_fields)
    guess = _suggest(str(location[-1]), known)
    if guess:
        return f"unknown key {where}: did you mean {guess}?"
    return f"unknown key {where}: remove it (the keys here are {', '.join(known)})"
