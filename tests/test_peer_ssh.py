"""Copies between nodes over the nodes' own SSH (``peer_ssh = true``) on the real cluster, and
the fallbacks of every copy, relayed or not: a holder that is gone, refuses, holds another
digest or serves another than it names hands over to the next holder, then to the registry,
within the one ``time_out``.

One 4-node cluster for the module; its nodes trust each other over SSH (a shared key, and
each node's known hosts of the others: ``testcluster.node.Node.trust_peers``). Every
assertion on images asks the nodes' containerd directly.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import measured, started_run, wait_for
from nodecopies import kill_export, make_local_image, stall_exports, unstall

from imagesync.attempt import Attempt
from imagesync.config import load_settings
from imagesync.outcomes import COPIED, PULLED
from imagesync.planning.plan import PEERS, REGISTRY, Route
from imagesync.pulls import get_image
from imagesync.transfer import copy, from_peers
from imagesync.transport import close_all
from testcluster.measure import process_tree, tcp_bytes

pytestmark = pytest.mark.cluster

NODES = 4
SETTINGS = {"time_out": 30, "max_parallel": 2, "retries": 0, "peer_ssh": True}
#: a copy relayed by the worker, and one the target runs itself
MODES = pytest.mark.parametrize("peer_ssh", [False, True], ids=["relayed", "peer_ssh"])


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    from conftest import Deployment

    from testcluster.cluster import Cluster
    from testcluster.install import ensure_system_packages

    ensure_system_packages()
    workdir = tmp_path_factory.mktemp("peerssh")
    with Cluster(workdir / "cluster", nodes=NODES) as cluster:
        deployment = Deployment(cluster, workdir)
        with deployment.services:
            deployment.configure(**SETTINGS)
            yield deployment
    close_all()


@pytest.fixture(autouse=True)
def fresh_connections():
    """Each test reaches the nodes on new SSH connections: one kept open from an earlier test
    would outlive a stopped sshd or a key it no longer accepts."""
    close_all()
    yield
    close_all()


def settings_for(d, peer_ssh: bool):
    return load_settings(d.config_path).model_copy(update={"peer_ssh": peer_ssh})


def digest_on(d, node: str, ref: str) -> str | None:
    return d.cluster.node(node).images().get(ref)


@contextmanager
def gone(node):
    """``node``'s sshd stopped: nobody reaches it over SSH, neither the worker nor a peer."""
    node.stop_sshd()
    try:
        yield
    finally:
        node.start_sshd()


@contextmanager
def refusing(node, key: Path):
    """``node``'s sshd no longer accepts ``key`` (the worker's, or the one the peers share)."""
    authorized = node.workdir / "ssh" / "authorized_keys"
    kept = authorized.read_text()
    authorized.write_text(kept.replace(key.with_name(key.name + ".pub").read_text(), ""))
    try:
        yield
    finally:
        authorized.write_text(kept)


def caller_key(d, peer_ssh: bool) -> Path:
    """The key a copy reaches the holder with: the peers' shared one, or the worker's."""
    return d.cluster.peer_key if peer_ssh else d.cluster.key_file


def moved_since(before: dict[tuple[str, str], int], pids: set[int]) -> int:
    """Bytes the TCP connections of ``pids`` carried since ``before`` (a :func:`tcp_bytes` look)."""
    after = tcp_bytes(pids)
    return sum(count - before.get(connection, 0) for connection, count in after.items())


@contextmanager
def counted():
    """The bytes this process's TCP connections carry in the block (``["bytes"]`` after it). The
    fixture closed the SSH connections: those of the block are new, and stay open (kept for reuse)."""
    found = {}
    before = tcp_bytes({os.getpid()})
    try:
        yield found
    finally:
        found["bytes"] = moved_since(before, {os.getpid()})


def assert_way(peer_ssh: bool, moved: int, size: int) -> None:
    """A relayed copy passed the image through this process, twice; a peer_ssh copy did not."""
    if peer_ssh:
        assert moved < 64 * 1024, f"{moved} bytes through this process for a {size}-byte image"
    else:
        assert moved > 2 * size, moved


def worker_pids(d) -> set[int]:
    """Every process of every imagesync service: each one and its descendants."""
    return {pid for process in d.services.processes.values() if process.running and process.pid
            for pid in process_tree(process.pid)}


# -- the image goes node to node, not through the worker ------------------------------------------------


