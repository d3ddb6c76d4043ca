"""The reader of the seed tool's shell file ``image-sync.conf``.

The Bash tool this project replaces was configured with ``NODE1=...``,
``PREFIX1=...``, ``LOG_DIR``, ``TIME_OUT`` and ``MAX_PARALLEL``.  Such a file
is read as it is, as bash would read it, and turned into TOML-shaped values,
so that an existing install keeps working while it moves to TOML.
:mod:`.sources` decides which format a file is in (:func:`_is_legacy`) and
calls :func:`_read_legacy`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from .checks import Location, _show, _suggest

#: the seed's image-sync.conf keys besides NODEn and PREFIXn, and the keys they became
LEGACY_KEYS = {"LOG_DIR": "log_dir", "TIME_OUT": "time_out", "MAX_PARALLEL": "max_parallel"}


# upper-case keys tell the seed's format from TOML, whose keys here are lower case
_LEGACY_LINE = re.compile(r"(?:export\s+)?[A-Z][A-Z0-9_]*=")


def _is_legacy(path: Path, text: str) -> bool:
    """Whether the file is the seed's shell format: a .conf file, or only KEY=value lines."""
    if path.suffix == ".conf":
        return True
    lines = [line.strip() for line in text.splitlines()]
    meaningful = [line for line in lines if line and not line.startswith("#")]
    return bool(meaningful) and all(_LEGACY_LINE.match(line) for line in meaningful)


def _without_comment(line: str) -> str:
    """``line`` up to its comment, as bash sees it: a ``#`` that starts a word,
    outside quotes. (shlex would start one at any ``#``, and would choke on the
    apostrophe of a comment such as ``# the seed's file``.)"""
    quote = ""
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def _read_legacy(
    text: str, source: str, problems: list[str]
) -> tuple[dict[str, Any], dict[str, str], dict[Location, str]]:
    """The seed's image-sync.conf, read as bash would, as TOML-shaped values.

    NODEn become nodes named after their host, PREFIXn the prefixes, in the
    order of n; an empty value leaves the entry out, as in the seed tool.
    Returns the fields of a :class:`~imagesync.config.sources._Document`:
    the values, the source of each key given, and the name the user wrote
    for each location (NODE2, PREFIX1, TIME_OUT).
    """
    assigned: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        lexer = shlex.shlex(_without_comment(line), posix=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        try:
            words = list(lexer)
        except ValueError as exc:
            problems.append(f"line {number}: {str(exc).lower()}: check the quotes")
            continue
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

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    labels: dict[Location, str] = {}

    def numbered(stem: str, name: str) -> list[tuple[str, str]]:
        """The non-empty NODEn or PREFIXn assignments, in the order of n."""
        keys = sorted(
            (key for key in assigned if re.fullmatch(stem + r"[0-9]+", key)), key=lambda k: int(k[len(stem) :])
        )
        if keys:
            sources[name] = source
        return [(key, assigned[key]) for key in keys if assigned[key]]

    nodes = []
    for index, (key, value) in enumerate(numbered("NODE", "nodes")):
        # the seed ran "ssh $NODE", so NODE1=admin@host meant user admin
        user, _, host = value.rpartition("@")
        nodes.append({"name": host, "host": host} | ({"user": user} if user else {}))
        labels[("nodes", index)] = key
    values["nodes"] = nodes
    labels[("nodes",)] = "NODE1"

    prefixes = numbered("PREFIX", "prefixes")
    if prefixes:
        values["prefixes"] = [value for _, value in prefixes]
    labels.update({("prefixes", index): key for index, (key, _) in enumerate(prefixes)})
    labels[("prefixes",)] = "PREFIX1"

    for key, name in LEGACY_KEYS.items():
        if assigned.get(key):
            values[name] = assigned[key]
            sources[name] = source
            labels[(name,)] = key
    return values, sources, labels


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
