"""Which images a node holds that imagesync no longer wants there: prune's rules, as pure
functions of what the node holds, the configuration and what Redis remembers.

An image is *managed* when imagesync keeps it in sync: it lies under a configured
prefix, or is declared now, or was declared in some past run (:mod:`imagesync.declared`).
Nothing else is ever touched, whatever it matches.

A managed name is *retired* from a node, with its reason, when

1. it matches an ``exclude`` pattern;
2. it was declared and no longer is, and lies under no prefix;
3. the node's labels no longer select it (a prefix or a declared image with
   ``nodes = [...]``): the same rule that keeps the plan from sending it there.

A node's image (one id, with every name it carries) leaves only when each of its
names is retired, for containerd's CRI removes an image with all its names: a name
still wanted on the node, or one imagesync does not manage, keeps it. Nor does it
leave while a container uses it. A tagged image is judged by its tags, an untagged
one by its digest names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from . import references
from .errors import RefusedReference
from .runtimes import Image
from .runtimes.removal import Containers

#: what :meth:`Rules.judge` says of one name
UNMANAGED, WANTED, RETIRED = "unmanaged", "wanted", "retired"

#: (node, image) -> why the node's labels no longer select the image; None when they do
LabelRule = Callable[[str, str], "str | None"]


def _every_node(node: str, image: str) -> str | None:
    return None


@dataclass(frozen=True)
class Rules:
    """What prune judges each name by."""

    prefixes: tuple[str, ...]
    #: the images the configuration declares now, normalized (imagesync.declared.declared_now)
    declared: frozenset[str]
    #: every image declared in some run -> the last run that declared it
    remembered: Mapping[str, str]
    exclude: tuple[str, ...] = ()
    labels: LabelRule = _every_node

    def judge(self, node: str, name: str) -> tuple[str, str]:
        """(``UNMANAGED``, ``WANTED`` or ``RETIRED``, the reason it is retired) for one name ``node`` holds."""
        try:
            ref = references.parse(name)
        except (RefusedReference, TypeError):
            return UNMANAGED, ""
        full = str(ref)
        prefixed = references.matches_any(ref, self.prefixes)
        declared = _among(ref, self.declared)
        last_declared = _among(ref, self.remembered)
        if not (prefixed or declared or last_declared):
            return UNMANAGED, ""
        pattern = next((p for p in self.exclude if references.matches_pattern(ref, p)), None)
        if pattern is not None:
            return RETIRED, f"matches exclude {pattern!r}"
        if prefixed or declared:
            why = self.labels(node, full)
            return (RETIRED, why) if why else (WANTED, "")
        return RETIRED, f"no longer declared (last declared by run {self.remembered[last_declared]})"


def _among(ref: references.Reference, names: Iterable[str]) -> str | None:
    """The name of ``names`` that is ``ref``: the same normalized name, or for a digest
    reference, any name of the same repository and digest (``repo:tag@sha256:…`` is held as
    ``repo@sha256:…``)."""
    full = str(ref)
    if full in names:
        return full
    if not ref.digest:
        return None
    for name in names:
        if "@" in name and name.endswith(ref.digest):
            try:
                other = references.parse(name)
            except RefusedReference:
                continue
            if other.repository == ref.repository and other.digest == ref.digest:
                return name
    return None


@dataclass(frozen=True)
class Verdict:
    """One image a node holds that carries a retired name: it goes, or it stays and why."""

    node: str
    #: its first retired name, normalized: the name the record and the logs give it
    image: str
    remove: bool
    #: why it goes (the rule that retired it), or why it stays
    reason: str
    #: the image as the node's runtime reported it, for the removal
    held: Image

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "image": self.image, "remove": self.remove, "reason": self.reason}


def verdicts(node: str, images: Iterable[Image], rules: Rules, containers: Containers | None) -> list[Verdict]:
    """The images of ``node`` that carry a retired name, each removed or kept with its reason.

    ``containers``: what the node's containers use; None when the node could not say,
    in which case every such image is kept.
    """
    found = []
    for image in images:
        judged = [(name, *rules.judge(node, name)) for name in image.tags or image.digests]
        retired = [(name, why) for name, state, why in judged if state == RETIRED]
        if not retired:
            continue
        shown = references.normalize(retired[0][0])
        why = retired[0][1] + (f" (and {len(retired) - 1} more of its names)" if len(retired) > 1 else "")
        keeping = next(((name, state) for name, state, _ in judged if state != RETIRED), None)
        if keeping is not None:
            name, state = keeping
            also = "still wanted on this node" if state == WANTED else "not managed by imagesync"
            found.append(Verdict(node, shown, False, f"it is also {name}, {also}", image))
        elif containers is None:
            found.append(Verdict(node, shown, False, "the node could not say which images its containers use", image))
        elif users := containers.using(image):
            more = f" and {len(users) - 3} more" if len(users) > 3 else ""
            found.append(Verdict(node, shown, False, f"in use by container {', '.join(users[:3])}{more}", image))
        else:
            found.append(Verdict(node, shown, True, why, image))
    return sorted(found, key=lambda verdict: verdict.image)