def test_under_peer_ssh_the_nodes_copy_and_the_workers_relay_no_byte(d):
    size = 16 * 1024 * 1024
    ref = d.cluster.push("bcm11/peer-wide", "1", size=size, layers=2)
    d.configure(**{**SETTINGS, "source": "peers-first", "images": [ref]})
    d.start()
    try:
        pids = worker_pids(d)
        before = tcp_bytes(pids)
        result = d.cli("sync", "--wait", timeout=120)
        moved = moved_since(before, pids)
        assert worker_pids(d) == pids  # no worker process came or went
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        d.services.kill_all()
    run = d.history(started_run(result))
    statuses = Counter(r["status"] for r in run["results"] if r["image"] == ref)
    assert statuses == {"pulled": 1, "copied": 3}, run["results"]
    for node in d.cluster.nodes:
        assert digest_on(d, node.name, ref) == d.cluster.digests[ref], node.name
    measured("peer_ssh, 3 copies of a 16 MiB image: bytes through the workers", moved)
    # relayed, each copy passes twice through a worker (read from one node, written to the
    # other): 6 x 16 MiB here. What is left is the run's own traffic: Redis, the commands
    assert moved < size / 16, moved


@MODES
def test_a_copy_arrives_under_the_holders_digest(d, peer_ssh):
    size = 8 * 1024 * 1024
    ref = make_local_image(d, f"local/peer-one-{str(peer_ssh).lower()}:1", ["node-1"], size=size)
    digest = digest_on(d, "node-1", ref)
    settings = settings_for(d, peer_ssh)
    with counted() as moved:
        copied = copy(settings, settings.node("node-1"), settings.node("node-2"), ref, digest, "linux/amd64", 30)
    assert copied.ok, copied.reason
    assert digest_on(d, "node-2", ref) == digest
    measured(f"{'peer_ssh' if peer_ssh else 'relayed'}: bytes through this process for an 8 MiB image",
             moved["bytes"])
    assert_way(peer_ssh, moved["bytes"], size)


def test_a_peer_ssh_holder_killed_mid_stream_leaves_no_half_imported_image(d):
    ref = make_local_image(d, "local/peer-stalled:1", ["node-1"], size=4 * 1024 * 1024)
    digest = digest_on(d, "node-1", ref)
    source, target = d.cluster.node("node-1"), d.cluster.node("node-4")
    flag = d.workdir / "peer-stalled"
    stall_exports(source, flag)
    settings = settings_for(d, True)
    result = {}
    worker = threading.Thread(target=lambda: result.update(copied=copy(
        settings, settings.node("node-1"), settings.node("node-4"), ref, digest, "linux/amd64", 30)))
    try:
        with counted() as moved:
            worker.start()
            wait_for(flag.exists, 20, "the export stalled after its first MB")
            wait_for(lambda: target.processes(r"images import"), 20, "the import running on the target")
            kill_export(source, "ctr")
            worker.join(30)
    finally:
        flag.unlink(missing_ok=True)
        unstall(source)
    assert_way(True, moved["bytes"], 4 * 1024 * 1024)  # the target's own ssh had the export's first MB
    copied = result["copied"]
    assert not copied.ok
    assert "export on node-1" in copied.reason, copied.reason
    assert ref not in target.images()  # nothing under the name: not even a half-imported image
    wait_for(lambda: not target.processes(r"images import|\bssh\b"), 10, "no import nor ssh left on node-4")
    wait_for(lambda: not source.processes(r"images export"), 10, "no export left on node-1")


# -- fallbacks: the next holder, then the registry --------------------------------------------------------


#: the size of the images of the fallback tests
SIZE = 2 * 1024 * 1024


def two_holders(d, name: str) -> tuple[str, str]:
    """An image no registry has, on node-1 and node-2; its ref and digest."""
    ref = make_local_image(d, name, ["node-1", "node-2"], size=SIZE)
    digest = digest_on(d, "node-2", ref)
    assert digest_on(d, "node-1", ref) == digest
    return ref, digest


def copy_to_node_3(d, peer_ssh: bool, ref: str, digest: str):
    settings = settings_for(d, peer_ssh)
    route = Route((PEERS,), ("node-1", "node-2"), digest, platform="linux/amd64")
    with counted() as moved:
        outcome, _ = from_peers(Attempt(settings, settings.node("node-3"), ref, route, check=False))
    assert_way(peer_ssh, moved["bytes"], SIZE)
    return outcome


@MODES
def test_a_holder_that_is_gone_hands_over_to_the_next(d, peer_ssh):
    ref, digest = two_holders(d, f"local/gone-{str(peer_ssh).lower()}:1")
    with gone(d.cluster.node("node-1")):
        outcome = copy_to_node_3(d, peer_ssh, ref, digest)
    assert (outcome.status, outcome.source) == (COPIED, "node-2"), outcome
    assert digest_on(d, "node-3", ref) == digest


@MODES
def test_a_holder_that_refuses_the_key_hands_over_to_the_next(d, peer_ssh):
    ref, digest = two_holders(d, f"local/refusing-{str(peer_ssh).lower()}:1")
    with refusing(d.cluster.node("node-1"), caller_key(d, peer_ssh)):
        outcome = copy_to_node_3(d, peer_ssh, ref, digest)
    assert (outcome.status, outcome.source) == (COPIED, "node-2"), outcome
    assert digest_on(d, "node-3", ref) == digest


