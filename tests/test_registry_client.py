"""The registry client's logins stay on their host: a real docker-registry that demands a
login, behind a small front on 127.0.0.1 that redirects blob downloads to a "storage"
host (127.0.0.2, as object storage behind a registry does) and, in one test, wants a
bearer token from a realm on that other host. The storage host records every header
it is sent.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import threading

import pytest

from imagesync.config import Node, Settings
from imagesync.registry import LookupFailed, RegistryClient
from testcluster.registry import Registry

pytestmark = pytest.mark.cluster

LOGIN = ("robot", "s3cret pw")
BASIC = "Basic " + base64.b64encode(":".join(LOGIN).encode()).decode()
TOKEN = "T0K"


def _ask(registry: Registry, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=30)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


class _Server(http.server.ThreadingHTTPServer):
    """A server that records (path, Authorization) of every request it gets."""

    daemon_threads = True

    def __init__(self, host: str, handler: type, registry: Registry) -> None:
        super().__init__((host, 0), handler)
        self.registry = registry
        self.seen: list[tuple[str, str]] = []
        #: the front: where blobs are redirected to, and whether it wants a bearer token from there
        self.storage: str = ""
        self.bearer = False
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.server_address[0]}:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Front(_Handler):
    """The registry's public host: manifests come from the real registry, blobs from storage."""

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        self.server.seen.append((self.path, auth))
        if self.server.bearer:
            if auth != f"Bearer {TOKEN}":
                realm = f"http://{self.server.storage}/token"
                return self._send(401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}",service="reg"'})
            auth = BASIC  # the token is good: the front speaks to its registry with its own login
        if "/blobs/" in self.path:
            return self._send(307, b"", {"Location": f"http://{self.server.storage}/blob{self.path}"})
        status, headers, body = _ask(self.server.registry, "GET", self.path,
                                     {"Authorization": auth, "Accept": self.headers.get("Accept", "")})
        kept = {k: v for k, v in headers.items() if k.lower() in ("content-type", "www-authenticate")}
        self._send(status, body, kept)


class _Storage(_Handler):
    """Another host: the blob store the front redirects to, and the token realm."""

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Authorization", "")))
        if self.path.startswith("/token"):
            return self._send(200, json.dumps({"token": TOKEN}).encode())
        status, _, body = _ask(self.server.registry, "GET", self.path.removeprefix("/blob"), {"Authorization": BASIC})
        self._send(status, body, {"Content-Type": "application/octet-stream"})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with Registry(tmp_path_factory.mktemp("registry"), login=LOGIN) as registry:
        registry.digest = registry.push_image("team/app", "1")
        yield registry


@pytest.fixture
def hosts(registry):
    front = _Server("127.0.0.1", _Front, registry)
    storage = _Server("127.0.0.2", _Storage, registry)
    front.storage = storage.address
    try:
        yield front, storage
    finally:
        front.shutdown()
        storage.shutdown()


def _client(front: _Server, **settings) -> RegistryClient:
    return RegistryClient(Settings(nodes=[Node(name="a")], images=["x"],
                                   registries={front.address: {"username": LOGIN[0], "password": LOGIN[1]}},
                                   **settings))


def test_a_blob_redirected_to_another_host_is_fetched_without_the_login(hosts, registry):
    front, storage = hosts
    # a single manifest: its platform is in its config blob, which the front redirects to storage
    assert _client(front).platforms(f"{front.address}/team/app:1", registry.digest) == ["linux/amd64"]
    # the registry itself got the login (it demands one), the storage host never did
    assert (f"/v2/team/app/manifests/{registry.digest}", BASIC) in front.seen
    blobs = [(path, auth) for path, auth in storage.seen if path.startswith("/blob/")]
    assert len(blobs) == 1 and blobs[0][1] == "", storage.seen


def test_a_token_realm_on_another_host_over_plain_http_gets_no_login(hosts, registry):
    front, storage = hosts
    front.bearer = True
    assert _client(front).platforms(f"{front.address}/team/app:1", registry.digest) == ["linux/amd64"]
    # the token was asked for without the login (the realm is another host, over HTTP) ...
    assert [(path, auth) for path, auth in storage.seen if path.startswith("/token")] == [
        ("/token?service=reg", "")]
    # ... and the token, good for the registry, did not follow the blob to storage either
    assert (f"/v2/team/app/manifests/{registry.digest}", f"Bearer {TOKEN}") in front.seen
    assert [auth for path, auth in storage.seen if path.startswith("/blob/")] == [""]


def test_a_plain_http_realm_is_refused_for_a_registry_not_on_loopback(hosts):
    front, storage = hosts
    client = _client(front)
    challenge = f'Bearer realm="http://{storage.address}/token",service="reg"'
    with pytest.raises(LookupFailed, match="plain-HTTP token realm"):
        client._token(challenge, LOGIN, "https://registry.example/v2/team/app/manifests/1", "registry.example")
    assert storage.seen == []
    # declared insecure, it is accepted (and the login stays home: the realm is another host)
    insecure = _client(front, backup={"registry": "backup.example/mirror", "insecure_sources": ["registry.example"]})
    assert insecure._token(challenge, LOGIN, "http://registry.example/v2/team/app/manifests/1",
                           "registry.example") == TOKEN
    assert storage.seen == [("/token?service=reg", "")]


def test_a_tags_current_digest_is_one_head_with_the_login_and_follows_a_push(registry):
    from imagesync.registry import current_all

    client = RegistryClient(Settings(nodes=[Node(name="a")], images=["x"],
                                     registries={registry.address: {"username": LOGIN[0], "password": LOGIN[1]}}))
    image = f"{registry.address}/team/moving:latest"
    first = registry.push_image("team/moving", "latest")
    assert client.current_digest(image) == first
    again = registry.push_image("team/moving", "latest", size=4096)
    gone = f"{registry.address}/team/never:1"
    assert current_all(client, [image, gone]) == {image: again}  # a tag the registry lacks is left out
    # a digest reference is its own answer: nothing is asked
    assert client.current_digest(f"{registry.address}/team/moving@{first}") == first
