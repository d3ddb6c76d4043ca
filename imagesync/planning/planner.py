"""Planning: from what each node holds, what each node must pull. Pure functions, no I/O.

The wanted set is the union, over the reachable nodes, of the references that
lie under a configured prefix, plus the declared images. A node lacks a
reference it does not hold. Unreachable nodes take no part: they are neither
sources (their images do not become wanted) nor targets.

Two more decisions are made here, once, for every (node, image) the node lacks:

* whether the image belongs on the node at all. Each *condition* of the
  :class:`~imagesync.planning.plan.Policy` (the platform check, the room check, ...)
  may exclude a pair, with a kind (``n/a``, ``skipped``) and a reason; an excluded
  pair is not pulled and is not a failure.
* where the image comes from: a :class:`~imagesync.planning.plan.Route`
  (:mod:`imagesync.planning.routes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .. import references
from ..errors import RefusedReference
from ..facts import NodeFacts
from ..runtimes import Image
from .holdings import NameVerdict, find_drift, holdings
from .plan import NOT_HELD, PEERS, Plan, Policy, Refusal, held_as
from .routes import copy_notes, routes


def make_plan(
    inventories: Mapping[str, Iterable[Image]],
    prefixes: Iterable[str],
    declared: Iterable[str] = (),
    unreachable: Mapping[str, str] | None = None,
    targets: Iterable[str] | None = None,
    facts: Mapping[str, NodeFacts] | None = None,
    policy: Policy | None = None,
    exclude: Iterable[str] = (),
) -> Plan:
    """Plan a run.

    ``inventories`` maps each reachable node to its images; ``unreachable``
    maps each node that could not be asked to the reason. ``targets`` limits
    which nodes receive pulls (all reachable nodes by default); every
    reachable node is still a source. ``facts`` are the nodes' platforms,
    disks and abilities; ``policy`` the conditions and sources (pulls from
    the registry alone, and nothing excluded, without one). An image that
    matches an ``exclude`` pattern is never wanted, even when declared.
    """
    prefixes = tuple(prefixes)
    exclude = tuple(exclude)
    refused: list[Refusal] = []
    wanted: set[str] = set()
    for text in declared:
        try:
            ref = references.parse(text)
        except RefusedReference as exc:
            refused.append(Refusal("config", exc.reference, exc.reason))
            continue
        if not (exclude and references.matches_any_pattern(ref, exclude)):
            wanted.add(str(ref))
    # every node reports mostly the same names: judge each name once
    memo: dict[str, NameVerdict] = {}
    declared_wanted = frozenset(wanted)
    # watched references are held like declared ones, but wanted only if a prefix wants them
    watched = (policy.watch if policy else frozenset()) - declared_wanted
    watched = frozenset(ref for ref in watched if not references.matches_any(references.parse(ref), prefixes))
    per_node = {
        node: holdings(node, images, prefixes, exact=declared_wanted | watched, memo=memo, exclude=exclude)
        for node, images in inventories.items()
    }
    for h in per_node.values():
        refused.extend(h.refused)
        wanted.update(ref for ref in h.references if ref not in watched)

    chosen = set(per_node) if targets is None else set(targets) & set(per_node)
    nodes = sorted(chosen)
    missing = {}
    for node in nodes:
        held = per_node[node].references
        missing[node] = sorted(ref for ref in wanted if held_as(held, ref) is NOT_HELD)
    sizes: dict[str, int] = {}
    for h in per_node.values():
        for name, size in h.sizes.items():
            sizes.setdefault(name, size)
    plan = Plan(
        nodes=nodes,
        skipped=dict(sorted((unreachable or {}).items())),
        wanted=sorted(wanted),
        holdings={node: dict(h.references) for node, h in sorted(per_node.items())},
        missing={node: images for node, images in missing.items() if images},
        drift=find_drift(per_node.values()),
        refused=refused,
        facts=dict(facts or {}),
        sizes=sizes,
    )
    policy = policy or Policy(transfer=False)
    for condition in policy.conditions:
        condition(plan)
    plan.routes = routes(plan, policy)
    plan.notes = copy_notes(plan, policy)
    # a node's registry pulls go first: under peers-first, the copies other
    # nodes wait for never queue behind this node's own waiting copies
    for node, images in plan.missing.items():
        copies = {image for image in images if plan.route(node, image).sources[0] == PEERS}
        images.sort(key=copies.__contains__)
    return plan

