"""Agent nodes copy images from each other: the target's containerd pulls from the
holder's agent (imagesync.peerserve, imagesync.peerpull), on the real cluster.

One cluster for the module: four nodes, each served by ``imagesync agent`` with
``agent_peer_port = 0`` (each agent's server on a free loopback port, registered
in Redis), no SSH to any of them, ``source = "peers-first"``. The head node is the
control worker and the CLI; the registry is behind the test proxy, which counts
what it serves. Each test pushes images of its own.
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

from imagesync import agents, keys, peerserve
from imagesync.attempt import Attempt
from imagesync.config import load_settings
from imagesync.planning.plan import PEERS, REGISTRY, Route
from imagesync.pulls import get_image
from tests.conftest import Deployment
from tests.helpers import measured, wait_for
from tests.test_agents import alive, pulls_of, start_agent, sync, unique

pytestmark = pytest.mark.cluster

AGENTS = ("node-1", "node-2", "node-3", "node-4")
SERVED = re.compile(r"served (sha256:[0-9a-f]{64}) to \S+: (\d+) bytes")


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    from testcluster.cluster import Cluster

    workdir = tmp_path_factory.mktemp("peers")
    with Cluster(workdir / "cluster", nodes=len(AGENTS)) as cluster:
        for name in AGENTS:
            cluster.node(name).stop_sshd()
        deployment = Deployment(cluster, workdir)
        deployment.configure(nodes=[], agents=True, agent_heartbeat=0.5, agent_lapse=30.0, source="peers-first",
                             agent_peer_port=0, agent_peer_address="127.0.0.1")
        with deployment.services:
            deployment.services.start_control(wait=False)
            for name in AGENTS:
                start_agent(deployment, name, wait=False)
            for name in ["control", *(f"agent-{name}" for name in AGENTS)]:
                deployment.services.wait_ready(name)
            wait_for(lambda: all(peer(deployment, name) for name in AGENTS), 30, "every agent's server registered")
            yield deployment


@pytest.fixture(autouse=True)
def every_agent_serving(d):
    wait_for(lambda: all(alive(d, name) for name in AGENTS), 30, "every agent alive")


def peer(d, name: str) -> str:
    with d.cluster.redis.client() as client:
        return (client.hget(keys.agent(name), "peer") or b"").decode()


def token(d) -> str:
    with d.cluster.redis.client() as client:
        return peerserve.fleet_token(client)


def served(d, name: str) -> dict[str, int]:
    """digest -> bytes the agent of ``name`` has served of that blob, from its log."""
    found: dict[str, int] = {}
    for digest, size in SERVED.findall((d.services.workdir / f"agent-{name}.log").read_text()):
        found[digest] = found.get(digest, 0) + int(size)
    return found


def served_bytes(d) -> dict[str, int]:
    return {name: sum(served(d, name).values()) for name in AGENTS}


def head_node(d):
    """Bytes the head node's imagesync processes (the control worker, its pool) send and receive over TCP."""
    from testcluster.measure import SocketBytes

    return SocketBytes([d.services.processes["control"].pid])


