"""The backup registry behind HTTPS, as the nodes reach it with ``ctr``: a real docker-registry
serving a self-signed certificate under the machine's host name (ctr treats a loopback address
as plain HTTP, a name not), a real cluster's nodes restoring from it and pushing into it.

* ``backup.insecure``: HTTPS without verification (``--skip-verify``); plain HTTP only for a
  backup that answers in plain HTTP.
* a CA in the node's ``hosts_dir``: the restore and the push go through that hosts dir and
  verify the certificate, with ``insecure`` off.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from imagesync import references
from imagesync.attempt import Attempt
from imagesync.backup import push_from_node
from imagesync.config import load_settings
from imagesync.planning.plan import BACKUP, Route
from imagesync.restore import from_backup
from imagesync.transport import close_all

LOGIN = ("bkuser", "tls bk pass")

pytestmark = pytest.mark.cluster


def _host_name() -> str:
    """This machine's host name, which must resolve to a loopback address (registries here listen there)."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        pytest.skip(f"the host name {name!r} does not resolve: ctr needs a name, not a loopback address, "
                    "to speak HTTPS to a registry")
    if not address.startswith("127."):
        pytest.skip(f"the host name {name!r} resolves to {address}, not to a loopback address")
    return name


def _registry_class():
    from testcluster.registry import Registry

    class NamedRegistry(Registry):
        """docker-registry on loopback, addressed by ``host``; with ``tls``, HTTPS with a self-signed certificate."""

        def __init__(self, workdir: Path, host: str, tls: bool, login: tuple[str, str] | None = None) -> None:
            super().__init__(workdir, login=login)
            self.host, self.tls = host, tls
            self.cert, self.key = self.workdir / "cert.pem", self.workdir / "key.pem"

        @property
        def address(self) -> str:
            return f"{self.host}:{self.port}"

        def _write_config(self) -> Path:
            config = super()._write_config()
            if not self.tls:
                return config
            if not self.cert.exists():
                subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                                "-keyout", str(self.key), "-out", str(self.cert), "-subj", f"/CN={self.host}",
                                "-addext", f"subjectAltName=DNS:{self.host},IP:127.0.0.1"],
                               check=True, capture_output=True, timeout=60)
            text = config.read_text().replace(
                "  secret: imagesync-test-cluster\n",
                f"  secret: imagesync-test-cluster\n  tls:\n    certificate: {self.cert}\n    key: {self.key}\n")
            config.write_text(text)
            return config

        def _open(self, timeout: float) -> http.client.HTTPConnection:
            if self.tls:
                return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                                   context=ssl._create_unverified_context())
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

        def _answers(self) -> bool:
            conn = self._open(1)
            try:
                conn.request("GET", "/v2/")
                return conn.getresponse().status in (200, 401)
            finally:
                conn.close()

        def _connection(self) -> http.client.HTTPConnection:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self._open(60)
            return conn

    return NamedRegistry


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A 2-node cluster, and beside it two backups under the host name: HTTPS (self-signed) and plain HTTP."""
    from redis import Redis

    from testcluster.cluster import Cluster
    from testcluster.install import ensure_system_packages

    ensure_system_packages()
    host = _host_name()
    workdir = tmp_path_factory.mktemp("backup-tls")
    named = _registry_class()
    with Cluster(workdir / "cluster", nodes=2) as cluster, \
            named(workdir / "https", host, tls=True, login=LOGIN) as https, \
            named(workdir / "http", host, tls=False, login=LOGIN) as plain:
        cluster.seed({"node-1": ["bcm11/app:1", "bcm11/lib:1", "bcm11/web:1"]})
        close_all()  # this process's transports are kept by node name: none may lead to another cluster's node
        yield SimpleNamespace(cluster=cluster, https=https, http=plain, workdir=workdir,
                              redis=Redis.from_url(cluster.redis.url))
        close_all()


def _settings(t, registry, insecure: bool, hosts_dir: Path | None = None):
    extra = {node.name: {"hosts_dir": str(hosts_dir)} for node in t.cluster.nodes} if hosts_dir else {}
    path = t.cluster.write_config(t.workdir / f"imagesync-{registry.port}-{insecure}.toml", nodes_extra=extra, backup={
        "registry": f"{registry.address}/bk", "username": LOGIN[0], "password": LOGIN[1], "insecure": insecure})
    return load_settings(path)


def _push_then_restore(t, settings, image: str) -> None:
    """node-1 pushes ``image`` into the backup; node-2, which lacks it, restores it from there."""
    c = t.cluster
    ref = c.ref(image)
    name = references.backup_name(settings.backup.registry, ref)
    pushed = push_from_node(settings, t.redis, "run-tls", settings.node("node-1"), ref, name)
    assert (pushed.status, pushed.reason) == ("backed-up", ""), pushed
    assert ref not in c.node("node-2").images()
    route = Route(sources=(BACKUP,), digest=c.digests[ref])
    restored, _ = from_backup(Attempt(settings, settings.node("node-2"), ref, route))
    assert (restored.status, restored.reason) == ("restored", ""), restored
    held = c.node("node-2").images()
    assert held[ref] == c.digests[ref] and name not in held


def test_an_insecure_https_backup_is_reached_without_verification_not_over_plain_http(tls):
    """A self-signed HTTPS backup with ``insecure = true``: ``--plain-http`` (what it got before) is
    answered 400 by an HTTPS server; ``--skip-verify`` is what ctr needs."""
    _push_then_restore(tls, _settings(tls, tls.https, insecure=True), "bcm11/app:1")


def test_a_backup_whose_ca_is_in_the_nodes_hosts_dir_is_verified_there(tls):
    """``insecure = false`` and the backup's CA in each node's ``hosts_dir`` (``hosts.toml``, ``ca``):
    the restore and the push read that hosts dir, as the node's own pulls do."""
    hosts_dir = tls.workdir / "certs.d"
    (hosts_dir / tls.https.address).mkdir(parents=True, exist_ok=True)
    (hosts_dir / tls.https.address / "hosts.toml").write_text(
        f'server = "https://{tls.https.address}"\n\n'
        f'[host."https://{tls.https.address}"]\n  capabilities = ["pull", "resolve", "push"]\n'
        f'  ca = "{tls.https.cert}"\n')
    _push_then_restore(tls, _settings(tls, tls.https, insecure=False, hosts_dir=hosts_dir), "bcm11/lib:1")


def test_an_insecure_backup_on_plain_http_is_still_reached(tls):
    """An insecure backup that speaks plain HTTP under a name: HTTPS is answered in HTTP, so the node
    goes on over plain HTTP."""
    _push_then_restore(tls, _settings(tls, tls.http, insecure=True), "bcm11/web:1")
