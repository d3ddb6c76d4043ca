"""Taking an image off a node, for ``imagesync prune``: which images the node's containers
use, and the removal of one image. Each is one command under the node's ``timeout``.

containerd's CRI removes an image whatever uses it (``crictl rmi`` of the image a
container was made from succeeds, and takes every name of the image with it), so
imagesync asks the node which images its containers use before it decides, and asks
again inside the removal's own command, just before it removes.

Who is asked:

* on a ``crictl`` node, ``crictl ps -a -o json``: every container of every pod, running
  or not, as the CRI knows them (containerd's or CRI-O's). Where ``ctr`` is on the node,
  ``ctr containers ls`` in the node's namespace too, whose containers made outside the
  CRI (ctr, nerdctl) the CRI does not list, though their images are its images; its
  answer counts when it gives one.
* on a ``ctr`` node, ``ctr containers ls`` in the node's namespace.

A node whose own client cannot answer loses nothing.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import references
from ..errors import RefusedReference
from . import TIMEOUT_EXIT_CODES, Image, checked, ctr_for, failure_reason, under_timeout

if TYPE_CHECKING:
    from ..config import Node
    from ..transport import CommandResult

#: the line after each client's answer in a listing of containers: ``MARKER CLIENT STATUS``
CONTAINERS_MARKER = "imagesync-containers"
#: what a removal prints last: ``MARKER removed``, ``MARKER in-use NAME``, ``MARKER renamed NAME``
#: or ``MARKER unlisted``
REMOVAL_MARKER = "imagesync-removal"
#: what a removal answers (:func:`read_removal`)
REMOVED, IN_USE, RENAMED, UNLISTED = "removed", "in-use", "renamed", "unlisted"
FAILED, TIMED_OUT = "failed", "timed-out"
#: an image id as crictl reports it (containerd's ``sha256:…``, CRI-O's bare hex)
_IMAGE_ID = re.compile(r"(?:sha256:)?[0-9a-f]{64}")


@dataclass(frozen=True)
class Containers:
    """What the containers of one node use: each image name or id a container names -> the containers."""

    users: Mapping[str, tuple[str, ...]]

    def using(self, image: Image) -> tuple[str, ...]:
        """The containers that use ``image``, by its id, an alias, a name or a digest."""
        found = [container for name in identities(image) for container in self.users.get(name, ())]
        return tuple(dict.fromkeys(found))


def identities(image: Image) -> list[str]:
    """Every string a container may name ``image`` by, each one valid: its id and aliases, and its
    tags and digest names as reported, normalized, in their short form, and their bare digests."""
    names = [name for name in (image.id, *image.aliases) if _IMAGE_ID.fullmatch(name)]
    for text in (*image.tags, *image.digests):
        try:
            ref = references.parse(text)
        except (RefusedReference, TypeError):
            continue
        names += [text, str(ref), ref.familiar] + ([ref.digest] if ref.digest else [])
    return list(dict.fromkeys(names))


def _crictl(node: Node) -> str:
    """crictl at the node's runtime endpoint: ``ps`` asks the runtime service, not the image service."""
    return f"crictl --runtime-endpoint {shlex.quote(node.endpoint)}" if node.endpoint else "crictl"


def _listing(node: Node) -> str:
    """The shell lines that list the node's containers, each answer followed by its marker line."""
    ctr = f"{ctr_for(node)._base()} containers ls"
    asked = f'{ctr}; echo "{CONTAINERS_MARKER} ctr $?"'
    if node.runtime == "ctr":
        return asked
    return (f'{_crictl(node)} ps -a -o json; echo "{CONTAINERS_MARKER} crictl $?"; '
            f"if command -v ctr >/dev/null 2>&1; then {asked}; fi")


def containers_command(node: Node, seconds: int) -> str:
    """Lists the containers of ``node`` (see the module's docstring), under the node's ``timeout``."""
    return under_timeout(_listing(node), seconds)


def parse_containers(node: Node, output: str) -> Containers:
    """The answer to :func:`containers_command`; ValueError when the node's own client gave none."""
    users: dict[str, list[str]] = {}
    answered = False
    lines: list[str] = []
    for line in output.splitlines():
        words = line.split()
        if len(words) != 3 or words[0] != CONTAINERS_MARKER:
            lines.append(line)
            continue
        client, status, text = words[1], words[2], "\n".join(lines)
        lines = []
        if status != "0":
            if client == node.runtime:
                raise ValueError(f"{client} cannot list the containers of {node.name} (exit {status})")
            continue  # ctr beside crictl: its answer counts when it gives one
        found = _crictl_containers(text) if client == "crictl" else _ctr_containers(text)
        answered = answered or client == node.runtime
        for container, names in found:
            for name in names:
                users.setdefault(name, []).append(container)
    if not answered:
        raise ValueError(f"{node.runtime} gave no list of the containers of {node.name}")
    return Containers({name: tuple(dict.fromkeys(found)) for name, found in users.items()})


