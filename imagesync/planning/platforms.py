"""Which platforms an image has, and the planner's conditions that follow from it.

A node whose platform an image has no manifest for cannot pull it: the pull
fails with "no match for platform", run after run. Such a (node, image) is
*not applicable* (``n/a``): not pulled, not missing, not a failure.

A node of the platform of a node that holds the image (under the digest judged)
needs no verdict: that holder pulled the image for that platform, so nothing is
asked about it. (A holder that pulled another platform's image with ``ctr pull
--platform`` vouches wrongly: the pull then finds nothing, reports ``not
applicable``, and the verdict it leaves applies from the next plan.)

What an image has is learned once per manifest digest and kept in Redis
(:func:`imagesync.keys.platforms`), from two places:

* the registry, on the control host, before anything is pulled
  (:mod:`imagesync.registry`): the image's index (its platforms), or a single
  manifest (its config's os/architecture). A registry that does not answer
  costs one run a few seconds and no verdict, never the run;
* a pull that failed with "no match for platform" (:func:`record_failed_pull`),
  which names the digest it judged.

The digest judged is the one the nodes that hold the image hold. A tag that
this would keep off a node is asked of its registry again (one small request
per plan): pushed again with the node's platform, it names a new digest, which
is judged instead, even while its holders keep the old one. For an image no
node holds (a declared one), it is the digest its tag names in its registry
now, one small request per plan; if the registry does not answer, the image is
pulled, and a pull that finds nothing for the node's platform reports ``not
applicable`` and leaves the verdict for the next plan.

Per-architecture entries of ``images`` (``arch.amd64 = ...``) are planned by
:func:`per_architecture`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from .. import keys, references
from ..errors import RefusedReference
from ..facts import platform_of
from ..registry import LOOKUP_BUDGET, LOOKUP_WORKERS, RegistryClient, look_up, resolve_all
from .plan import NOT_FOR_NODE, SKIPPED, Drift, Plan, Refusal, most_held

if TYPE_CHECKING:
    from redis import Redis

    from ..config import Settings

log = logging.getLogger("imagesync")

#: seconds a verdict is kept: a digest never changes, but an image nobody holds any more need not be remembered
VERDICT_TTL = 90 * 24 * 3600

#: the digest containerd names in "no match for platform in manifest sha256:...: not found"
_FAILED_DIGEST = re.compile(r"no match for platform in manifest (sha256:[0-9a-f]{64})", re.IGNORECASE)


# -- platforms ---------------------------------------------------------------------------


def normalize(platform: str) -> tuple[str, str, str]:
    """(os, architecture, variant), with containerd's defaults (arm64 is arm64/v8)."""
    parts = (platform.strip().lower().split("/") + ["", ""])[:3]
    os_, arch, variant = parts
    if arch in ("aarch64", "arm64"):
        arch, variant = "arm64", variant or "v8"
    if arch in ("x86_64", "x86-64"):
        arch = "amd64"
    return os_, arch, variant


def matches(node: str, image: str) -> bool:
    """Whether a manifest for ``image`` (``os/arch[/variant]``) runs on a ``node`` platform.

    A manifest without a variant matches any variant of its architecture, as
    containerd's default matcher does for the common cases.
    """
    n_os, n_arch, n_variant = normalize(node)
    i_os, i_arch, i_variant = normalize(image)
    return n_os == i_os and n_arch == i_arch and (not i_variant or i_variant == n_variant)


# -- verdicts in Redis -------------------------------------------------------------------


