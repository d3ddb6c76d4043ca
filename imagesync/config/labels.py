"""Node labels and the images they select: ``[[nodes]] labels = ["gpu"]`` (an agent's
``--labels`` or ``agent_labels``), and ``nodes = ["gpu"]`` on a prefix table
(``[[prefixes]] name = "nvcr.io/nvidia", nodes = ["gpu"]``) or a declared image's table.

A prefix is a :class:`Prefix`: the normalized prefix itself, a string as
before, that also carries the labels a node needs to receive its images. A
plain prefix (a string, an environment variable, the seed's ``PREFIXn``) needs
none: it means every node.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, GetCoreSchemaHandler
from pydantic_core import core_schema

from .checks import _check, _invalid, _prefix, _show, _text, _without_repeats

# a label is a word of the fleet's own choosing, short enough for a table cell
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_LABEL_RULE = "use up to 63 letters, digits, '.', '_' and '-', starting with a letter or digit"


def _labels(value: Any) -> Any:
    """A list of labels; a string is a comma-separated list (an environment variable, ``--labels``)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


_Label = Annotated[str, _check(_text("a label", _LABEL, _LABEL_RULE))]
#: the labels of a node, or those a node needs to receive an image (every one of them)
Labels = Annotated[list[_Label], _check(_labels), AfterValidator(_without_repeats)]


class Prefix(str):
    """A configured prefix, normalized; ``nodes``: the labels a node must carry, every one,
    to receive the images under it (none: every node)."""

    nodes: tuple[str, ...]

    def __new__(cls, name: str, nodes: tuple[str, ...] | list[str] = ()) -> Prefix:
        prefix = super().__new__(cls, name)
        prefix.nodes = tuple(nodes)
        return prefix

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _prefix_item, serialization=core_schema.plain_serializer_function_ser_schema(_serialized))

    def describe(self) -> str:
        """``nvcr.io/nvidia (nodes: gpu)``: the prefix as ``config show`` prints it."""
        return f"{self} (nodes: {', '.join(self.nodes)})" if self.nodes else str(self)


def _serialized(prefix: Prefix) -> Any:
    return {"name": str(prefix), "nodes": list(prefix.nodes)} if prefix.nodes else str(prefix)


def _prefix_item(value: Any) -> Prefix:
    """One item of ``prefixes``: a prefix as text, or a table ``{name, nodes}``."""
    if isinstance(value, Prefix):
        return value
    if not isinstance(value, dict):
        return Prefix(_prefix(value))
    unknown = sorted(set(value) - {"name", "nodes"})
    if unknown:
        raise _invalid(f"unknown key {unknown[0]!r} in a prefix table: its keys are name and nodes")
    if "name" not in value:
        raise _invalid("a prefix table has no name: write name = \"registry/path\"")
    nodes = _labels(value.get("nodes", []))
    if not isinstance(nodes, list):
        raise _invalid(f"nodes = {_show(nodes)} is not a list of labels: write nodes = [\"gpu\"]")
    return Prefix(_prefix(value["name"]), _without_repeats([_text("a label", _LABEL, _LABEL_RULE)(n) for n in nodes]))


def selects(needed: tuple[str, ...] | list[str], labels: tuple[str, ...] | list[str]) -> bool:
    """Whether a node carrying ``labels`` carries every label of ``needed`` (none: every node)."""
    return set(needed) <= set(labels)
