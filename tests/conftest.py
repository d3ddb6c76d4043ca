"""Shared fixtures: a private redis-server (never the system one) and the real test cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testcluster.process import NO_SERVERS
from testcluster.redis import RedisServer

#: fixtures that start servers: a test using one is a cluster test whatever its module says
SERVER_FIXTURES = {"redis_server", "redis_client", "deploy"}


def pytest_configure(config):
    # `make unit` (-m 'not cluster') must need no server: starting one there is an error
    # that names the unmarked test, rather than a slow unit run
    if config.getoption("markexpr", "") == "not cluster":
        os.environ[NO_SERVERS] = "1"


#: the modules that take longest, longest first: `make test` runs tests side by side
#: (pytest-xdist), and starting these first keeps the last one from running alone at the end
SLOWEST_MODULES = ["test_faults.py", "test_compose.py", "test_lifecycle.py", "test_e2e.py", "test_transfer.py",
                   "test_cancel.py", "test_systemd.py", "test_backup.py", "test_shared_worker.py", "test_agents.py"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
    rank = {name: position for position, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.hookimpl(optionalhook=True)  # xdist's hook: pytest -p no:xdist runs without it
def pytest_xdist_make_scheduler(config, log):
    """`make test` hands each test to whichever process is free, but keeps together the
    tests of a module with a module fixture (a cluster, a stack of containers): it is set
    up once, in one process. (xdist's own loadgroup cannot carry marks added at collection
    on this pytest, whose node ids are no longer strings to append a group to.)"""
    from xdist.scheduler import LoadScopeScheduling

    here = Path(__file__).parent
    together = {f"{here.name}/{path.name}" for path in here.glob("test_*.py")
                if 'scope="module"' in path.read_text()}

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return module if module in together else nodeid

    return Scheduling(config, log)


class Deployment:
    """A test cluster with imagesync deployed on it: config file, workers, CLI."""

    def __init__(self, cluster, workdir):
        from testcluster.services import Services

        self.cluster = cluster
        self.workdir = workdir
        self.config_path = workdir / "imagesync.toml"
        self.services = Services(self.config_path, workdir / "services")

    def configure(self, **overrides):
        """Write the config; ctr nodes get their registry hosts dir, as an operator would set it."""
        if overrides.get("runtime", self.cluster.runtime) == "ctr":
            extra = overrides.setdefault("nodes_extra", {})
            for node in self.cluster.nodes:
                extra.setdefault(node.name, {}).setdefault("hosts_dir", str(node.workdir / "certs.d"))
        self.cluster.write_config(self.config_path, **overrides)
        return self.config_path

    def start(self, nodes=None):
        names = [n.name for n in self.cluster.nodes] if nodes is None else nodes
        self.services.start_all(names)

    def cli(self, *args, timeout=300, env=None):
        import os
        import subprocess
        import sys

        return subprocess.run(
            [sys.executable, "-m", "imagesync.cli", *args],
            env={**os.environ, "IMAGESYNC_CONFIG": str(self.config_path), **(env or {})},
            capture_output=True, text=True, timeout=timeout,
        )

    def history(self, run_id=None):
        """``imagesync history --json [RUN]``, run in this process: the command's own code
        and output, without a Python start-up (most of a CLI call's CPU) on every look."""
        import contextlib
        import io
        import json

        from imagesync.cli import main

        out, err = io.StringIO(), io.StringIO()
        saved = os.environ.get("IMAGESYNC_CONFIG")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["-c", str(self.config_path), "history", "--json", *([run_id] if run_id else [])])
        finally:
            if saved is None:
                os.environ.pop("IMAGESYNC_CONFIG", None)
            else:
                os.environ["IMAGESYNC_CONFIG"] = saved
        assert code == 0, err.getvalue()
        return json.loads(out.getvalue())

    def held(self, node, under=("bcm11", "nvidia")):
        """Tag references a node's containerd holds under the test prefixes -> digest."""
        prefixes = tuple(f"{self.cluster.registry_address}/{p}/" for p in under)
        return {ref: digest for ref, digest in self.cluster.node(node).images().items()
                if "@" not in ref and ref.startswith(prefixes)}


@pytest.fixture
def deploy(tmp_path):
    """``deploy(nodes=2, runtime="crictl")`` -> a started Deployment, stopped after the test."""
    from contextlib import ExitStack

    from testcluster.cluster import Cluster

    stack = ExitStack()

    def make(nodes=2, runtime="crictl", redis_password=None, registry_login=None, registry_notify=None):
        cluster = stack.enter_context(Cluster(tmp_path / "cluster", nodes=nodes, runtime=runtime,
                                              redis_password=redis_password, registry_login=registry_login,
                                              registry_notify=registry_notify))
        deployment = Deployment(cluster, tmp_path)
        # the cluster goes with the test: its workers need no warm shutdown
        stack.callback(deployment.services.kill_all)
        return deployment

    with stack:
        yield make