class Verdicts:
    """What is known of each digest's platforms: ``has`` (from the registry), ``not:<platform>`` (from a pull)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def read(self, digests: Iterable[str]) -> dict[str, dict[str, str]]:
        digests = list(dict.fromkeys(digests))
        with self.redis.pipeline(transaction=False) as pipe:
            for digest in digests:
                pipe.hgetall(keys.platforms(digest))
            answers = pipe.execute()
        return {digest: {k.decode(): v.decode() for k, v in answer.items()}
                for digest, answer in zip(digests, answers, strict=True) if answer}

    def learned(self, digest: str, platforms: list[str]) -> None:
        """The registry says ``digest`` has these platforms."""
        key = keys.platforms(digest)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, "has", json.dumps(sorted(platforms)))
            pipe.expire(key, VERDICT_TTL)
            pipe.execute()

    def failed(self, digest: str, platform: str) -> None:
        """A pull of ``digest`` found nothing for ``platform``."""
        key = keys.platforms(digest)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, f"not:{platform}", "pull")
            pipe.expire(key, VERDICT_TTL)
            pipe.execute()


def judge(verdict: Mapping[str, str] | None, platform: str) -> str | None:
    """Why an image with ``verdict`` is not applicable on ``platform``; None if it is, or if unknown."""
    if not verdict:
        return None
    if "has" in verdict:
        has = json.loads(verdict["has"])
        if has and not any(matches(platform, p) for p in has):
            return f"no manifest for {platform}: the image has {', '.join(has)}"
        if has:
            return None
    if f"not:{platform}" in verdict:
        return f"no manifest for {platform} (a pull found none)"
    return None


def record_failed_pull(redis: Redis | None, reason: str, platform: str | None) -> bool:
    """Keep the verdict of a pull that failed with "no match for platform"; whether one was kept."""
    found = _FAILED_DIGEST.search(reason)
    if redis is None or found is None or not platform:
        return False
    Verdicts(redis).failed(found.group(1), platform)
    return True


def node_platform(node_platform_setting: str | None, machine: str | None) -> str | None:
    """The platform a pull's verdict is kept under: the node's setting, else what ``uname -m`` says."""
    return node_platform_setting or platform_of(machine)


# -- the planner's conditions ------------------------------------------------------------


def platform_condition(settings: Settings, redis: Redis | None, client: RegistryClient | None = None,
                       defer: bool = False) -> PlatformCheck:
    """The condition that keeps off each node the images that have nothing for its platform."""
    return PlatformCheck(settings, redis, client, defer)


class PlatformCheck:
    """The platform condition (see the module's docstring), asking a registry only what no node vouches for.

    A node of the platform of a node that holds the image, under the digest judged, needs no
    verdict: that holder pulled the image for that platform. What Redis knows of a digest is
    applied as before; a tag it would keep off a node is asked again (pushed again since?).
    The other pairs wait for the registry's answer: at once (:meth:`settle` from the
    condition), or, made with ``defer``, they stay planned in :attr:`awaiting` and the run
    calls :meth:`settle` after sending the pulls that need no answer.
    """

    def __init__(self, settings: Settings, redis: Redis | None, client: RegistryClient | None = None,
                 defer: bool = False) -> None:
        self.settings = settings
        self.redis = redis
        self.client = client
        self.defer = defer
        #: (node, image) -> the node's platform: the pairs that wait for a registry's answer
        self.awaiting: dict[tuple[str, str], str] = {}
        #: image -> the digest its holders hold (most of them)
        self._held: dict[str, str] = {}

    def __call__(self, plan: Plan) -> None:
        self.awaiting, self._held = {}, {}
        if self.redis is None:
            return  # nothing learned to go by: the pulls find out, and say n/a
        # a per-architecture entry's ref is a different image on each architecture
        per_arch = self.settings.per_architecture()
        pairs = [(node, image) for node, images in plan.missing.items() for image in images
                 if plan.facts.get(node) is not None and plan.facts[node].platform
                 and image not in per_arch and (node, image) not in plan.pull_as]
        vouching: dict[str, set[tuple[str, str, str]]] = {}  # image -> the platforms of its holders
        for image in {image for _, image in pairs}:
            by_digest = plan.by_digest(image)
            digest = most_held(by_digest)
            if digest:
                self._held[image] = digest
                vouching[image] = {normalize(plan.facts[n].platform or "") for n in by_digest[digest]
                                   if plan.facts.get(n) is not None and plan.facts[n].platform}
        known = Verdicts(self.redis).read(self._held.values())
        for node, image in pairs:
            platform = plan.facts[node].platform or ""
            verdict = known.get(self._held.get(image, ""))
            reason = judge(verdict, platform)
            if reason and "@" in image:
                plan.exclude(node, image, NOT_FOR_NODE, reason)  # a digest names the same image forever
            elif reason or image not in self._held or (
                    "has" not in (verdict or {}) and normalize(platform) not in vouching[image]):
                self.awaiting[(node, image)] = platform
        if not self.defer:
            for (node, image), why in self.settle().items():
                plan.exclude(node, image, NOT_FOR_NODE, why)

    def settle(self, pairs: Collection[tuple[str, str]] | None = None, began: float | None = None
               ) -> dict[tuple[str, str], str]:
        """Ask the registries about the awaiting pairs (of ``pairs``: those the plan still has), within
        one :data:`LOOKUP_BUDGET` from ``began`` (now by default: a run that settles its pairs in
        batches shares one budget); the pairs to keep off their node, with why. A pair the
        registry could not judge, or that the budget leaves unasked, is pulled."""
        awaiting = {pair: platform for pair, platform in self.awaiting.items() if pairs is None or pair in pairs}
        self.awaiting = {pair: platform for pair, platform in self.awaiting.items() if pair not in awaiting}
        # one budget for every round of questions: a registry that hangs costs the plan LOOKUP_BUDGET at most
        began = time.monotonic() if began is None else began
        if not awaiting or self.redis is None or time.monotonic() - began >= LOOKUP_BUDGET:
            return {}
        images = {image for _, image in awaiting}
        digests = {image: digest for image, digest in self._held.items() if image in images}
        # an image no node holds (a declared one): the digest its tag names now, so
        # that a verdict learned from its registry or a failed pull applies to it too
        unheld = sorted(images - set(digests))
        registry = self.client or RegistryClient(self.settings)
        digests.update(resolve_all(registry, unheld, _left(began)))
        verdicts = Verdicts(self.redis)
        known = _known(verdicts, registry, digests, began)
        # a held tag that would be kept off a node may have been pushed again since, with that
        # node's platform, while its holders keep the old digest: the digest its tag names now is
        # judged instead (one small request per such tag)
        doubted = sorted({image for (_, image), platform in awaiting.items() if image in self._held
                          and "@" not in image and judge(known.get(digests[image]), platform)})
        now = resolve_all(registry, doubted, _left(began)) if doubted else {}
        pushed = {image: digest for image, digest in now.items() if digest != digests[image]}
        if pushed:
            digests.update(pushed)
            known.update(_known(verdicts, registry, pushed, began))
        kept_off = {}
        for (node, image), platform in awaiting.items():
            digest = digests.get(image)
            reason = judge(known.get(digest), platform) if digest else None
            if reason:
                kept_off[(node, image)] = reason
        return kept_off


def batches(pairs: Collection[tuple[str, str]]) -> list[set[tuple[str, str]]]:
    """``pairs`` in batches of :data:`LOOKUP_WORKERS` images (every pair of an image in one batch):
    what the registries answer at once, so that a run sends each batch's pulls as it is judged."""
    by_image: dict[str, set[tuple[str, str]]] = {}
    for node, image in sorted(pairs, key=lambda pair: (pair[1], pair[0])):
        by_image.setdefault(image, set()).add((node, image))
    groups = list(by_image.values())
    return [set().union(*groups[i:i + LOOKUP_WORKERS]) for i in range(0, len(groups), LOOKUP_WORKERS)]


