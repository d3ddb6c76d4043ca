"""docker-compose.yml, run for real: podman and podman-compose against the real test cluster.

What runs is the repository's docker-compose.yml, with a small override this
test writes (``compose.test.yml`` in its temporary directory), and nothing else
changed. The override:

* builds on a base image made here, since Docker Hub is out of reach: a
  Debian 12 root filesystem from ``debootstrap --variant=minbase``, plus
  Debian's ``python3``, ``python3-venv``, ``openssh-client`` and
  ``redis-server`` (Redis runs on that base too, in place of ``redis:7``);
* names the images ``localhost/imagesync-test*``, so that a real ``imagesync``
  image on the machine is left alone;
* mounts the configuration and ``ssh/`` from the test's directory rather than
  the checkout's.

The stack keeps its own bridge network, with service-name DNS as the file
has it (``redis://redis:6379/0``). The test cluster's nodes listen on
127.0.0.1, which a container cannot reach: the test makes the stack's network
itself (so it knows its gateway address before ``up``) and forwards each
node's SSH port from that gateway address to the node, and the configuration
names the nodes by that address. Flower is published on a free 127.0.0.1 port
(``FLOWER_PUBLISH``).

Podman needs two settings on the test machines, given in a containers.conf
that only this test reads (``CONTAINERS_CONF``): container limits under the
machine's hard limits (podman's defaults are above them, and the runtime then
fails with "error setting rlimit"), and runc when the default runtime (crun)
refuses the host's cgroup setup.

The base images are cached between runs (``podman image exists``), keyed by
their Containerfile; the stack's images are built every run, from podman's
layer cache when nothing changed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import measured, started_run, wait_for

from testcluster.cluster import Cluster, toml_dumps
from testcluster.install import REQUIRED_COMMANDS, REQUIRED_FILES, missing_packages
from testcluster.process import free_port

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
#: the file's worker services, one per node of imagesync.sample.toml; the cluster's nodes take their names
WORKERS = sorted(name for name in COMPOSE["services"] if name.startswith("worker-"))
NODES = [name.removeprefix("worker-") for name in WORKERS]
#: the stack under test: everything but the webhook receiver
SERVICES = ["redis", "control", *WORKERS, "beat", "flower"]
#: where the test runs the CLI while control restarts; the sync itself runs in control,
#: as the README does (its IMAGESYNC_ROLE, for the entrypoint, is no setting to the CLI)
CLI = "flower"
#: the containers' user, whom the SSH key must be readable by
CONTAINER_UID = int(re.search(r"^ARG UID=(\d+)", (ROOT / "workers" / "Dockerfile").read_text(), re.M).group(1))

DEBIAN_IMAGE = "localhost/imagesync-test-debian:bookworm"
IMAGESYNC_IMAGE = "localhost/imagesync-test:latest"
BEAT_IMAGE = "localhost/imagesync-test-beat:latest"
#: the host's CA bundle goes into the base, so that pip in a build trusts what the host trusts
#: (a TLS-inspecting proxy's CA, for one); Debian's ca-certificates would overwrite it if copied first
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_CONTAINERFILE = """\
FROM {debian}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
        python3 python3-venv openssh-client redis-server \\
 && rm -rf /var/lib/apt/lists/*
{ca_bundle}
"""
CA_BUNDLE_LINES = """\
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
"""
# Debian's redis-server without a configuration file, as the official image
# runs it: data in the working directory (/data, the file's volume), and
# protected mode off, since other containers connect without a password
# (the official image's entrypoint adds the same flag).
REDIS_CONTAINERFILE = """\
FROM {base}
WORKDIR /data
ENTRYPOINT ["/bin/sh", "-c", "exec \\"$@\\" --protected-mode no", "redis-server"]
"""
# podman's default limits are above the hard limits of the test machines
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]
"""
FLOWER_LOGIN = ("admin", secrets.token_hex(8))
#: podman's CNI plugin that answers service names in a compose network
DNS_PACKAGE = REQUIRED_FILES["/usr/lib/cni/dnsname"]


class Podman:
    """podman and podman-compose with this test's containers.conf."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.conf = workdir / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        # BUILDAH_FORMAT: keep the Dockerfiles' HEALTHCHECK (the OCI format has none)
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf), "BUILDAH_FORMAT": "docker"}

    def __call__(self, *args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, **kwargs)
        if check and result.returncode != 0:
            pytest.fail(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def image_exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def choose_runtime(self, image: str) -> str:
        """The OCI runtime that runs a container here: podman's default, else runc; skip if none does."""
        tried = []
        for runtime in (None, "runc"):
            engine = f'[engine]\nruntime = "{runtime}"\n' if runtime else ""
            self.conf.write_text(CONTAINERS_CONF + engine)
            result = self("run", "--rm", "--network", "none", image, "true", check=False, timeout=60)
            if result.returncode == 0:
                return runtime or "default"
            tried.append(f"{runtime or 'default runtime'}: {result.stderr.strip().splitlines()[-1:]}")
        pytest.skip("podman cannot run a container on this machine: " + "; ".join(tried))

    def build(self, image: str, containerfile: str, context: Path, timeout: float = 600) -> None:
        (context / "Containerfile").write_text(containerfile)
        self("build", "--quiet", "--tag", image, "--file", str(context / "Containerfile"), str(context),
             timeout=timeout)


def tagged(name: str, containerfile: str, *inputs: Path) -> str:
    """``localhost/NAME:HASH``: a new tag whenever the Containerfile or what it copies changes."""
    digest = hashlib.sha256(containerfile.encode())
    for path in inputs:
        digest.update(path.read_bytes())
    return f"localhost/{name}:{digest.hexdigest()[:12]}"


def ensure_debian(podman: Podman, scratch: Path) -> float:
    """The debootstrap image, made once per machine; returns the seconds it took (0 if cached)."""
    if podman.image_exists(DEBIAN_IMAGE):
        return 0.0
    began = time.monotonic()
    rootfs = scratch / "rootfs"
    try:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
                       check=True, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["podman", "import", "-", DEBIAN_IMAGE], stdin=tar.stdout, env=podman.env,
                                  capture_output=True, text=True, timeout=300)
        tar.stdout.close()
        assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return time.monotonic() - began


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """podman, its runtime chosen, and the base images (built now, or cached from an earlier run)."""
    needed = {REQUIRED_COMMANDS[command] for command in ("podman", "podman-compose", "debootstrap")} | {DNS_PACKAGE}
    missing = sorted(needed & set(missing_packages()))
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: make deps (python -m testcluster install) installs them")
    workdir = tmp_path_factory.mktemp("podman")
    engine = Podman(workdir)
    began = time.monotonic()
    measured("debootstrap and import (0 if cached)", f"{ensure_debian(engine, workdir):.1f} s")
    measured("OCI runtime", engine.choose_runtime(DEBIAN_IMAGE))

    context = workdir / "base"
    context.mkdir()
    ca_bundle = ""
    if HOST_CA_BUNDLE.is_file():
        shutil.copy(HOST_CA_BUNDLE, context / "ca-certificates.crt")
        ca_bundle = CA_BUNDLE_LINES
    containerfile = BASE_CONTAINERFILE.format(debian=DEBIAN_IMAGE, ca_bundle=ca_bundle)
    engine.base = tagged("imagesync-test-base", containerfile, *context.iterdir())
    if not engine.image_exists(engine.base):
        engine.build(engine.base, containerfile, context)
    redis_containerfile = REDIS_CONTAINERFILE.format(base=engine.base)
    engine.redis = tagged("imagesync-test-redis", redis_containerfile)
    if not engine.image_exists(engine.redis):
        redis_context = workdir / "redis"
        redis_context.mkdir()
        engine.build(engine.redis, redis_containerfile, redis_context)
    measured("base images, debootstrap included (under 1 s if cached)", f"{time.monotonic() - began:.1f} s")
    return engine


class Forwarder:
    """TCP from ``listen`` to ``target``: a container on the stack's bridge reaches a loopback server.

    Binds with IP_FREEBIND: the gateway address exists on the host only once
    the first container of the network has started.
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        self._server.bind(listen)
        self._server.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        with self._lock:
            self._connections |= {client, upstream}
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self._lock:
            self._connections -= {client, upstream}
        client.close()
        upstream.close()

    def close(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        self._server.close()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class Stack:
    """docker-compose.yml and the test's override, as project ``project``."""

    def __init__(self, podman: Podman, cluster: Cluster, workdir: Path) -> None:
        self.podman = podman
        self.cluster = cluster
        self.workdir = workdir
        self.project = f"imagesync-test-{secrets.token_hex(3)}"
        self.network = f"{self.project}_default"
        self.override = workdir / "compose.test.yml"
        self.flower_port = free_port()
        self.forwarders: list[Forwarder] = []
        self.env = {
            **podman.env,
            "FLOWER_BASIC_AUTH": ":".join(FLOWER_LOGIN),
            "FLOWER_PUBLISH": f"127.0.0.1:{self.flower_port}",
            # the webhook service is not started, but the file demands its secret
            "IMAGESYNC_WEBHOOK_SECRET": secrets.token_hex(8),
        }

    # -- setting up ------------------------------------------------------------------

    def write_override(self) -> None:
        services = {}
        for name, service in COMPOSE["services"].items():
            own = {}
            if name == "redis":
                own["image"] = self.podman.redis
            elif "build" in service:
                beat = service["build"].get("dockerfile") == "beat/Dockerfile"
                own["image"] = BEAT_IMAGE if beat else IMAGESYNC_IMAGE
                own["build"] = {"args": {"BASE": IMAGESYNC_IMAGE if beat else self.podman.base}}
            # the same targets from this test's directory (both engines merge volumes by target)
            own["volumes"] = [f"{self.workdir}/{volume[2:]}" for volume in service.get("volumes", [])
                              if volume.startswith("./")]
            services[name] = {key: value for key, value in own.items() if value}
        self.override.write_text(yaml.safe_dump({"services": services}, sort_keys=False))

    def create_network(self) -> str:
        """The stack's network, made before ``up`` (which then uses it); returns its gateway."""
        labels = [f"--label=io.podman.compose.project={self.project}",
                  f"--label=com.docker.compose.project={self.project}"]
        self.podman("network", "create", *labels, self.network)
        inspected = json.loads(self.podman("network", "inspect", self.network).stdout)[0]
        if not inspected.get("dns_enabled"):
            # without it every container fails on "redis": Name or service not known
            pytest.fail(f"podman network {self.network} answers no DNS for service names: "
                        f"install {DNS_PACKAGE} (make deps does)")
        return inspected["subnets"][0]["gateway"]

    def configure(self, gateway: str) -> None:
        """imagesync.toml and ssh/ as the README's compose section has them, nodes at ``gateway``."""
        config = self.cluster.config()
        for key in ("log_dir", "redis_url"):  # the file's environment sets them for the containers
            config.pop(key)
        config["ssh"] = {"host_key_policy": "reject", "connect_timeout": 5}
        for entry, name in zip(config["nodes"], NODES, strict=True):
            node = self.cluster.node(entry["name"])
            self.forwarders.append(Forwarder((gateway, node.ssh_port), ("127.0.0.1", node.ssh_port)))
            entry.update(name=name, host=gateway)
            del entry["key_file"]  # IMAGESYNC_SSH_KEY_FILE, the mounted key
        (self.workdir / "imagesync.toml").write_text(toml_dumps(config))
        ssh = self.workdir / "ssh"
        ssh.mkdir()
        shutil.copy(self.cluster.key_file, ssh / "id_ed25519")
        os.chown(ssh / "id_ed25519", CONTAINER_UID, -1)
        (ssh / "known_hosts").write_text("".join(
            node.known_hosts_line().replace(f"[{node.ssh_host}]", f"[{gateway}]") + "\n"
            for node in self.cluster.nodes))

    # -- running ---------------------------------------------------------------------

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        argv = ["podman-compose", "-p", self.project, "-f", str(COMPOSE_FILE), "-f", str(self.override), *args]
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, cwd=self.workdir)
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(args)}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def exec(self, service: str, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", service, *command, timeout=timeout, check=False)

    def logs(self) -> str:
        out = []
        for service in SERVICES:
            result = self.podman("logs", "--tail", "30", self.container(service), check=False)
            out.append(f"--- {service}\n{result.stdout}{result.stderr}")
        return "\n".join(out)

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of this project that podman still has."""
        label = f"label=io.podman.compose.project={self.project}"
        found = {
            "containers": self.podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").stdout.split(),
            "volumes": self.podman("volume", "ls", "--filter", label, "--format", "{{.Name}}").stdout.split(),
            "networks": self.podman("network", "ls", "--format", "{{.Name}}").stdout.split(),
        }
        found["networks"] = [name for name in found["networks"] if name.startswith(self.project)]
        return {kind: names for kind, names in found.items() if names}

    def down(self) -> None:
        """``down -v``, the network (podman-compose 1.0 never removes one), the forwarders."""
        self.compose("down", "-v", timeout=180, check=False)
        self.podman("network", "rm", "--force", self.network, check=False)
        for forwarder in self.forwarders:
            forwarder.close()
        self.forwarders.clear()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("cluster"), nodes=len(NODES)) as started:
        yield started


@pytest.fixture(scope="module")
def stack(podman, cluster):
    # a short path: it ends up in the containers' mount table and in error messages
    workdir = Path(tempfile.mkdtemp(prefix="isync-compose-"))
    workdir.chmod(0o755)
    stack = Stack(podman, cluster, workdir)
    try:
        stack.write_override()
        began = time.monotonic()
        stack.compose("build", "control", timeout=600)
        stack.compose("build", "beat", timeout=300)
        measured("stack images built", f"{time.monotonic() - began:.1f} s")
        stack.configure(stack.create_network())
        began = time.monotonic()
        stack.compose("up", "-d", "--no-build", *SERVICES)
        ping = ["celery", "-A", "imagesync", "inspect", "ping", "--timeout", "5"]
        wait_for(lambda: stack.exec(CLI, *ping, timeout=60).stdout.count("pong") == 1 + len(WORKERS),
                 90, "the control worker and one worker per node answer a ping", interval=1)
        measured("stack up, workers answering", f"{time.monotonic() - began:.1f} s")
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.down()
        shutil.rmtree(workdir, ignore_errors=True)


def holds(cluster: Cluster, node: str) -> set[str]:
    """Tag references under the test prefixes in the node's containerd (asked with ctr)."""
    prefixes = tuple(f"{cluster.registry_address}/{prefix}/" for prefix in ("bcm11", "nvidia"))
    return {ref for ref in cluster.node(node).images() if "@" not in ref and ref.startswith(prefixes)}


def history(stack: Stack, run_id: str) -> dict:
    # podman exec: podman-compose's own lines would go before the JSON
    return json.loads(stack.podman("exec", stack.container(CLI), "imagesync", "history", "--json", run_id).stdout)


# -- the tests, in the order a person would go ---------------------------------------


def test_redis_runs_with_aof_and_noeviction(stack):
    def config(name: str) -> str:
        result = stack.podman("exec", stack.container("redis"), "redis-cli", "config", "get", name)
        return result.stdout.split()[-1]

    assert config("appendonly") == "yes"
    assert config("maxmemory-policy") == "noeviction"
    persistence = stack.podman("exec", stack.container("redis"), "redis-cli", "info", "persistence").stdout
    assert "aof_enabled:1" in persistence
    # on the named volume: a re-created container finds the AOF again
    mounts = json.loads(stack.podman("inspect", stack.container("redis")).stdout)[0]["Mounts"]
    assert any(m["Destination"] == "/data" and m["Type"] == "volume" for m in mounts), mounts


def test_a_sync_started_in_the_stack_converges_every_node(stack, cluster):
    first, second = (node.name for node in cluster.nodes)
    seeded = cluster.seed({first: [f"bcm11/app-{i}:1" for i in range(3)], second: ["nvidia/cuda:12"]})
    wanted = {ref for refs in seeded.values() for ref in refs}
    began = time.monotonic()
    result = stack.exec("control", "imagesync", "sync", "--wait", timeout=180)
    measured("sync --wait in the control container", f"{time.monotonic() - began:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    for node in cluster.nodes:
        assert holds(cluster, node.name) == wanted, node.name
    run = history(stack, started_run(result))
    assert run["status"] == "completed", run


def test_flower_asks_for_its_login(stack):
    url = f"http://127.0.0.1:{stack.flower_port}/"

    def status(headers: dict[str, str]) -> int | None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    assert wait_for(lambda: status({}), 60, "Flower answers", interval=1) == 401
    login = base64.b64encode(":".join(FLOWER_LOGIN).encode()).decode()
    assert status({"Authorization": f"Basic {login}"}) == 200
    wrong = base64.b64encode(f"{FLOWER_LOGIN[0]}:wrong".encode()).decode()
    assert status({"Authorization": f"Basic {wrong}"}) == 401


def test_restarting_the_control_container_mid_run_loses_no_outcome(stack, cluster):
    first, second = (node.name for node in cluster.nodes)
    seeded = cluster.seed({second: [f"bcm11/late-{i}:1" for i in range(8)]})
    expected = {(NODES[0], ref) for ref in seeded[second]}
    cluster.proxy.hold()  # every pull stays under way until control has restarted
    try:
        result = stack.exec(CLI, "imagesync", "sync")
        assert result.returncode == 0, result.stdout + result.stderr
        run_id = started_run(result)
        # restart once pulls are running, so that the run ends while control is down or starting
        wait_for(lambda: cluster.proxy.held, 30, "a pull under way", interval=0.1)
        before = stack.podman("inspect", "--format", "{{.State.StartedAt}}", stack.container("control")).stdout
        stack.podman("restart", stack.container("control"), timeout=90)
        after = stack.podman("inspect", "--format", "{{.State.StartedAt}}", stack.container("control")).stdout
        assert after != before, "control was not restarted"
        # the pulls the run was waiting for when control went down
        assert history(stack, run_id)["status"] == "running", "the run ended before the restart"
    finally:
        cluster.proxy.release()

    run = wait_for(lambda: (lambda r: r if r["status"] != "running" else None)(history(stack, run_id)),
                   120, f"end of run {run_id}", interval=1)
    assert run["status"] == "completed", run
    # one outcome per pull, every one a success: none lost, none counted twice
    assert sorted((r["node"], r["image"], r["status"]) for r in run["results"]) == sorted(
        (node, image, "pulled") for node, image in expected), run
    assert set(seeded[second]) <= holds(cluster, first)


def test_down_leaves_no_container_network_or_volume(stack):
    assert stack.leftovers(), "nothing was up"
    stack.down()
    assert stack.leftovers() == {}
