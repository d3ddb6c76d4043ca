"""A small HTTP client of container registries (the distribution API): which digest a
tag names now, and which platforms a manifest has. The planner's platform check
(:mod:`imagesync.planning.platforms`) and its check for moved tags
(:mod:`imagesync.planning.refresh`, one ``HEAD`` per tag) ask it, on the control
host, before anything is pulled.

Lookups run in parallel, each request bounded by :data:`REQUEST_TIMEOUT` and
all of them by :data:`LOOKUP_BUDGET`, so a registry that does not answer costs
one run a few seconds and no answer, never the run.

Registries are asked over HTTPS; one on a loopback address (``localhost``,
``127.0.0.0/8``, ``::1``) is asked over plain HTTP when HTTPS fails, as
containerd itself does for such hosts. Logins are those of ``settings.registries``.

A login, or the token it buys, goes only to the host it belongs to:

* a redirect to another host, or from HTTPS to plain HTTP, carries none (registries
  on object storage redirect blob downloads to the storage host);
* a token realm on another host gets the login only over HTTPS;
* a plain-HTTP token realm is accepted only for a loopback registry or one declared
  insecure (``backup.insecure_sources``); any other registry's lookup fails, and the
  image is pulled as usual.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, TypeVar

from . import references
from .errors import RefusedReference

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("imagesync")
T = TypeVar("T")

#: seconds one registry request may take
REQUEST_TIMEOUT = 5.0
#: seconds all of one plan's registry lookups may take together
LOOKUP_BUDGET = 10.0
#: registry lookups at once
LOOKUP_WORKERS = 8

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")


class LookupFailed(Exception):
    """The registry did not say which platforms an image has."""


def _same_host(url: str, other: str) -> bool:
    """Whether ``other`` is on the host (name and port) of ``url``, and not plain HTTP where ``url`` is HTTPS."""
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(other)
    ports = {"https": 443, "http": 80}
    return ((a.hostname or "").lower(), a.port or ports.get(a.scheme)) == (
        (b.hostname or "").lower(), b.port or ports.get(b.scheme)) and not (a.scheme == "https" and b.scheme != "https")


class _KeepCredentialsOnTheirHost(urllib.request.HTTPRedirectHandler):
    """urllib copies every header onto a redirected request, ``Authorization`` included:
    here a redirect to another host, or from HTTPS to plain HTTP, leaves it behind."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        redirected = super().redirect_request(req, fp, code, msg, headers, newurl)
        if redirected is not None and not _same_host(req.full_url, redirected.full_url):
            redirected.remove_header("Authorization")
        return redirected


_OPENER = urllib.request.build_opener(_KeepCredentialsOnTheirHost)


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


#: domain -> the scheme it answered in: asked first from then on, by every client of this
#: process (a loopback registry in plain HTTP would otherwise cost each plan's first
#: requests a refused TLS handshake first)
_ANSWERED: dict[str, str] = {}