def _left(began: float) -> float:
    """Seconds left of the plan's registry budget (one at least, so that a question is asked)."""
    return max(1.0, LOOKUP_BUDGET - (time.monotonic() - began))


def _known(verdicts: Verdicts, registry: RegistryClient, digests: Mapping[str, str], began: float
           ) -> dict[str, dict[str, str]]:
    """The verdicts on ``digests`` (image -> digest): those kept in Redis, and what the registry
    says of the others within what is left of the budget (kept for the next plans)."""
    if not digests:
        return {}
    known = verdicts.read(digests.values())
    unknown = {d: image for image, d in digests.items() if "has" not in known.get(d, {})}
    for digest, platforms in look_up(registry, unknown, _left(began)).items():
        verdicts.learned(digest, platforms)
        known.setdefault(digest, {})["has"] = json.dumps(sorted(platforms))
    if unknown:
        log.info("platforms of %d images asked of their registries in %.2f s", len(unknown), time.monotonic() - began)
    return known


def per_architecture(entries: Mapping[str, Mapping[str, str]]):
    """The condition for the per-architecture entries of ``images`` (``ref`` -> arch -> reference).

    A node lacking ``ref`` pulls its architecture's reference instead
    (:attr:`Plan.pull_as`); a node that holds that reference holds the entry,
    whether or not its runtime could also name it ``ref``; a node whose
    architecture has no reference is not applicable. Nodes of different
    architectures hold ``ref`` under different digests: that is not drift.
    """

    def condition(plan: Plan) -> None:
        for image, by_arch in entries.items():
            if image not in plan.wanted:
                continue
            for node in plan.nodes:
                facts = plan.facts.get(node)
                arch = facts.arch if facts else None
                if arch is None:
                    continue  # platform unknown: the entry's own name is pulled, and check says why
                lacks = image in plan.missing.get(node, [])
                if arch not in by_arch:
                    if lacks:
                        plan.exclude(node, image, NOT_FOR_NODE,
                                     f"no reference for {arch}: the entry has {', '.join(sorted(by_arch))}")
                    continue
                try:
                    target = references.normalize(by_arch[arch])
                except RefusedReference as exc:
                    plan.refused.append(Refusal("config", exc.reference, exc.reason))
                    if lacks:
                        plan.exclude(node, image, SKIPPED, f"arch.{arch} is refused: {exc.reason}")
                    continue
                if not lacks or target == image:
                    continue
                held, digest = plan.held(node, target)
                if held:  # held under its architecture's name: the entry is there
                    plan.holdings[node][image] = digest
                    plan.missing[node].remove(image)
                    if not plan.missing[node]:
                        del plan.missing[node]
                else:
                    plan.pull_as[(node, image)] = target
        plan.drift = [drift for drift in plan.drift
                      if drift.reference not in entries or _drifts_within_an_arch(plan, drift)]

    return condition


def _drifts_within_an_arch(plan: Plan, drift: Drift) -> bool:
    """Whether two nodes of the same architecture hold ``drift``'s tag under different digests."""
    by_arch: dict[str | None, set[str]] = {}
    for node, digest in drift.digests.items():
        facts = plan.facts.get(node)
        by_arch.setdefault(facts.arch if facts else None, set()).add(digest)
    return any(len(digests) > 1 for digests in by_arch.values())


def arch_references(entries: Mapping[str, Mapping[str, str]]) -> frozenset[str]:
    """The per-architecture references of ``entries``, normalized: the plan must see who holds them."""
    found = set()
    for by_arch in entries.values():
        for text in by_arch.values():
            try:
                found.add(references.normalize(text))
            except RefusedReference:
                continue
    return frozenset(found)
