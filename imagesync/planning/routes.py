"""Where each pull of a plan comes from: the sources in order (the registry, the
backup registry, nodes that hold the image), and what each needs. The pull path
(:mod:`imagesync.pulls`) follows the route. Pure functions, no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from .plan import BACKUP, PEERS, REGISTRY, Plan, Policy, Route


def routes(plan: Plan, policy: Policy) -> dict[tuple[str, str], Route]:
    """Where each pull of ``plan`` comes from, under ``policy``.

    The registry comes first, then the backup, then the nodes that hold the
    image. Under ``peers-first`` the holders come first; an image no node of a
    platform holds yet is pulled from the registry by one node of that platform
    (its *seed*; seeds are spread over the nodes), and the others of that
    platform copy it from whoever holds it: a node keeps only its own
    platform's layers, so a seed of another platform has nothing to give.

    A moved tag (:attr:`Plan.moved`) names the digest the node holds it under and
    the one its registry names now; its holders are those of the new digest.
    """
    chosen: dict[tuple[str, str], Route] = {}
    load: Counter[str] = Counter()  # images each node seeds
    for image, lacking in _by_image(plan.missing).items():
        # (platform, agent node) -> the node that fetches the image for the others of it
        seeds: dict[tuple[str | None, bool], str] = {}
        for node in lacking:
            facts = plan.facts.get(node)
            platform = facts.platform if facts else None
            can_copy = policy.transfer and facts is not None and facts.can_copy
            # agent nodes copy from agent nodes (their agents' servers), SSH nodes from SSH nodes
            family = (platform, bool(facts and facts.via_agent))
            # a moved tag comes from the holders of the digest its registry names now
            held, now = plan.moved.get((node, image), (None, None))
            peers, digest = plan.holders(image, platform, now, family[1]) if can_copy else ([], now)
            sources = [REGISTRY] + ([BACKUP] if policy.backup else [])
            waits_for = None
            if can_copy and policy.source == "peers-first":
                if not peers and family not in seeds:
                    # nobody of its platform (and kind) holds it: the least loaded such node fetches it for the others
                    seed = min((n for n in lacking if _can_copy(plan, policy, n) and _family(plan, n) == family),
                               key=lambda n: (load[n], n))
                    seeds[family] = seed
                    load[seed] += 1
                if peers or node != seeds[family]:
                    sources.insert(0, PEERS)
                    waits_for = None if peers else seeds[family]
                else:
                    sources.append(PEERS)
            elif peers:
                sources.append(PEERS)
            if policy.backup and not peers and waits_for is None and now is None:
                # a restore must arrive under the digest the cluster runs, whoever holds it
                digest = plan.digest_held(image, platform)
            route = Route(tuple(sources), tuple(peers), digest, waits_for, platform if can_copy else None,
                          plan.pull_as.get((node, image)), pin=image in policy.pinned and bool(facts and facts.can_pin),
                          replaces=held, mirror=can_copy and family[1])
            if route.sources != (REGISTRY,) or route.pull_as or route.pin or route.replaces:
                chosen[(node, image)] = route
    return chosen


def copy_notes(plan: Plan, policy: Policy) -> list[str]:
    """Why some reachable nodes take no part in node-to-node copies, one line per reason."""
    if not policy.transfer:
        return []
    no_ctr = [node for node, facts in sorted(plan.facts.items()) if not facts.ctr]
    agents = [node for node, facts in sorted(plan.facts.items()) if facts.ctr and facts.via_agent and not facts.serves]
    notes = []
    if no_ctr:
        notes.append(f"no node-to-node copies to or from {', '.join(no_ctr)}: ctr is not on "
                     f"{'it' if len(no_ctr) == 1 else 'them'} (install containerd's ctr, or set transfer = false)")
    if agents:
        notes.append(f"no node-to-node copies to or from {', '.join(agents)}: their agents serve no copies "
                     "(set agent_peer_port)")
    return notes


def _can_copy(plan: Plan, policy: Policy, node: str) -> bool:
    facts = plan.facts.get(node)
    return policy.transfer and facts is not None and facts.can_copy


def _family(plan: Plan, node: str) -> tuple[str | None, bool]:
    """The nodes a node can copy from: those of its platform, reached the same way (agent or not)."""
    facts = plan.facts.get(node)
    return (facts.platform, facts.via_agent) if facts else (None, False)


def _by_image(missing: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """image -> the nodes that lack it, in name order; images in name order."""
    by_image: dict[str, list[str]] = {}
    for node in sorted(missing):
        for image in missing[node]:
            by_image.setdefault(image, []).append(node)
    return dict(sorted(by_image.items()))

