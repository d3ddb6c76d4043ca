"""Every node-side step of a copy under the node's ``timeout``, on a real node whose containerd
hangs (stopped with SIGSTOP): the command ends on the node within its time, and no ``sh`` or
``ctr`` of it is left there once the worker's side is over. Closing an SSH channel stops
nothing on the node, so only the node's own ``timeout`` can."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from imagesync import runtimes
from imagesync.budgets import KILL_AFTER, SSH_GRACE
from imagesync.config import load_settings
from imagesync.errors import CommandTimedOut
from imagesync.transport import close_all, transport_for

pytestmark = pytest.mark.cluster

#: the steps' time budget here: a hung containerd makes each ctr wait far longer (10 s to dial)
SECONDS = 2
DIGEST = "sha256:" + "a" * 64


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A 1-node cluster holding one image, and imagesync's settings for it."""
    from testcluster.cluster import Cluster
    from testcluster.install import ensure_system_packages

    ensure_system_packages()
    workdir = tmp_path_factory.mktemp("timeouts")
    with Cluster(workdir / "cluster", nodes=1) as cluster:
        cluster.seed({"node-1": ["bcm11/app:1"]})
        settings = load_settings(cluster.write_config(workdir / "imagesync.toml"))
        close_all()  # this process's transports are kept by node name: none may lead to another cluster's node-1
        yield SimpleNamespace(cluster=cluster, node=cluster.node("node-1"), settings=settings,
                              config=settings.node("node-1"), ref=cluster.ref("bcm11/app:1"))
        close_all()


@contextmanager
def _hung(n):
    """containerd of the node stopped (SIGSTOP) for the block's duration."""
    pid = n.node.pids["containerd"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


#: a node-side process of a step: the shell, its ctr, or timeout itself
STEP = r"\bctr\b|\bsh -c\b|\btimeout\b"


def _run_on_hung_node(n, command: str):
    """Run ``command`` as a worker does (its SSH command waits the node-side time, the kill grace
    and the SSH grace); (exit status or "gave up", seconds), and what of it is left on the node."""
    started = time.monotonic()
    with _hung(n):
        try:
            result = transport_for(n.settings, n.config).run(command, timeout=SECONDS + KILL_AFTER + SSH_GRACE)
            status: int | str = result.exit_code
        except CommandTimedOut:
            status = "gave up"
        took = time.monotonic() - started
        settle = time.monotonic() + 2  # killed processes take a moment to go
        while (left := n.node.processes(STEP)) and time.monotonic() < settle:
            time.sleep(0.1)
    for process in left:  # the node for the next test
        os.kill(process.pid, signal.SIGKILL)
    return status, took, left


def test_an_import_on_a_hung_containerd_ends_on_the_node_checks_and_cleanup_included(node):
    """The import's digest checks and its clean-up ran outside ``timeout``: each ``ctr`` waited
    for containerd after the worker had given up."""
    command = runtimes.ctr_for(node.config).import_command(node.ref, DIGEST, SECONDS)
    status, took, left = _run_on_hung_node(node, command)
    assert left == [], left
    assert status in runtimes.TIMEOUT_EXIT_CODES and took < SECONDS + 2 * KILL_AFTER + 3, (status, took)


def test_an_export_on_a_hung_containerd_ends_on_the_node(node):
    command = runtimes.ctr_for(node.config).export_command(node.ref, SECONDS)
    status, took, left = _run_on_hung_node(node, command)
    assert left == [], left
    assert status in runtimes.TIMEOUT_EXIT_CODES and took < SECONDS + KILL_AFTER + 3, (status, took)


def test_a_presence_check_answers_or_times_out_on_the_node(node):
    ctr, transport = runtimes.ctr_for(node.config), transport_for(node.settings, node.config)
    held = transport.run(ctr.presence_command(node.ref, 30), timeout=30 + KILL_AFTER + SSH_GRACE)
    assert (held.exit_code, held.stdout.strip()) == (0, node.cluster.digests[node.ref])
    absent = transport.run(ctr.presence_command(node.cluster.ref("bcm11/never:1"), 30), timeout=50)
    assert (absent.exit_code, absent.stdout.strip()) == (0, "")
    status, took, left = _run_on_hung_node(node, ctr.presence_command(node.ref, SECONDS))
    assert left == [], left
    assert status in runtimes.TIMEOUT_EXIT_CODES and took < SECONDS + KILL_AFTER + 3, (status, took)
