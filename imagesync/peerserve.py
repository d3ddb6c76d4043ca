"""An agent serves its node's images to the other agents, read-only, over the OCI
distribution API: ``GET``/``HEAD`` ``/v2/<name>/manifests/<tag or digest>`` and
``/v2/<name>/blobs/<digest>``. A target's containerd pulls from it as from a registry
mirror (:mod:`imagesync.peerpull`): it fetches only the blobs it lacks, and checks every
digest itself, so the bytes go from one node to the other and through nothing else.

What is served comes from containerd itself, through ``ctr content get`` on its socket
(the one the agent already has), not from its content directory: containerd answers
only for content of the agent's namespace, and no file path is ever built from a
request. Only what an image of that namespace references is served: its index, the
manifests of it the node holds, and their config and layers; everything else is a 404
(:class:`Catalogue`). The sizes and media types come from the descriptors that
reference the content, and a blob is streamed a :data:`CHUNK` at a time.

Access: every request must carry ``Authorization: Bearer <token>``, the fleet's token
(:func:`fleet_token`: made once in Redis, read by every agent), compared in constant
time; no write method exists (405). A holder serves at most :data:`MAX_STREAMS` blobs
at once and answers 503 past that; the copies each holder serves are bounded by the
pull side's serving slots (:mod:`imagesync.transfer`).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from . import keys
from .redisvalues import as_text

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger("imagesync")

#: bytes of a blob read from containerd and written to the peer at a time
CHUNK = 256 * 1024
#: blobs one agent streams at once; a request past them is answered 503, and its puller tries the next holder
MAX_STREAMS = 8
#: seconds a catalogue of what may be served is trusted, and, for content it does not name, at most
CATALOGUE_AGE, MISS_AGE = 2.0, 0.25
#: seconds the fleet's token is kept before a request that does not carry it reads it again
TOKEN_AGE = 10.0
#: seconds a ``ctr`` command of the server may take to start answering
CTR_TIMEOUT = 30

INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"/v2/(?P<name>{_COMPONENT}(?:/{_COMPONENT})*)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def fleet_token(redis: Redis) -> str:
    """The token every agent's server asks of its peers: made by the first agent that
    asks (``SET NX``), then the same for all. Whoever can read Redis can already send
    any task to any node, so Redis is where a secret of the fleet belongs."""
    redis.set(keys.PEER_TOKEN, secrets.token_hex(32), nx=True)
    token = redis.get(keys.PEER_TOKEN)
    if token is None:  # removed in between: make it again
        return fleet_token(redis)
    return as_text(token)


@dataclass(frozen=True)
class Item:
    """One piece of content a peer may fetch: its media type and size, from the descriptor naming it."""

    media_type: str
    size: int


class Catalogue:
    """What the node may serve: the images of its namespace (name -> manifest digest) and
    every digest they reference, walked from ``ctr images ls`` through the indexes and
    manifests (which are read once each: content is immutable)."""

    def __init__(self, ctr: list[str]) -> None:
        self.ctr = ctr
        self.lock = threading.Lock()
        self.read_at = 0.0
        self.images: dict[str, str] = {}
        self.items: dict[str, Item] = {}
        self.documents: dict[str, bytes] = {}  # manifests and indexes

    def lookup(self, digest: str) -> Item | None:
        """The item of ``digest`` if an image references it (as the node's images were at
        most :data:`CATALOGUE_AGE` seconds ago: a removed image's content is refused soon after)."""
        self._fresh()
        if digest not in self.items:
            self._fresh(MISS_AGE)  # a node that has just got an image serves it at once
        return self.items.get(digest)

    def resolve(self, reference: str) -> str | None:
        """The manifest digest the node holds ``reference`` (``host/name:tag``) under."""
        self._fresh()
        if reference not in self.images:
            self._fresh(MISS_AGE)
        return self.images.get(reference)

    def document(self, digest: str) -> bytes | None:
        return self.documents.get(digest)

    def _fresh(self, age: float = CATALOGUE_AGE) -> None:
        if time.monotonic() - self.read_at > age:
            self.refresh(age)

    def refresh(self, age: float = 0.0) -> None:
        with self.lock:
            if time.monotonic() - self.read_at <= age:
                return  # another request read it while this one waited
            listing = subprocess.run([*self.ctr, "images", "ls"], capture_output=True, text=True,
                                     timeout=CTR_TIMEOUT)
            images: dict[str, str] = {}
            items: dict[str, Item] = {}
            for line in listing.stdout.splitlines()[1:]:
                fields = line.split()
                if len(fields) < 3 or not _DIGEST.fullmatch(fields[2]):
                    continue
                images[fields[0]] = fields[2]
                self._walk(fields[2], fields[1], items)
            self.images, self.items, self.read_at = images, items, time.monotonic()

    def _walk(self, digest: str, media_type: str, items: dict[str, Item]) -> None:
        if digest in items:
            return
        data = self.documents.get(digest)
        if data is None:
            got = subprocess.run([*self.ctr, "content", "get", digest], capture_output=True, timeout=CTR_TIMEOUT)
            if got.returncode != 0:
                return  # another platform's manifest, which the node does not keep
            data = self.documents[digest] = got.stdout
        try:
            document = json.loads(data)
        except ValueError:
            return
        media_type = document.get("mediaType") or media_type
        items[digest] = Item(media_type, len(data))
        if media_type in INDEX_TYPES:
            for child in document.get("manifests") or []:
                if _DIGEST.fullmatch(str(child.get("digest"))):
                    self._walk(child["digest"], str(child.get("mediaType", "")), items)
        elif media_type in MANIFEST_TYPES:
            for blob in [document.get("config") or {}, *(document.get("layers") or [])]:
                if _DIGEST.fullmatch(str(blob.get("digest"))):
                    items.setdefault(blob["digest"], Item(str(blob.get("mediaType", "application/octet-stream")),
                                                          int(blob.get("size", 0))))


class PeerServer(ThreadingHTTPServer):
    """The agent's server: one thread per connection, daemon threads."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], ctr: list[str], read_token: Callable[[], str]) -> None:
        super().__init__(address, PeerHandler)
        self.ctr, self.read_token = ctr, read_token
        self._token, self._token_read = "", 0.0
        self.catalogue = Catalogue(ctr)
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        #: response bytes of blobs and manifests sent, for the benchmarks and tests (a log line says it too)
        self.sent = 0
        self.sent_lock = threading.Lock()

    def token(self, again: bool = False) -> str:
        """The fleet's token, read from Redis once it answers ("" until then: every request is
        refused); ``again`` reads it anew, at most every :data:`TOKEN_AGE` seconds (a token
        changed in Redis, ``imagesync:peer-token`` deleted to make a new one)."""
        if not self._token or (again and time.monotonic() - self._token_read > TOKEN_AGE):
            try:
                self._token, self._token_read = self.read_token(), time.monotonic()
            except Exception as exc:  # Redis down: refuse for now, read again at the next request
                log.warning("peer server: cannot read the fleet's token from Redis: %s", exc)
        return self._token

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def count(self, size: int) -> None:
        with self.sent_lock:
            self.sent += size


class PeerHandler(BaseHTTPRequestHandler):
    server: PeerServer
    protocol_version = "HTTP/1.1"
    server_version = "imagesync-agent"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("peer %s: %s", self.client_address[0], format % args)

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _refuse_write(self) -> None:
        self.close_connection = True  # its body is never read: the connection cannot carry another request
        self._error(405, "UNSUPPORTED", "this agent serves its node's images read-only: GET and HEAD only",
                    {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _refuse_write

    def _serve(self, body: bool) -> None:
        given = self.headers.get("Authorization", "").encode()
        if not any(token and hmac.compare_digest(given, f"Bearer {token}".encode())
                   for token in (self.server.token(), self.server.token(again=True))):
            self._error(401, "UNAUTHORIZED", "this agent serves its node's images to the fleet's agents only")
            return
        url = urlsplit(self.path)
        if url.path in ("/v2", "/v2/"):
            self._send(200, b"{}", "application/json", body)
            return
        found = _PATH.fullmatch(url.path)
        if found is None:
            self._error(404, "NAME_UNKNOWN", "not a manifest or blob path of the OCI distribution API")
            return
        name, kind, ref = found["name"], found["kind"], found["ref"]
        if kind == "manifests" and not _DIGEST.fullmatch(ref):
            namespace = parse_qs(url.query).get("ns", [""])[0]
            digest = self.server.catalogue.resolve(f"{namespace}/{name}:{ref}") if _TAG.fullmatch(ref) else None
            if digest is None:
                self._error(404, "MANIFEST_UNKNOWN", f"no image {namespace}/{name}:{ref} on this node")
                return
            ref = digest
        item = self.server.catalogue.lookup(ref) if _DIGEST.fullmatch(ref) else None
        if item is None:
            code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
            self._error(404, code, f"{ref[:80]} is not content of an image on this node")
            return
        document = self.server.catalogue.document(ref)
        if kind == "manifests" and document is None:
            self._error(404, "MANIFEST_UNKNOWN", f"{ref} is not a manifest")
            return
        if document is not None:
            self._send(200, document, item.media_type, body, ref)
            return
        self._stream(ref, item, body)

    def _stream(self, digest: str, item: Item, body: bool) -> None:
        if not body:
            self._headers(200, item.media_type, item.size, digest)
            return
        if not self.server.streams.acquire(blocking=False):
            self._error(503, "TOOMANYREQUESTS", f"this agent streams {MAX_STREAMS} blobs at once already")
            return
        try:
            process = subprocess.Popen([*self.server.ctr, "content", "get", digest], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL)
            assert process.stdout is not None
            try:
                chunk = process.stdout.read(CHUNK)
                if not chunk and process.wait() != 0:
                    self._error(404, "BLOB_UNKNOWN", f"{digest} is no longer on this node")
                    return
                self._headers(200, item.media_type, item.size, digest)
                sent = 0
                while chunk:
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    chunk = process.stdout.read(CHUNK)
                self.server.count(sent)
                log.info("served %s to %s: %d bytes", digest, self.client_address[0], sent)
            finally:
                process.kill()
                process.wait()
        except OSError:
            self.close_connection = True  # the peer went away: its pull tries again or hands over
        finally:
            self.server.streams.release()

    def _headers(self, status: int, media_type: str, size: int, digest: str | None = None,
                 extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(size))
        if digest:
            self.send_header("Docker-Content-Digest", digest)
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, status: int, data: bytes, media_type: str, body: bool, digest: str | None = None,
              extra: dict[str, str] | None = None) -> None:
        self._headers(status, media_type, len(data), digest, extra)
        if body:
            self.wfile.write(data)
            self.server.count(len(data))

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        data = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(status, data, "application/json", self.command != "HEAD", extra=extra)


def ctr_argv(address: str | None, namespace: str) -> list[str]:
    """``ctr`` on the node's containerd socket, in the agent's namespace."""
    argv = ["ctr"]
    if address:
        argv += ["--address", address.removeprefix("unix://")]
    return [*argv, "--namespace", namespace]


def start(address: str, port: int, ctr: list[str], read_token: Callable[[], str]) -> PeerServer:
    """Listen on ``address:port`` (0: a free port) and serve in a daemon thread."""
    server = PeerServer((address, port), ctr, read_token)
    thread = threading.Thread(target=server.serve_forever, name="peer server", daemon=True)
    thread.start()
    log.info("serving this node's images to peers on %s:%d (%s)", address, server.port, shlex.join(ctr))
    return server