class RegistryClient:
    """Reads manifests from registries with the logins of ``settings.registries``."""

    def __init__(self, settings: Settings, timeout: float = REQUEST_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout
        self._tokens: dict[str, str] = {}

    def _schemes(self, domain: str) -> tuple[str, ...]:
        schemes = ("https", "http") if _is_loopback(domain) else ("https",)
        first = _ANSWERED.get(domain)
        return (first, *(scheme for scheme in schemes if scheme != first)) if first in schemes else schemes

    def _api_host(self, domain: str) -> str:
        return "registry-1.docker.io" if domain == "docker.io" else domain

    def get(self, domain: str, path: str, accept: Iterable[str], method: str = "GET") -> tuple[str, bytes]:
        """(content type, body) of ``GET /v2/<path>`` on ``domain``; of a ``HEAD``, the body is
        the ``Docker-Content-Digest`` header's value."""
        errors = []
        for scheme in self._schemes(domain):
            url = f"{scheme}://{self._api_host(domain)}/v2/{path}"
            try:
                answer = self._get(url, domain, accept, method)
                _ANSWERED[domain] = scheme
                return answer
            except OSError as exc:  # refused, TLS to a plain-HTTP port, timed out: try the next scheme
                errors.append(f"{scheme}: {getattr(exc, 'reason', exc)}")
        raise LookupFailed(f"{domain} did not answer ({'; '.join(errors)})")

    def _get(self, url: str, domain: str, accept: Iterable[str], method: str = "GET") -> tuple[str, bytes]:
        headers = {"Accept": ", ".join(accept)}
        login = self.settings.login_for(domain)
        if domain in self._tokens:
            headers["Authorization"] = self._tokens[domain]
        elif login:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
        try:
            return self._open(url, headers, method)
        except urllib.error.HTTPError as exc:
            challenge = exc.headers.get("WWW-Authenticate", "") if exc.code == 401 else ""
            if not challenge.lower().startswith("bearer"):
                raise LookupFailed(f"{url}: HTTP {exc.code}") from None
        self._tokens[domain] = "Bearer " + self._token(challenge, login, url, domain)
        headers["Authorization"] = self._tokens[domain]
        try:
            return self._open(url, headers, method)
        except urllib.error.HTTPError as exc:
            raise LookupFailed(f"{url}: HTTP {exc.code}") from None

    def _open(self, url: str, headers: dict[str, str], method: str = "GET") -> tuple[str, bytes]:
        request = urllib.request.Request(url, headers=headers, method=method)
        with _OPENER.open(request, timeout=self.timeout) as response:
            kind = response.headers.get("Content-Type", "")
            if method == "HEAD":
                return kind, response.headers.get("Docker-Content-Digest", "").encode()
            return kind, response.read(4 * 1024 * 1024)

    def _insecure(self, domain: str) -> bool:
        """Whether ``domain`` may be spoken to in plain HTTP: a loopback registry, or one declared insecure."""
        declared = self.settings.backup.insecure_sources if self.settings.backup else []
        return _is_loopback(domain) or domain in declared

    def _token(self, challenge: str, login: tuple[str, str] | None, url: str, domain: str) -> str:
        """A bearer token from the realm a ``WWW-Authenticate: Bearer`` challenge to ``url`` names.

        The login goes with it only to the registry's own host, or to another over HTTPS."""
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = fields.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise LookupFailed(f"the registry's token realm {realm!r} is not a URL")
        if realm.startswith("http://") and not self._insecure(domain):
            raise LookupFailed(f"{domain} names a plain-HTTP token realm ({realm}): no login is sent there; "
                               "the registry should name an https:// realm, or be listed in backup.insecure_sources")
        query = "&".join(f"{k}={urllib.parse.quote(v)}" for k, v in fields.items())
        headers = {}
        if login and (realm.startswith("https://") or _same_host(url, realm)):
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

    def current_digest(self, image: str) -> str:
        """The manifest digest ``image`` (a tag) names in its registry now, from one ``HEAD``:
        the ``Docker-Content-Digest`` the registry answers, for the manifest types a runtime
        accepts. A registry that names none is asked for the manifest itself (:meth:`digest_of`)."""
        ref = references.parse(image)
        if ref.digest:
            return ref.digest
        repo = ref.repository.split("/", 1)[1] if "/" in ref.repository else ref.repository
        _, named = self.get(ref.domain, f"{repo}/manifests/{ref.tag or 'latest'}", INDEX_TYPES + MANIFEST_TYPES,
                            method="HEAD")
        digest = named.decode("ascii", "replace").strip()
        if not digest:
            return self.digest_of(image)
        try:
            return references.parse_digest(digest)
        except RefusedReference:
            raise LookupFailed(f"{image}: the registry names no valid digest ({digest[:80]!r})") from None

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


def current_all(client: RegistryClient, images: Iterable[str], budget: float = LOOKUP_BUDGET) -> dict[str, str]:
    """image -> the digest its tag names in its registry now, one ``HEAD`` each, in parallel
    (as :func:`look_up`): what does not answer within ``budget`` seconds is left out."""
    calls = {image: (image, lambda image=image: client.current_digest(image)) for image in images}
    return _ask_all(calls, budget, "digest")


def _ask_all(calls: Mapping[str, tuple[str, Callable[[], T]]], budget: float, what: str) -> dict[str, T]:
    """key -> answer, for ``calls`` (key -> (image it is about, call)), run in parallel within ``budget`` s.

    A call that fails or does not answer in time is left out, with a log line.
    """
    if not calls:
        return {}
    found: dict[str, T] = {}
    pool = ThreadPoolExecutor(max_workers=min(LOOKUP_WORKERS, len(calls)), thread_name_prefix="registry")
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

