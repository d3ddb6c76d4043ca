"""Images for some nodes only: a prefix or a declared image that names the labels it needs
(``nodes = ["gpu"]``) goes only to the nodes that carry every one of them.

A node outside an image's selection neither pulls it nor counts it as missing:
the pair is excluded as ``n/a`` ("not for this node's labels"), and a moved tag
it holds is not updated there. It still holds what it holds, and is a holder
others may copy from. An image is for every node when any rule that wants it
says so: a plain prefix (the seed's ``image-sync.conf`` has only those), or a
declared image without ``nodes``.

A configured node's labels are its ``labels``; an agent's are those it
registered (``--labels``, else ``agent_labels``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .. import references
from ..agents import registrations
from ..config.labels import selects
from ..errors import RefusedReference
from .plan import NOT_FOR_NODE, Condition, Plan

if TYPE_CHECKING:
    from redis import Redis

    from ..config import Settings

#: the reason of an exclusion by labels, before the labels it names
NOT_FOR_LABELS = "not for this node's labels"


def label_condition(settings: Settings, redis: Redis | None) -> Condition:
    """The condition that keeps each image off the nodes its prefix's or entry's labels do not select."""
    rules = Selections(settings)

    def condition(plan: Plan) -> None:
        plan.labels = node_labels(settings, redis, plan.nodes)
        if not rules.any:
            return
        for node in plan.nodes:
            carried = plan.labels.get(node, ())
            for image in list(plan.missing.get(node, ())):
                reason = rules.unselected(carried, image)
                if reason is None:
                    continue
                if (node, image) in plan.moved:
                    plan.drop(node, image)  # it holds the image: no exclusion to report, just no update
                else:
                    plan.exclude(node, image, NOT_FOR_NODE, reason)

    return condition


def unselected(settings: Settings, labels: Iterable[str], reference: str) -> str | None:
    """Why a node carrying ``labels`` is not for ``reference`` (a normalized name), as the
    plan says it; None when it is: under a plain prefix, declared plainly, or selected."""
    return Selections(settings).unselected(tuple(labels), reference)


def labels_of(settings: Settings, redis: Redis | None, node: str) -> tuple[str, ...]:
    """``node``'s labels: a configured node's own, else those its agent registered."""
    return node_labels(settings, redis, [node])[node]


class Selections:
    """Which labels each image needs, from the prefixes and declared images of ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.prefixes = tuple(settings.prefixes)
        self.images = settings.image_selections()
        self.everywhere: set[str] = set()
        for text in settings.declared_images():
            try:
                name = references.normalize(text)
            except RefusedReference:
                continue
            if name not in self.images:
                self.everywhere.add(name)
        self.any = bool(self.images) or any(prefix.nodes for prefix in self.prefixes)

    def unselected(self, carried: tuple[str, ...], image: str) -> str | None:
        """Why a node carrying ``carried`` is not for ``image``; None when it is."""
        needed = self.needed(image)
        if needed is None or any(selects(labels, carried) for labels in needed):
            return None
        wants = " or ".join(", ".join(labels) for labels in needed)
        return f"{NOT_FOR_LABELS} (it needs {wants}; the node has {', '.join(carried) or 'none'})"

    def needed(self, image: str) -> list[tuple[str, ...]] | None:
        """The label sets of which a node must carry one to receive ``image``; None: every node."""
        if image in self.everywhere:
            return None
        needed = [self.images[image]] if image in self.images else []
        try:
            ref = references.parse(image)
        except RefusedReference:
            return None
        for prefix in self.prefixes:
            if references.matches_prefix(ref, prefix):
                if not prefix.nodes:
                    return None
                needed.append(prefix.nodes)
        return needed or None


def node_labels(settings: Settings, redis: Redis | None, nodes: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """node -> its labels, of ``nodes``: the configured ones', and the registered agents'."""
    found = {node.name: tuple(node.labels) for node in settings.nodes}
    if settings.agents and redis is not None:
        for registration, _ in registrations(redis):
            found.setdefault(registration.name, tuple(registration.node.labels))
    return {node: found.get(node, ()) for node in nodes}