def _crictl_containers(text: str) -> list[tuple[str, list[str]]]:
    """(container, the image names it names) from ``crictl ps -a -o json``."""
    try:
        document = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"crictl ps printed something that is not JSON: {exc}") from exc
    found = []
    for item in document.get("containers") or []:
        spec = item.get("image") or {}
        names = [spec.get("image"), spec.get("userSpecifiedImage"), item.get("imageRef")]
        name = (item.get("metadata") or {}).get("name") or "?"
        found.append((f"{name} ({str(item.get('id', ''))[:13]})", _with_normalized(names)))
    return found


def _ctr_containers(text: str) -> list[tuple[str, list[str]]]:
    """(container, its image) from ``ctr containers ls``: ``CONTAINER IMAGE RUNTIME`` rows."""
    found = []
    for line in text.splitlines()[1:]:
        columns = line.split()
        if len(columns) >= 3:
            found.append((columns[0], _with_normalized([columns[1]])))
    return found


def _with_normalized(names: Iterable[object]) -> list[str]:
    """Each name as given and, when it is a reference, normalized and its bare digest."""
    out = []
    for name in names:
        if not isinstance(name, str) or not name or name == "-":
            continue
        out.append(name)
        try:
            ref = references.parse(name)
        except RefusedReference:
            continue
        out += [str(ref)] + ([ref.digest] if ref.digest else [])
    return out


def remove_command(node: Node, image: Image, seconds: int) -> str:
    """One command that lists the node's containers again, stops if one names ``image``, and
    otherwise removes it; under the node's ``timeout``. Prints :data:`REMOVAL_MARKER` last.

    A crictl node removes it by its id, which takes every name with it: so it first asks
    the CRI which tags the image has now, and stops if one was given to it since it was
    listed. A ctr node removes every name it was listed under (a name given since stays,
    and so does the image). Every value is checked and quoted: names and ids come from the node.
    """
    own = shlex.quote(f"{CONTAINERS_MARKER} {node.runtime} 0")
    script = [f"used=$({_listing(node)} 2>/dev/null)",
              f'case "$used" in *{own}*) ;; *) echo "{REMOVAL_MARKER} {UNLISTED}"; exit 3;; esac']
    for name in identities(image):
        quoted = shlex.quote(name)
        script.append(f'case "$used" in *{quoted}*) echo "{REMOVAL_MARKER} {IN_USE}" {quoted}; exit 0;; esac')
    if node.runtime == "ctr":
        aliases = [shlex.quote(alias) for alias in image.aliases if _IMAGE_ID.fullmatch(alias)]
        names = [checked(name) for name in (*image.tags, *image.digests)] + aliases
        script.append(f"{ctr_for(node)._base()} images rm {' '.join(names)} >/dev/null || exit $?")
    else:
        if not _IMAGE_ID.fullmatch(image.id):
            raise RefusedReference(image.id, "not an image id")
        crictl = "crictl" + (f" --image-endpoint {shlex.quote(node.endpoint)}" if node.endpoint else "")
        # the tags of the CRI's status, one a line: the "repoTags" array of its JSON, whatever its layout
        tags = (f"{crictl} inspecti -q {shlex.quote(image.id)} | tr -d ' \\t\\n' "
                "| sed -n 's/.*\"repoTags\":\\[\\([^]]*\\)\\].*/\\1/p' | tr ',' '\\n' | tr -d '\"'")
        listed = " ".join(checked(tag) for tag in image.tags)  # names of the grammar need no quotes
        script += [f"now=$({tags}) || exit $?", "set -f",
                   f'for tag in $now; do case " {listed} " in *" $tag "*) ;; '
                   f'*) echo "{REMOVAL_MARKER} {RENAMED} $tag"; exit 0;; esac; done',
                   f"{crictl} rmi {shlex.quote(image.id)} >/dev/null || exit $?"]
    script.append(f'echo "{REMOVAL_MARKER} {REMOVED}"')
    return under_timeout("; ".join(script), seconds)


def read_removal(result: CommandResult) -> tuple[str, str]:
    """(what the removal did, its detail): :data:`REMOVED`; :data:`IN_USE` and the name a
    container uses; :data:`RENAMED` and the name given to the image since it was judged;
    :data:`UNLISTED`; :data:`TIMED_OUT`; or :data:`FAILED` and the reason."""
    marker, said, detail = ((result.stdout.strip().splitlines() or [""])[-1].split(maxsplit=2) + ["", "", ""])[:3]
    if marker == REMOVAL_MARKER:
        if said == UNLISTED:
            return UNLISTED, ""
        if said in (REMOVED, IN_USE, RENAMED) and result.ok:
            return said, detail
    if result.exit_code in TIMEOUT_EXIT_CODES:
        return TIMED_OUT, "the runtime did not answer in time"
    return FAILED, failure_reason(result.stderr, result.stdout)
