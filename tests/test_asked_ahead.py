"""A run asks its registries while its nodes are inventoried (registry.AskedAhead): each
question is sent once, before the plan needs it, and what it learns is kept.

The registry here is a small one on 127.0.0.1 that serves one index per tag and counts
every request; Redis is a real server (the verdicts are kept there).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time

import pytest

from imagesync import keys
from imagesync.config import Node, Settings
from imagesync.planning.platforms import Verdicts, ask_ahead
from imagesync.registry import current_all, look_up, resolve_all
from imagesync.sync import ahead_of_plan

INDEX = "application/vnd.oci.image.index.v1+json"


def _index(arch: str) -> bytes:
    return json.dumps({"mediaType": INDEX, "manifests": [
        {"platform": {"os": "linux", "architecture": arch}}]}).encode()


class _Registry(http.server.ThreadingHTTPServer):
    """Tags of repository ``team/<name>``, each an index of one platform; counts every request."""

    daemon_threads = True

    def __init__(self, tags: dict[str, bytes], name_digests: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tags = tags
        self.by_digest = {"sha256:" + hashlib.sha256(body).hexdigest(): body for body in tags.values()}
        self.name_digests = name_digests
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def asked(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.seen)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Registry

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(send_body=False)

    def do_GET(self):
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        with self.server.lock:
            self.server.seen.append((self.command, self.path))
        parts = self.path.split("/")  # /v2/team/NAME/manifests/REF
        body = None
        if len(parts) == 6 and parts[4] == "manifests":
            reference = parts[5]
            body = self.server.by_digest.get(reference) if reference.startswith("sha256:") \
                else self.server.tags.get(parts[3] + ":" + reference)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", INDEX)
        if self.server.name_digests:
            self.send_header("Docker-Content-Digest", "sha256:" + hashlib.sha256(body).hexdigest())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


@pytest.fixture
def registry():
    server = _Registry({"app:1": _index("amd64"), "tool:2": _index("arm64")})
    yield server
    server.shutdown()


def _settings(host: str, **extra) -> Settings:
    return Settings(nodes=[Node(name="a"), Node(name="b")], images=[f"{host}/team/app:1", f"{host}/team/tool:2"],
                    **extra)


def _until(condition, what: str, within: float = 10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"not within {within} s: {what}")


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("name_digests", [True, False], ids=["head-names-the-digest", "head-names-none"])
def test_questions_asked_ahead_are_sent_once_and_their_verdicts_kept(redis_client, registry, name_digests):
    registry.name_digests = name_digests
    app, tool = f"{registry.host}/team/app:1", f"{registry.host}/team/tool:2"
    app_digest, tool_digest = _digest(registry.tags["app:1"]), _digest(registry.tags["tool:2"])
    client = ask_ahead(_settings(registry.host), redis_client, [app, tool])
    try:
        verdicts = Verdicts(redis_client)
        # both tags' digests and both digests' platforms, without anyone asking for them yet
        _until(lambda: {app_digest, tool_digest} <= set(verdicts.read([app_digest, tool_digest])),
               "the verdicts learned ahead are kept")
        assert json.loads(verdicts.read([tool_digest])[tool_digest]["has"]) == ["linux/arm64"]
        before = registry.asked()
        assert len([path for _, path in before if "/manifests/sha256:" in path]) == 2
        # the plan's questions (moved tags, unheld tags, platforms) are answered from what was asked
        assert current_all(client, [app, tool]) == {app: app_digest, tool: tool_digest}
        assert resolve_all(client, [app, tool]) == {app: app_digest, tool: tool_digest}
        assert look_up(client, {tool_digest: tool}) == {tool_digest: ["linux/arm64"]}
        assert registry.asked() == before
    finally:
        client.close()


def test_a_digest_with_a_verdict_is_not_asked_about_again(redis_client, registry):
    app = f"{registry.host}/team/app:1"
    app_digest = _digest(registry.tags["app:1"])
    Verdicts(redis_client).learned(app_digest, ["linux/amd64"])
    client = ask_ahead(_settings(registry.host), redis_client, [app])
    try:
        assert client.current_digest(app) == app_digest
        client.close(wait=True)
        assert [path for _, path in registry.asked()] == ["/v2/team/app/manifests/1"]
    finally:
        client.close()


def test_what_was_not_asked_ahead_is_asked_when_needed(redis_client, registry):
    client = ask_ahead(_settings(registry.host), redis_client, [])
    try:
        assert client.current_digest(f"{registry.host}/team/tool:2") == _digest(registry.tags["tool:2"])
        assert registry.asked() == [("HEAD", "/v2/team/tool/manifests/2")]
    finally:
        client.close()


def test_a_run_asks_ahead_about_the_declared_tags_and_those_the_nodes_held(redis_client):
    host = "reg.local:5000"
    config = Settings(nodes=[Node(name="a"), Node(name="b")],
                      images=[f"{host}/team/app:1", f"{host}/team/pinned@sha256:{'1' * 64}",
                              {"ref": f"{host}/team/cuda:12", "arch": {"amd64": f"{host}/team/cuda:12-x86"}}])
    redis_client.sadd(keys.node_held("a"), f"{host}/team/app:1", f"{host}/team/old:3")
    redis_client.sadd(keys.node_held("b"), f"{host}/team/found:1")
    # digests never move and a per-architecture entry is a different image per node: neither is asked
    assert ahead_of_plan(config, redis_client, None) == [
        f"{host}/team/app:1", f"{host}/team/found:1", f"{host}/team/old:3"]
    # a run limited to some images asks about those only
    assert ahead_of_plan(config, redis_client, ["reg.local:5000/team/new:1"]) == ["reg.local:5000/team/new:1"]
    # without refresh, only what no node held needs a question ahead (its platforms)
    quiet = config.model_copy(update={"refresh": False})
    assert ahead_of_plan(quiet, redis_client, None) == []
    assert ahead_of_plan(quiet, redis_client, ["reg.local:5000/team/new:1", f"{host}/team/app:1"]) == [
        "reg.local:5000/team/new:1"]
