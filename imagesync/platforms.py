"""Which platforms an image has, and the planner's conditions that follow from it.

A node whose platform an image has no manifest for cannot pull it: the pull
fails with "no match for platform", run after run. Such a (node, image) is
*not applicable* (``n/a``): not pulled, not missing, not a failure.

What an image has is learned once per manifest digest and kept in Redis
(:func:`imagesync.keys.platforms`), from two places:

* the registry, on the control host, before anything is pulled: the image's
  index (its platforms), or a single manifest (its config's os/architecture).
  Lookups run in parallel, each request bounded by :data:`REQUEST_TIMEOUT`
  and all of them by :data:`LOOKUP_BUDGET`, so a registry that does not answer
  costs one run a few seconds and no verdict, never the run;
* a pull that failed with "no match for platform" (:func:`record_failed_pull`),
  which names the digest it judged.

The digest judged is the one the nodes that hold the image hold: a tag whose
index is pushed again with the node's platform has a new digest, and is judged
afresh. For an image no node holds (a declared one), it is the digest its tag
names in its registry now, one small request per plan; if the registry does not
answer, the image is pulled, and a pull that finds nothing for the node's
platform reports ``not applicable`` and leaves the verdict for the next plan.

Registries are asked over HTTPS; one on a loopback address (``localhost``,
``127.0.0.0/8``, ``::1``) is asked over plain HTTP when HTTPS fails, as
containerd itself does for such hosts. Per-architecture entries of ``images``
(``arch.amd64 = ...``) are planned by :func:`per_architecture`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, TypeVar

from . import keys, references
from .errors import RefusedReference
from .facts import platform_of
from .plan import NOT_FOR_NODE, SKIPPED, Drift, Plan, Refusal, most_held

if TYPE_CHECKING:
    from redis import Redis

    from .config import Settings

log = logging.getLogger("imagesync")
T = TypeVar("T")

#: seconds one registry request may take
REQUEST_TIMEOUT = 5.0
#: seconds all of one plan's registry lookups may take together
LOOKUP_BUDGET = 10.0
#: registry lookups at once
LOOKUP_WORKERS = 8
#: seconds a verdict is kept: a digest never changes, but an image nobody holds any more need not be remembered
VERDICT_TTL = 90 * 24 * 3600

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
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


# -- the registry ------------------------------------------------------------------------


class LookupFailed(Exception):
    """The registry did not say which platforms an image has."""


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RegistryClient:
    """Reads manifests from registries with the logins of ``settings.registries``."""

    def __init__(self, settings: Settings, timeout: float = REQUEST_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout
        self._tokens: dict[str, str] = {}

    def _schemes(self, domain: str) -> tuple[str, ...]:
        return ("https", "http") if _is_loopback(domain) else ("https",)

    def _api_host(self, domain: str) -> str:
        return "registry-1.docker.io" if domain == "docker.io" else domain

    def get(self, domain: str, path: str, accept: Iterable[str]) -> tuple[str, bytes]:
        """(content type, body) of ``GET /v2/<path>`` on ``domain``."""
        errors = []
        for scheme in self._schemes(domain):
            url = f"{scheme}://{self._api_host(domain)}/v2/{path}"
            try:
                return self._get(url, domain, accept)
            except OSError as exc:  # refused, TLS to a plain-HTTP port, timed out: try the next scheme
                errors.append(f"{scheme}: {getattr(exc, 'reason', exc)}")
        raise LookupFailed(f"{domain} did not answer ({'; '.join(errors)})")

    def _get(self, url: str, domain: str, accept: Iterable[str]) -> tuple[str, bytes]:
        headers = {"Accept": ", ".join(accept)}
        login = self.settings.login_for(domain)
        if domain in self._tokens:
            headers["Authorization"] = self._tokens[domain]
        elif login:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
        try:
            return self._open(url, headers)
        except urllib.error.HTTPError as exc:
            challenge = exc.headers.get("WWW-Authenticate", "") if exc.code == 401 else ""
            if not challenge.lower().startswith("bearer"):
                raise LookupFailed(f"{url}: HTTP {exc.code}") from None
        self._tokens[domain] = "Bearer " + self._token(challenge, login)
        headers["Authorization"] = self._tokens[domain]
        try:
            return self._open(url, headers)
        except urllib.error.HTTPError as exc:
            raise LookupFailed(f"{url}: HTTP {exc.code}") from None

    def _open(self, url: str, headers: dict[str, str]) -> tuple[str, bytes]:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (https/http only)
            return response.headers.get("Content-Type", ""), response.read(4 * 1024 * 1024)

    def _token(self, challenge: str, login: tuple[str, str] | None) -> str:
        """A bearer token from the realm a ``WWW-Authenticate: Bearer`` challenge names."""
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = fields.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise LookupFailed(f"the registry's token realm {realm!r} is not a URL")
        query = "&".join(f"{k}={urllib.parse.quote(v)}" for k, v in fields.items())
        headers = {}
        if login:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
        try:
            _, body = self._open(f"{realm}?{query}", headers)
        except urllib.error.HTTPError as exc:
            raise LookupFailed(f"token from {realm}: HTTP {exc.code}") from None
        answer = json.loads(body)
        return str(answer.get("token") or answer.get("access_token") or "")

    def digest_of(self, image: str) -> str:
        """The manifest digest ``image`` (a tag) names in its registry now: that of the bytes served."""
        ref = references.parse(image)
        if ref.digest:
            return ref.digest
        repo = ref.repository.split("/", 1)[1] if "/" in ref.repository else ref.repository
        _, body = self.get(ref.domain, f"{repo}/manifests/{ref.tag or 'latest'}", INDEX_TYPES + MANIFEST_TYPES)
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def platforms(self, image: str, digest: str) -> list[str]:
        """The platforms of ``image``'s manifest ``digest``: an index's entries, or a manifest's config."""
        ref = references.parse(image)
        repo = ref.repository.split("/", 1)[1] if "/" in ref.repository else ref.repository
        kind, body = self.get(ref.domain, f"{repo}/manifests/{digest}", INDEX_TYPES + MANIFEST_TYPES)
        try:
            document = json.loads(body)
            kind = document.get("mediaType") or kind.split(";")[0].strip()
            if kind in INDEX_TYPES or "manifests" in document:
                found = []
                for entry in document.get("manifests") or []:
                    p = entry.get("platform") or {}
                    if p.get("os") == "unknown":  # attestations, not images
                        continue
                    found.append("/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x))
                return sorted(set(found))
            config = document["config"]["digest"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LookupFailed(f"{image}@{digest}: not a manifest the registry should serve ({exc})") from None
        _, blob = self.get(ref.domain, f"{repo}/blobs/{config}", ("*/*",))
        try:
            data = json.loads(blob)
            return ["/".join(x for x in (data["os"], data["architecture"], data.get("variant")) if x)]
        except (ValueError, KeyError, TypeError) as exc:
            raise LookupFailed(f"{image}@{digest}: its config names no platform ({exc})") from None


def look_up(client: RegistryClient, wanted: Mapping[str, str], budget: float = LOOKUP_BUDGET
            ) -> dict[str, list[str]]:
    """digest -> its platforms, for ``wanted`` (digest -> an image name it has), asked in parallel.

    What does not answer within ``budget`` seconds is left out: it is asked
    again by the next plan, and meanwhile the image is pulled as usual.
    """
    calls = {digest: (image, lambda image=image, digest=digest: client.platforms(image, digest))
             for digest, image in wanted.items()}
    return _ask_all(calls, budget, "platforms")


def resolve_all(client: RegistryClient, images: Iterable[str], budget: float = LOOKUP_BUDGET) -> dict[str, str]:
    """image -> the digest its tag names in its registry now, asked in parallel (as :func:`look_up`)."""
    calls = {image: (image, lambda image=image: client.digest_of(image)) for image in images}
    return _ask_all(calls, budget, "digest")


def _ask_all(calls: Mapping[str, tuple[str, Callable[[], T]]], budget: float, what: str) -> dict[str, T]:
    """key -> answer, for ``calls`` (key -> (image it is about, call)), run in parallel within ``budget`` s.

    A call that fails or does not answer in time is left out, with a log line.
    """
    if not calls:
        return {}
    found: dict[str, T] = {}
    pool = ThreadPoolExecutor(max_workers=min(LOOKUP_WORKERS, len(calls)), thread_name_prefix="platforms")
    try:
        futures = {pool.submit(call): (key, image) for key, (image, call) in calls.items()}
        done, pending = wait(futures, timeout=budget)
        for future in done:
            key, image = futures[future]
            try:
                found[key] = future.result()
            except (LookupFailed, ValueError) as exc:
                log.warning("%s of %s: %s", what, image, exc)
            except Exception as exc:  # a registry answering nonsense must not stop the plan
                log.warning("%s of %s: %s: %s", what, image, type(exc).__name__, exc)
        for future in pending:
            log.warning("%s of %s: no answer within %g s", what, futures[future][1], budget)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return found


# -- the planner's conditions ------------------------------------------------------------


def held_digest(plan: Plan, image: str) -> str | None:
    """The digest most nodes that hold ``image`` hold it under."""
    by_digest = plan.by_digest(image)
    return most_held(by_digest) if by_digest else None


def platform_condition(settings: Settings, redis: Redis | None, client: RegistryClient | None = None):
    """The condition that keeps off each node the images that have nothing for its platform."""
    per_arch = settings.per_architecture()

    def condition(plan: Plan) -> None:
        if redis is None:
            return  # nothing learned to go by: the pulls find out, and say n/a
        # a per-architecture entry's ref is a different image on each architecture
        pairs = [(node, image) for node, images in plan.missing.items() for image in images
                 if plan.facts.get(node) is not None and plan.facts[node].platform
                 and image not in per_arch and (node, image) not in plan.pull_as]
        digests: dict[str, str] = {}
        unheld = []
        for image in {image for _, image in pairs}:
            digest = held_digest(plan, image)
            if digest:
                digests[image] = digest
            else:
                unheld.append(image)
        # an image no node holds (a declared one): the digest its tag names now, so
        # that a verdict learned from its registry or a failed pull applies to it too
        registry = client or RegistryClient(settings)
        began = time.monotonic()
        digests.update(resolve_all(registry, sorted(unheld)))
        if not digests:
            return
        verdicts = Verdicts(redis)
        known = verdicts.read(digests.values())
        unknown = {d: image for image, d in digests.items() if "has" not in known.get(d, {})}
        # one budget for both rounds of questions: a registry that hangs costs the plan LOOKUP_BUDGET at most
        left = max(1.0, LOOKUP_BUDGET - (time.monotonic() - began))
        for digest, platforms in look_up(registry, unknown, left).items():
            verdicts.learned(digest, platforms)
            known.setdefault(digest, {})["has"] = json.dumps(sorted(platforms))
        if unknown:
            log.info("platforms of %d images asked of their registries in %.2f s", len(unknown),
                     time.monotonic() - began)
        for node, image in pairs:
            digest = digests.get(image)
            if digest is None:
                continue
            reason = judge(known.get(digest), plan.facts[node].platform or "")
            if reason:
                plan.exclude(node, image, NOT_FOR_NODE, reason)

    return condition


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
