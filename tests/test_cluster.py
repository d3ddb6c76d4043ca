"""Smoke tests of the test cluster against the real components.

redis-server, docker-registry, containerd and sshd run for real on loopback;
every SSH command goes through the ssh client, with the cluster's known_hosts
and StrictHostKeyChecking=yes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testcluster import (
    Cluster,
    ClusterError,
    InstallError,
    Node,
    RedisServer,
    ensure_system_packages,
    max_concurrency,
)
from testcluster.process import cmdline, find_processes, wait_until

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    ensure_system_packages()
    with Cluster(tmp_path_factory.mktemp("cluster"), nodes=2) as c:
        yield c


@pytest.fixture(autouse=True)
def _passthrough(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").proxy.passthrough()


def ssh(cluster: Cluster, node: Node, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(node.ssh_argv(command, cluster.known_hosts), capture_output=True, text=True,
                          timeout=timeout)


def crictl_images(cluster: Cluster, node: Node) -> list[dict[str, Any]]:
    result = ssh(cluster, node, "crictl images -o json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["images"]  # type: ignore[no-any-return]


def test_cluster_starts_and_writes_a_config_imagesync_can_read(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.startup_seconds is not None and cluster.startup_seconds > 0
    print(f"measured: cluster of 2 nodes started in {cluster.startup_seconds:.1f} s")
    assert all(line.startswith("[127.0.0.1]:") for line in cluster.known_hosts.read_text().splitlines())

    config = tomllib.loads(cluster.write_config(tmp_path / "a.toml").read_text())
    assert config["prefixes"] == [f"{cluster.registry_address}/bcm11", f"{cluster.registry_address}/nvidia"]
    assert config["redis_url"] == cluster.redis.url and ":6379/" not in config["redis_url"]
    assert config["ssh"] == {"known_hosts": str(cluster.known_hosts), "host_key_policy": "reject",
                             "connect_timeout": 5}
    assert [(n["name"], n["port"], n["runtime"]) for n in config["nodes"]] == [
        ("node-1", cluster.nodes[0].ssh_port, "crictl"), ("node-2", cluster.nodes[1].ssh_port, "crictl")]

    changed = tomllib.loads(cluster.write_config(
        tmp_path / "b.toml", max_parallel=2, schedule=None, runtime="ctr", ssh={"connect_timeout": 1},
        nodes_extra={"node-2": {"port": 1, "labels": ["gpu"]}}).read_text())
    assert changed["max_parallel"] == 2 and "schedule" not in changed
    assert changed["ssh"]["connect_timeout"] == 1 and changed["ssh"]["host_key_policy"] == "reject"
    assert {n["runtime"] for n in changed["nodes"]} == {"ctr"}
    assert changed["nodes"][1]["port"] == 1 and changed["nodes"][1]["labels"] == ["gpu"]


def test_registry_serves_a_pushed_image_directly_and_through_the_proxy(cluster: Cluster) -> None:
    ref = cluster.push("bcm11/serve", "1", size=4096)
    digest = cluster.digests[ref]
    for address in (cluster.registry.address, cluster.proxy.address):
        request = urllib.request.Request(f"http://{address}/v2/bcm11/serve/manifests/1",
                                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Docker-Content-Digest"] == digest
            manifest = json.loads(response.read())
        config_url = f"http://{address}/v2/bcm11/serve/blobs/{manifest['config']['digest']}"
        with urllib.request.urlopen(config_url, timeout=10) as response:
            config = json.loads(response.read())
        assert (config["architecture"], config["os"]) == ("amd64", "linux")
        assert len(config["rootfs"]["diff_ids"]) == 1
    # deterministic: the same arguments give the same image, a variant a different one
    assert cluster.registry.push_image("bcm11/serve", "1", size=4096) == digest
    assert cluster.registry.push_image("bcm11/serve", "1", size=4096, variant="b") != digest


def test_ssh_crictl_lists_a_preloaded_image_with_its_repo_digest(cluster: Cluster) -> None:
    node1, node2 = cluster.nodes
    [ref] = cluster.seed({"node-1": ["bcm11/listed:1"]})["node-1"]
    digest = cluster.digests[ref]
    repo = ref.rsplit(":", 1)[0]

    [image] = [i for i in crictl_images(cluster, node1) if ref in i["repoTags"]]
    assert list(image) == ["id", "repoTags", "repoDigests", "size", "uid", "username", "spec", "pinned"]
    assert image["repoDigests"] == [f"{repo}@{digest}"]
    assert isinstance(image["size"], str) and int(image["size"]) > 1024
    assert image["uid"] is None and image["username"] == "" and image["pinned"] is False
    assert node1.images()[ref] == digest
    # each node sees its own containerd only
    assert all(ref not in i["repoTags"] for i in crictl_images(cluster, node2))
    assert ref not in node2.images()


def test_the_nodes_reach_each_other_with_their_own_ssh_and_check_host_keys(cluster: Cluster) -> None:
    node1, node2 = cluster.nodes
    # in node-1's SSH session: its own ssh, key and known hosts, towards node-2's sshd
    command = f"ssh -o BatchMode=yes -p {node2.ssh_port} root@{node2.ssh_host} 'echo $CONTAINERD_ADDRESS'"
    result = ssh(cluster, node1, command)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == node2.socket  # it landed in node-2's session
    known = node1.workdir / "ssh" / "peers_known_hosts"
    kept = known.read_text()
    known.write_text(kept.replace(node2.known_hosts_line() + "\n", ""))
    try:
        result = ssh(cluster, node1, command)
    finally:
        known.write_text(kept)
    assert result.returncode == 255 and "Host key verification failed." in result.stderr


def test_crictl_shows_a_numeric_image_user_as_uid(cluster: Cluster) -> None:
    ref = cluster.push("bcm11/uid", "1", user="1000")
    cluster.nodes[0].pull(ref)
    [image] = [i for i in crictl_images(cluster, cluster.nodes[0]) if ref in i["repoTags"]]
    assert image["uid"] == {"value": "1000"} and image["username"] == ""


def test_crictl_pull_over_ssh_pulls_through_the_proxy(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    ref = cluster.push("bcm11/crictl-pull", "1")
    result = ssh(cluster, node, f"crictl pull {ref}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Image is up to date for sha256:")
    assert node.images()[ref] == cluster.digests[ref]
    assert any(r.path.endswith("/manifests/1") and "crictl-pull" in r.path for r in cluster.proxy.requests)
    record = [p for p in node.pulls() if p.ref == ref][-1]
    assert record.outcome == "ok" and record.end is not None and record.end >= record.start


def test_ctr_pull_over_ssh_with_default_flags_and_with_hosts_dir(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    plain, hosts_dir = cluster.push("bcm11/ctr", "plain"), cluster.push("bcm11/ctr", "hosts")
    # CONTAINERD_ADDRESS/NAMESPACE/SNAPSHOTTER come from sshd's SetEnv; a loopback
    # registry needs no --plain-http (ctr 1.6 speaks HTTP to 127.0.0.1 and localhost)
    result = ssh(cluster, node, f"ctr images pull {plain} >/dev/null")
    assert result.returncode == 0, result.stderr
    result = ssh(cluster, node, f"ctr -n k8s.io images pull --hosts-dir {node.workdir / 'certs.d'} {hosts_dir}")
    assert result.returncode == 0, result.stderr
    assert ssh(cluster, node, "ctr images ls -q").stdout.split().count(plain) == 1
    assert node.images()[plain] == cluster.digests[plain]
    # an image pulled with ctr has no repo digest in the CRI's answer
    [image] = [i for i in crictl_images(cluster, node) if plain in i["repoTags"]]
    assert image["repoDigests"] == []


def test_a_deleted_image_fails_with_the_registrys_reason(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    ref = cluster.push("bcm11/deleted", "1")
    cluster.registry.delete_image("bcm11/deleted", "1")
    assert cluster.registry.manifest_digest("bcm11/deleted", "1") is None

    result = ssh(cluster, node, f"crictl pull {ref}")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith('time="') and "level=fatal" in result.stderr
    assert "pulling image: rpc error: code = NotFound desc = failed to pull and unpack image" in result.stderr
    assert f"{ref}: not found" in result.stderr
    result = ssh(cluster, node, f"ctr images pull {ref}")
    assert result.returncode == 1 and f"{ref}: not found" in result.stderr
    assert [p.outcome for p in node.pulls() if p.ref == ref] == ["error"]


def test_proxy_delay_makes_each_pull_take_at_least_the_delay(cluster: Cluster) -> None:
    refs = [cluster.push("bcm11/slow", str(i)) for i in range(3)]
    cluster.proxy.clear()
    cluster.proxy.delay(1.0)
    began = time.monotonic()
    pulls = [subprocess.Popen(node.ssh_argv(f"crictl pull {ref}", cluster.known_hosts), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
             for node, ref in zip([cluster.nodes[0], cluster.nodes[1], cluster.nodes[0]], refs, strict=True)]
    for p in pulls:
        assert p.wait(30) == 0, p.stderr.read() if p.stderr else ""
    assert time.monotonic() - began >= 1.0
    layers = cluster.proxy.layer_gets()
    assert len(layers) == 3 and all(r.mode == "delay" and r.duration >= 1.0 for r in layers)
    assert all(r.client_port > 0 and r.wall_end > r.wall_start for r in layers)
    node_pulls = [p for node in cluster.nodes for p in node.pulls() if p.ref in refs]
    assert len(node_pulls) == 3 and all(p.end is not None and p.end - p.start >= 1.0 for p in node_pulls)


def test_held_pulls_show_their_concurrency_at_the_proxy_and_on_the_node(cluster: Cluster) -> None:
    refs = [cluster.push("bcm11/held", str(i)) for i in range(3)]
    cluster.proxy.clear()
    cluster.proxy.hold()
    pulls = [subprocess.Popen(node.ssh_argv(f"crictl pull {ref}", cluster.known_hosts), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
             for node, ref in zip([cluster.nodes[0], cluster.nodes[1], cluster.nodes[0]], refs, strict=True)]
    # every layer download has begun before any may end: they all overlap
    wait_until(lambda: cluster.proxy.held == 3, 30, "the three layer downloads to reach the proxy")
    cluster.proxy.release()
    for p in pulls:
        assert p.wait(30) == 0, p.stderr.read() if p.stderr else ""
    layers = cluster.proxy.layer_gets()
    assert len(layers) == 3 and {r.mode for r in layers} == {"hold"}
    assert max_concurrency((r.start, r.end) for r in layers) == 3
    node1_pulls = [p for p in cluster.nodes[0].pulls() if p.ref in refs]
    assert max_concurrency((p.start, p.end or p.start) for p in node1_pulls) == 2


def test_proxy_hang_keeps_a_pull_waiting_until_timeout_kills_it(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    ref = cluster.push("bcm11/hang", "1")
    cluster.proxy.hang(match="/bcm11/hang/")
    began = time.monotonic()
    result = ssh(cluster, node, f"timeout 2 crictl pull {ref}")
    assert result.returncode == 124 and time.monotonic() - began >= 2.0  # waited for the timeout
    assert node.processes(r"crictl pull") == []
    # killing crictl closes its gRPC call; containerd cancels the pull and drops the request
    wait_until(lambda: any(r.mode == "hang" and "/bcm11/hang/" in r.path for r in cluster.proxy.requests),
               10, "containerd to cancel the hung request")
    assert [p.outcome for p in node.pulls() if p.ref == ref] == ["killed"]
    cluster.proxy.passthrough()
    assert ssh(cluster, node, f"crictl pull {ref}").returncode == 0


@pytest.mark.parametrize(("mode", "reason"), [
    ("error", "failed with status code [manifests 1]: 503 Service Unavailable"),
    ("reset", "connection reset by peer"),
])
def test_proxy_error_and_reset_fail_pulls_with_the_transport_reason(cluster: Cluster, mode: str, reason: str) -> None:
    ref = cluster.push(f"bcm11/{mode}", "1")
    if mode == "error":
        cluster.proxy.error(503)
    else:
        cluster.proxy.reset()
    result = ssh(cluster, cluster.nodes[1], f"crictl pull {ref}")
    assert result.returncode == 1 and reason in result.stderr
    result = ssh(cluster, cluster.nodes[1], f"ctr images pull {ref}")
    assert result.returncode == 1 and reason in result.stderr


def test_crictl_reports_a_missing_socket_as_crictl_does(cluster: Cluster) -> None:
    result = cluster.nodes[0].run(["crictl", "-i", "unix:///nonexistent/containerd.sock", "images"], check=False)
    assert result.returncode == 1
    assert ('level=fatal msg="listing images: rpc error: code = Unavailable desc = connection error: desc = '
            '\\"transport: Error while dialing dial unix /nonexistent/containerd.sock: connect: '
            'no such file or directory\\""') in result.stderr


def test_stopped_sshd_refuses_and_a_regenerated_host_key_is_rejected(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=1) as cluster:
        node = cluster.nodes[0]
        node.stop_sshd()
        result = ssh(cluster, node, "true")
        assert result.returncode == 255 and "Connection refused" in result.stderr
        node.start_sshd()
        assert ssh(cluster, node, "true").returncode == 0

        node.regenerate_host_key()
        result = ssh(cluster, node, "true")
        assert result.returncode == 255
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr
        assert "Host key verification failed." in result.stderr
        assert node.known_hosts_line() not in cluster.known_hosts.read_text()


def test_everything_stops_even_with_a_pull_hanging(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        pids = [p for p in [cluster.redis.pid, cluster.registry.pid] if p is not None]
        pids += [p for n in cluster.nodes for p in n.pids.values()]
        assert len(pids) == 6 and all(cmdline(p) for p in pids)
        ref = cluster.push("bcm11/stuck", "1")
        cluster.proxy.hang()
        stuck = subprocess.Popen(cluster.nodes[0].ssh_argv(f"crictl pull {ref}", cluster.known_hosts),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: cluster.proxy.open_connections > 0, 10, "the pull to reach the proxy")
        assert cluster.nodes[0].processes("crictl pull")
    assert stuck.wait(10) == 255  # the pull did not end: sshd is gone, so is the session
    assert [p for p in pids if cmdline(p)] == []
    assert cluster.nodes[0].processes("crictl") == []


def test_a_server_whose_port_was_taken_moves_to_another_one(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, nodes=1)
    chosen = [cluster.redis.port, cluster.registry.port, cluster.nodes[0].ssh_port]
    holders = []
    for port in chosen:  # someone else binds them between choice and start
        holder = socket.socket()
        holder.bind(("127.0.0.1", port))
        holder.listen()
        holders.append(holder)
    try:
        with cluster:
            node = cluster.nodes[0]
            assert [cluster.redis.port, cluster.registry.port, node.ssh_port] != chosen
            assert all(p not in chosen for p in [cluster.redis.port, cluster.registry.port, node.ssh_port])
            assert f"[127.0.0.1]:{node.ssh_port} " in cluster.known_hosts.read_text()
            ref = cluster.push("bcm11/moved", "1")
            assert ssh(cluster, node, f"crictl pull {ref}").returncode == 0
    finally:
        for holder in holders:
            holder.close()


def test_a_failed_start_or_a_failing_test_leaves_no_process_behind(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broken = Cluster(tmp_path / "broken", nodes=2)
        node2 = broken.nodes[1]  # a node told to use a port that is taken cannot start
        broken.nodes[1] = Node(node2.name, node2.workdir, key_file=broken.key_file,
                               ssh_port=taken.getsockname()[1])
        with pytest.raises(ClusterError, match="sshd of node-2 exited"):
            broken.start()
    assert find_processes(str(tmp_path / "broken")) == []

    with pytest.raises(RuntimeError, match="a test failed"):
        with Cluster(tmp_path / "failing", nodes=1):
            assert find_processes(str(tmp_path / "failing"))
            raise RuntimeError("a test failed")
    assert find_processes(str(tmp_path / "failing")) == []


def test_install_names_the_packages_and_the_command_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ensure_system_packages() == []  # all present here: nothing to do
    monkeypatch.setattr("shutil.which", lambda cmd, path=None: None if cmd == "containerd" else "/bin/x")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(InstallError, match=r"needs containerd; as root, run: apt-get update && "
                                           r"DEBIAN_FRONTEND=noninteractive apt-get install -y containerd"):
        ensure_system_packages()


def test_redis_restart_keeps_data_and_kill_is_a_crash(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", password="s3cret") as server:
        assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0" and server.port != 6379
        with server.client() as client:
            client.set("imagesync:test", "kept")
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        port = server.port
        server.restart()
        assert server.port == port
        with server.client() as client:
            assert client.get("imagesync:test") == b"kept"
        pid = server.pid
        server.kill()
        assert pid is not None and cmdline(pid) is None


def test_up_and_down_run_a_cluster_in_the_background(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    up = subprocess.run([sys.executable, "-m", "testcluster", "up", "--dir", str(tmp_path), "--nodes", "1"],
                        capture_output=True, text=True, env=env, timeout=60)
    assert up.returncode == 0, up.stderr
    state = json.loads((tmp_path / "cluster.json").read_text())
    pids = [state["serve_pid"], state["redis"]["pid"], state["registry"]["pid"], *state["nodes"][0]["pids"].values()]
    try:
        assert "node-1" in up.stdout and "down --dir" in up.stdout
        config = tomllib.loads((tmp_path / "imagesync.toml").read_text())
        node = config["nodes"][0]
        result = subprocess.run(
            ["ssh", "-p", str(node["port"]), "-i", node["key_file"], "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={config['ssh']['known_hosts']}", "-o", "StrictHostKeyChecking=yes",
             f"{node['user']}@127.0.0.1", "crictl images -q"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    finally:
        down = subprocess.run([sys.executable, "-m", "testcluster", "down", "--dir", str(tmp_path)],
                              capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 0 and down.stdout.startswith("stopped")
    assert [p for p in pids if cmdline(p)] == []


def test_registry_urls_are_unreachable_once_stopped(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=0) as cluster:
        url = f"http://{cluster.registry.address}/v2/"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