def request(d, holder: str, path: str, method: str = "GET", auth: str | None = "fleet") -> tuple[int, dict, bytes]:
    headers = {} if auth is None else {"Authorization": f"Bearer {token(d) if auth == 'fleet' else auth}"}
    call = urllib.request.Request(f"http://{peer(d, holder)}{path}", method=method, headers=headers,
                                  data=b"x" if method in ("PUT", "POST", "PATCH") else None)
    try:
        with urllib.request.urlopen(call, timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_a_copy_between_agents_passes_through_no_process_of_the_head_node(d):
    size = 12_000_000
    ref = d.cluster.seed({"node-1": [unique("bcm11/direct:1")]}, size=size)["node-1"][0]
    d.cluster.proxy.clear()
    proxied, before = d.cluster.proxy.bytes_sent, served_bytes(d)
    with head_node(d) as through:
        run = sync(d)
    after = served_bytes(d)
    assert run["status"] == "completed", run
    outcomes = {(r["node"], r["image"]): (r["status"], r.get("source")) for r in run["results"] if r["image"] == ref}
    assert sorted(status for status, _ in outcomes.values()) == ["copied"] * 3, outcomes
    assert all(source in AGENTS for _, source in outcomes.values())
    for name in AGENTS:
        assert d.cluster.node(name).images()[ref] == d.cluster.digests[ref]
    by_holders = sum(after.values()) - sum(before.values())
    through_head = through.total
    measured("registry proxy bytes during the run", d.cluster.proxy.bytes_sent - proxied)
    measured("bytes the holders' agents served (3 copies)", by_holders)
    measured("bytes the control worker's processes sent and received over TCP", through_head)
    assert not d.cluster.proxy.layer_gets()  # not one layer from the registry
    assert by_holders >= 3 * size  # every copy came from a holder's agent ...
    assert 0 < through_head < size / 10  # ... and not through the head node (its Redis traffic is what it moves)
    measured("holders the copies came from", sorted(source for _, source in outcomes.values()))


def test_an_update_moves_only_the_layer_the_node_lacks(d):
    repo = unique("bcm11/framework:1").split(":")[0].removeprefix(f"{d.cluster.registry_address}/")
    layer = 2_000_000
    old = d.cluster.push(repo, "1", size=5 * layer, layers=5, layer_seeds=[repo] * 4 + ["old"])
    new = d.cluster.push(repo, "2", size=5 * layer, layers=5, layer_seeds=[repo] * 4 + ["new"])
    for name in AGENTS:
        d.cluster.node(name).pull(old)  # every node runs the old tag
    d.cluster.node("node-1").pull(new)  # one node has the new one
    before = {name: served(d, name) for name in AGENTS}
    d.cluster.proxy.clear()
    run = sync(d)
    assert run["status"] == "completed", run
    assert sorted(pulls_of(run, {new}).values()) == ["copied"] * 3, run["results"]
    moved: dict[str, int] = {}  # digest -> bytes of it served during the run, by every holder
    for name in AGENTS:
        for digest, size in served(d, name).items():
            if size > before[name].get(digest, 0):
                moved[digest] = moved.get(digest, 0) + size - before[name].get(digest, 0)
    total = sum(moved.values())
    measured("bytes served to bring the new tag to 3 nodes that hold 4 of its 5 layers", total)
    assert not d.cluster.proxy.layer_gets()
    # three copies of the fifth layer (a gzip of 2 MB of random bytes, a little more) and of the config
    assert 3 * layer <= total < 3 * layer * 1.05, moved
    assert len([size for size in moved.values() if size >= layer]) == 1, moved  # one layer digest alone


def test_the_server_refuses_strangers_writes_and_what_no_image_references(d):
    ref = d.cluster.seed({"node-2": [unique("bcm11/guarded:1")]})["node-2"][0]
    name = ref.removeprefix(f"{d.cluster.registry_address}/").split(":")[0]
    ns = f"?ns={d.cluster.registry_address}"
    status, headers, manifest = request(d, "node-2", f"/v2/{name}/manifests/1{ns}")
    assert status == 200 and headers["Docker-Content-Digest"] == d.cluster.digests[ref]
    assert headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
    assert int(headers["Content-Length"]) == len(manifest)
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == d.cluster.digests[ref]
    import json

    layer = json.loads(manifest)["layers"][0]
    status, headers, blob = request(d, "node-2", f"/v2/{name}/blobs/{layer['digest']}")
    assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
    assert int(headers["Content-Length"]) == layer["size"] == len(blob)
    status, headers, body = request(d, "node-2", f"/v2/{name}/blobs/{layer['digest']}", method="HEAD")
    assert status == 200 and int(headers["Content-Length"]) == layer["size"] and body == b""
    # no credential, or a wrong one: refused, whatever the path
    assert request(d, "node-2", f"/v2/{name}/manifests/1{ns}", auth=None)[0] == 401
    assert request(d, "node-2", f"/v2/{name}/blobs/{layer['digest']}", auth="guess")[0] == 401
    # no write method at all
    for method in ("PUT", "POST", "DELETE", "PATCH"):
        status, headers, _ = request(d, "node-2", f"/v2/{name}/blobs/uploads/", method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    # nothing outside the images of the node's namespace: no path, no digest no image names
    unreferenced = "sha256:" + hashlib.sha256(b"not in any image").hexdigest()
    for path in (f"/v2/{name}/blobs/{unreferenced}", "/v2/../../etc/passwd", f"/v2/{name}/blobs/..%2F..%2Fetc",
                 f"/v2/{name}/manifests/2{ns}", "/etc/passwd", f"/v2/{name}/blobs/sha256:..%2f..%2froot"):
        assert request(d, "node-2", path)[0] == 404, path
    # a blob of the containerd store that no image references any more is not served either
    d.cluster.node("node-2").remove(ref)
    wait_for(lambda: request(d, "node-2", f"/v2/{name}/blobs/{layer['digest']}")[0] == 404, 10,
             "the removed image's layer refused")


def test_a_holder_streams_a_bounded_number_of_blobs_at_once(d):
    ref = d.cluster.seed({"node-3": [unique("bcm11/bounded:1")]})["node-3"][0]
    node = d.cluster.node("node-3")
    server = peerserve.start("127.0.0.1", 0, peerserve.ctr_argv(node.socket, "k8s.io"), lambda: token(d))
    try:
        name = ref.removeprefix(f"{d.cluster.registry_address}/").split(":")[0]
        address = f"http://127.0.0.1:{server.port}"
        manifest = urllib.request.urlopen(urllib.request.Request(
            f"{address}/v2/{name}/manifests/{d.cluster.digests[ref]}",
            headers={"Authorization": f"Bearer {token(d)}"}), timeout=10).read()
        layer = __import__("json").loads(manifest)["layers"][0]["digest"]
        fetch = urllib.request.Request(f"{address}/v2/{name}/blobs/{layer}",
                                       headers={"Authorization": f"Bearer {token(d)}"})
        for _ in range(peerserve.MAX_STREAMS):
            assert server.streams.acquire(blocking=False)  # as many blobs as it streams at once, under way
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(fetch, timeout=10)
        assert refused.value.code == 503
        server.streams.release()
        assert urllib.request.urlopen(fetch, timeout=10).status == 200
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def stranger_server(d, holder: str):
    """A real server on ``holder``'s containerd, but with a token of its own: it refuses every request."""
    node = d.cluster.node(holder)
    server = peerserve.start("127.0.0.1", 0, peerserve.ctr_argv(node.socket, "k8s.io"), lambda: "another token")
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()


def register_holder(d, name: str, address: str) -> None:
    """A registration of an agent ``name`` whose server is at ``address``."""
    with d.cluster.redis.client() as client:
        client.zadd(keys.AGENTS, {name: time.time()})
        client.hset(keys.agent(name), mapping={"name": name, "peer": address, "node": f'{{"name": "{name}"}}'})


def attempt_on(d, target: str, image: str, peers: tuple[str, ...], digest: str, client) -> Attempt:
    """What the target's agent runs for a pull whose route names ``peers``, then the registry."""
    settings = load_settings(d.config_path)
    node = agents.agent_node(settings, target, endpoint=f"unix://{d.cluster.node(target).socket}")
    settings = settings.model_copy(update={"nodes": [node]})
    route = Route((PEERS, REGISTRY), peers, digest, platform="linux/amd64", mirror=True)
    return Attempt(settings, node, image, route, check=False, redis=client)


def test_a_holder_gone_refusing_or_holding_another_digest_hands_over_to_the_next(d, monkeypatch):
    # what the agents' node environment says: the test crictl, the snapshotter that works here
    monkeypatch.setenv("CONTAINERD_SNAPSHOTTER", "native")
    monkeypatch.setenv("PATH", f"{d.cluster.node('node-2').bin_dir}:{__import__('os').environ['PATH']}")
    ref = d.cluster.seed({"node-1": [unique("bcm11/fallback:1")]}, size=3_000_000)["node-1"][0]
    digest = d.cluster.digests[ref]
    # node-3 holds the same name under another digest: a tag that moved there since the plan
    other = d.cluster.push(ref.removeprefix(f"{d.cluster.registry_address}/").split(":")[0], "other")
    d.cluster.node("node-3").pull(other)
    d.cluster.node("node-3").run(["ctr", "-a", d.cluster.node("node-3").socket, "-n", "k8s.io", "images", "tag",
                                  "--force", other, ref])
    with stranger_server(d, "node-1") as refusing, d.cluster.redis.client() as client:
        register_holder(d, "gone", "127.0.0.1:9")  # nothing listens there
        register_holder(d, "refusing", refusing)
        try:
            peers = ("gone", "refusing", "node-3", "node-1")
            # _take_a_source starts at the target's own offset among the holders: put "gone" there
            start = __import__("zlib").crc32(b"node-4") % len(peers)
            ordered = tuple(peers[(i - start) % len(peers)] for i in range(len(peers)))
            d.cluster.proxy.clear()
            outcome, _ = get_image(attempt_on(d, "node-4", ref, ordered, digest, client))
            assert (outcome.status, outcome.source) == ("copied", "node-1"), outcome
            assert d.cluster.node("node-4").images()[ref] == digest
            assert not d.cluster.proxy.layer_gets()
            # with no good holder left, the registry: within the one time_out
            d.cluster.node("node-2").remove(ref) if ref in d.cluster.node("node-2").images() else None
            outcome, _ = get_image(attempt_on(d, "node-2", ref, ("gone", "refusing", "node-3"), digest, client))
            assert outcome.status == "pulled", outcome
            assert outcome.duration < load_settings(d.config_path).time_out
            reasons = outcome.reason
            measured("why each holder was passed over", reasons)
            assert "from gone:" in reasons and "from refusing:" in reasons and "from node-3:" in reasons
            assert "401" in reasons.split("from refusing:")[1].split("; from")[0]
            assert "not found" in reasons.split("from node-3:")[1].split("; from")[0]
            assert "connection refused" in reasons.split("from gone:")[1].split("; from")[0]
            assert d.cluster.node("node-2").images()[ref] == digest
        finally:
            with d.cluster.redis.client() as cleanup:
                cleanup.zrem(keys.AGENTS, "gone", "refusing")
                cleanup.delete(keys.agent("gone"), keys.agent("refusing"))


def test_bytes_that_do_not_match_their_digest_hand_over_to_the_next_holder(d, monkeypatch):
    monkeypatch.setenv("CONTAINERD_SNAPSHOTTER", "native")
    ref = unique("bcm11/corrupt:1")
    ref = d.cluster.seed({"node-1": [ref], "node-2": [ref]}, size=1_000_000)["node-1"][0]
    digest = d.cluster.digests[ref]
    status, _, manifest = request(d, "node-1", f"/v2/{ref.split('/', 1)[1].split(':')[0]}/manifests/{digest}")
    layer = __import__("json").loads(manifest)["layers"][0]["digest"]
    # node-1's disk flips bytes of the layer: containerd reads it back without a check, its agent sends it
    blob = (d.cluster.node("node-1").workdir / "containerd" / "root" / "io.containerd.content.v1.content" / "blobs"
            / "sha256" / layer.removeprefix("sha256:"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    start = __import__("zlib").crc32(b"node-4") % 2
    peers = ("node-1", "node-2") if start == 0 else ("node-2", "node-1")
    before = served(d, "node-1").get(layer, 0)
    with d.cluster.redis.client() as client:
        outcome, _ = get_image(attempt_on(d, "node-4", ref, peers, digest, client))
    assert (outcome.status, outcome.source) == ("copied", "node-2"), outcome
    assert served(d, "node-1").get(layer, 0) > before  # node-1 was asked first and sent the bad bytes
    assert d.cluster.node("node-4").images()[ref] == digest