@MODES
def test_a_holder_with_another_digest_hands_over_to_the_next(d, peer_ssh):
    name = f"local/other-{str(peer_ssh).lower()}:1"
    ref = make_local_image(d, name, ["node-2"], size=SIZE)
    make_local_image(d, name, ["node-1"], size=SIZE, variant="other")  # same name, other content
    digest = digest_on(d, "node-2", ref)
    assert digest_on(d, "node-1", ref) not in (None, digest)
    outcome = copy_to_node_3(d, peer_ssh, ref, digest)
    assert (outcome.status, outcome.source) == (COPIED, "node-2"), outcome
    assert digest_on(d, "node-3", ref) == digest


def lie_about_digest(node, held: str, claimed: str) -> None:
    """Put a wrapper in front of ``node``'s ctr whose listings name ``claimed`` where the node
    holds ``held``: its export's first line names one digest and its tar holds the other."""
    wrapper = node.bin_dir / "ctr"
    wrapper.write_text(f"""#!/bin/sh
case "$*" in
  *"images ls"*) /usr/bin/ctr "$@" | sed "s/{held}/{claimed}/g" ;;
  *) exec /usr/bin/ctr "$@" ;;
esac
""")
    wrapper.chmod(0o755)


@MODES
def test_a_holder_that_serves_another_digest_than_it_names_hands_over_and_leaves_nothing(d, peer_ssh):
    name = f"local/lying-{str(peer_ssh).lower()}:1"
    ref = make_local_image(d, name, ["node-2"], size=SIZE)
    make_local_image(d, name, ["node-1"], size=SIZE, variant="other")
    digest, other = digest_on(d, "node-2", ref), digest_on(d, "node-1", ref)
    liar = d.cluster.node("node-1")
    lie_about_digest(liar, other, digest)
    settings = settings_for(d, peer_ssh)
    try:
        copied = copy(settings, settings.node("node-1"), settings.node("node-3"), ref, digest, "linux/amd64", 30)
        assert not copied.ok
        assert copied.reason == (f"the image arrived on node-3 as {other}, not as the source's digest "
                                 "(what it left under the name was removed)"), copied.reason
        assert ref not in d.cluster.node("node-3").images()
        outcome = copy_to_node_3(d, peer_ssh, ref, digest)  # node-1 first, then node-2
    finally:
        unstall(liar)
    assert (outcome.status, outcome.source) == (COPIED, "node-2"), outcome
    assert digest_on(d, "node-3", ref) == digest


@MODES
def test_when_every_holder_fails_the_registry_serves_within_time_out(d, peer_ssh):
    ref = d.cluster.push("bcm11/peer-fallback", f"{int(peer_ssh)}")
    d.cluster.seed({"node-1": [ref], "node-2": [ref]})
    settings = settings_for(d, peer_ssh)
    route = Route((PEERS, REGISTRY), ("node-1", "node-2"), d.cluster.digests[ref], platform="linux/amd64")
    attempt = Attempt(settings, settings.node("node-4"), ref, route, check=False)
    began = time.monotonic()
    with gone(d.cluster.node("node-1")), refusing(d.cluster.node("node-2"), caller_key(d, peer_ssh)):
        outcome, _ = get_image(attempt)
    took = time.monotonic() - began
    assert outcome.status == PULLED, outcome
    if peer_ssh:  # node-4's own ssh failed to reach them
        assert "from node-1: node-4 cannot reach node-1 " in outcome.reason, outcome.reason
        assert "from node-2: node-4 cannot reach node-2 " in outcome.reason, outcome.reason
        assert "Permission denied" in outcome.reason, outcome.reason
    else:
        assert "from node-1: Cannot connect to node-1 via SSH" in outcome.reason, outcome.reason
        assert "from node-2: SSH authentication as root refused" in outcome.reason, outcome.reason
    assert digest_on(d, "node-4", ref) == d.cluster.digests[ref]
    assert took < settings.time_out, took
    measured(f"{'peer_ssh' if peer_ssh else 'relayed'}: both holders failed, then the registry (s)", round(took, 1))
    measured("why", outcome.reason)


def test_check_has_every_node_reach_a_peer_with_its_own_ssh_and_names_one_that_cannot(d):
    import json

    def rows():
        result = d.cli("check", "--json")
        return result.returncode, {row["node"]: row for row in json.loads(result.stdout)["nodes"]}

    code, found = rows()
    assert code == 0, found
    for i in range(1, NODES + 1):  # each node tries the next, the last the first
        assert f"its ssh reaches node-{i % NODES + 1} (peer_ssh)" in found[f"node-{i}"]["detail"], found
    with refusing(d.cluster.node("node-2"), d.cluster.peer_key):
        code, found = rows()
    assert code == 1
    assert [name for name, row in found.items() if not row["ok"]] == ["node-1"], found
    detail = found["node-1"]["detail"]
    assert "its ssh cannot reach node-2 (" in detail and "Permission denied" in detail, detail
    assert "peer_ssh needs every node's ssh to reach the others" in detail
