"""Faults, abuse and bad input, on the real cluster: imagesync survives them, and says what happened.

Real Redis, Celery workers, sshd, containerd and registry; nothing is mocked
where the real component runs. Every scenario asserts on what the nodes'
containerd actually holds (``Deployment.held``, ``Node.images``) and on the
run record as ``imagesync history --json RUN`` prints it.

Waits poll with deadlines. Figures worth knowing (redelivery delay, time to
fail) are printed as ``measured: ...`` lines (``pytest -s`` shows them).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from unittest import mock

import pytest
from helpers import (
    finish,
    measured,
    reported,
    run_status,
    runs_with_status,
    start_cli,
    started_run,
    wait_for,
    wait_for_run_end,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagesync import keys
from imagesync.budgets import pull_expiry, pull_time_limits, stale_after
from imagesync.celeryconfig import celery_settings
from imagesync.cli import main
from imagesync.config import load_settings
from imagesync.sync import finalize_stale
from testcluster.cluster import toml_dumps
from testcluster.process import ServerProcess, find_processes, free_port, port_open

pytestmark = pytest.mark.cluster


# -- waiting and reading ------------------------------------------------------------------




def lock_holder(d):
    with d.cluster.redis.client() as client:
        value = client.get(keys.LOCK)
    return value.decode() if value else None


def one_line(text):
    """A rich table's text with its borders and wrapping undone, to search for a message."""
    for border in "│┃┏┓┗┛┡┩└┘┌┐━─╇╈┼┳┻╋":
        text = text.replace(border, " ")
    return " ".join(text.split())


def services_logs(d):
    return "".join(path.read_text(errors="replace") for path in d.services.workdir.glob("*.log*"))


def log_times(log, pattern):
    """Wall-clock times of the Celery log lines containing ``pattern``."""
    times = []
    for line in log.splitlines():
        if pattern in line and line.startswith("["):
            stamp = line[1:24]
            times.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def received_ids(log):
    """Task ids in the order a worker log says it received them."""
    ids = []
    for line in log.splitlines():
        if "Task imagesync.pull[" in line and line.endswith("received"):
            ids.append(line.split("[", 2)[2].split("]", 1)[0])
    return ids


# -- processes ------------------------------------------------------------------------------


def _stat(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid):
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(entry)
            if stat is not None and int(stat[1]) == pid and stat[0] != "Z":
                found.append(int(entry))
    return found


def _sockets(pid):
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _tcp_ports():
    """socket inode -> (local port, remote port), for every TCP socket on the machine."""
    ports = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            ports[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return ports


def commands_by_worker_child(worker_pid, node, pattern):
    """{prefork child of ``worker_pid``: image} for each command matching ``pattern`` that
    runs on ``node`` over an SSH connection of that child.

    The node-side process is followed up to its sshd session, whose socket's
    peer port is the child's local port.
    """
    ports = _tcp_ports()
    by_port = {}
    for process in node.processes(pattern):
        pid = process.pid
        while pid > 1 and _stat(pid) is not None:
            for inode in _sockets(pid):
                local, remote = ports.get(inode, (0, 0))
                if local == node.ssh_port:
                    by_port[remote] = process.cmdline.split()[-1]
            pid = int(_stat(pid)[1])
    found = {}
    for child in children(worker_pid):
        for inode in _sockets(child):
            local, _ = ports.get(inode, (0, 0))
            if local in by_port:
                found[child] = by_port[local]
    return found


def leftover_processes(config_path):
    """Processes still running with this configuration (a half-started worker, say)."""
    return find_processes(".", environ_contains=f"IMAGESYNC_CONFIG={config_path}")


# -- a node whose crictl misbehaves -----------------------------------------------------------


def tamper_crictl(node, extra_images=(), hang_flag=None):
    """Put a wrapper in front of the node's crictl: ``images -o json`` also lists
    ``extra_images`` (as a compromised or broken runtime might), and listing waits
    while ``hang_flag`` exists. Everything else goes to the real crictl."""
    real = node.bin_dir / "crictl.real"
    if not real.exists():
        (node.bin_dir / "crictl").rename(real)
    extra = node.workdir / "crictl-extra.json"
    extra.write_text(json.dumps(list(extra_images)))
    hang = str(hang_flag or "")
    wrapper = node.bin_dir / "crictl"
    wrapper.write_text(f"""#!{sys.executable}
import json, os, subprocess, sys, time
args, real = sys.argv[1:], {str(real)!r}
if "images" not in args:
    os.execv(real, [real, *args])
while {hang!r} and os.path.exists({hang!r}):
    time.sleep(0.1)
result = subprocess.run([real, *args], capture_output=True, text=True)
out = result.stdout
if result.returncode == 0 and "json" in args:
    listing = json.loads(out)
    with open({str(extra)!r}) as f:
        listing["images"] += json.load(f)
    out = json.dumps(listing)
sys.stdout.write(out)
sys.stderr.write(result.stderr)
sys.exit(result.returncode)
""")
    wrapper.chmod(0o755)


# == 1. a worker process killed in the middle of a pull =========================================


def test_a_pull_whose_worker_process_is_killed_is_delivered_again_and_counted_once(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1", "bcm11/b:1", "bcm11/c:1"], "node-2": []})
    d.configure(time_out=20, max_parallel=2)
    d.start()
    node, worker = d.cluster.node("node-2"), d.services.worker("node-2")
    d.cluster.proxy.delay(3)
    run_id = started_run(d.cli("sync"))

    pulling = wait_for(lambda: commands_by_worker_child(worker.pid, node, r"crictl.* pull "),
                       30, "a pull running on node-2 over a worker child's SSH connection")
    child, image = next(iter(pulling.items()))
    killed_at = time.time()
    os.kill(child, signal.SIGKILL)

    run = wait_for_run_end(d, run_id, 60)
    assert run["status"] == "completed"
    assert run["expected"] == 3
    assert sum(run["counts"].values()) == 3  # nothing missing, nothing twice
    assert sorted(r["image"] for r in run["results"]) == sorted(d.cluster.digests)
    assert {r["status"] for r in run["results"]} <= {"pulled", "present"}
    held = d.held("node-2")
    assert held == {ref: d.cluster.digests[ref] for ref in d.cluster.digests}

    log = d.services.log("worker-node-2")
    assert "WorkerLostError" in log and f"pid:{child} exited with 'signal 9 (SIGKILL)'" in log
    ids = received_ids(log)
    again = [task for task in set(ids) if ids.count(task) == 2]
    assert len(again) == 1 and len(ids) == 4, ids  # the killed pull, delivered a second time
    redelivered = log_times(log, f"Task imagesync.pull[{again[0]}] received")[1]
    measured("redelivery after SIGKILL of the prefork child (s)", round(redelivered - killed_at, 2))
    assert image in [p.ref for p in node.pulls()]
    # the node-side pull of the killed task is bounded by its own timeout
    wait_for(lambda: not node.processes(r"crictl.* pull"), 20 + 10, "no pull left on node-2")


def test_a_worker_killed_outright_has_its_pull_taken_back_by_the_next_worker_of_its_node(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1", "bcm11/b:1"], "node-2": []})
    d.configure(time_out=20, max_parallel=1)
    d.start()
    node, worker = d.cluster.node("node-2"), d.services.worker("node-2")
    d.cluster.proxy.hold()
    run_id = started_run(d.cli("sync"))
    pulling = wait_for(lambda: node.processes(r"crictl.* pull"), 30, "a pull on node-2")
    taken_ref, queued_ref = sorted(d.cluster.digests, key=lambda ref: ref not in pulling[0].cmdline)
    pool = children(worker.pid)
    os.kill(worker.pid, signal.SIGKILL)
    # billiard's children die with their parent (PR_SET_PDEATHSIG): nothing acknowledges
    wait_for(lambda: not any(alive(pid) for pid in pool), 10, "the pool processes gone")

    redis = d.cluster.redis.client()
    (tag, _delivered), = redis.zrange("unacked_index", 0, -1, withscores=True)
    message, _, queue = json.loads(redis.hget("unacked", tag))
    assert message["headers"]["task"] == "imagesync.pull" and queue == "node.node-2"
    assert redis.llen("node.node-2") == 1  # the other pull, still queued behind it
    settings_ = load_settings(d.config_path)
    visibility = celery_settings(settings_)["broker_transport_options"]["visibility_timeout"]
    assert visibility == pull_time_limits(settings_)[1] + 300 > stale_after(settings_)

    # The pull the dead worker held got as far as the node: the image is there now.
    d.cluster.proxy.release()
    wait_for(lambda: not node.processes(r"crictl.* pull"), 30, "the dead worker's pull over on node-2")
    node.pull(taken_ref)
    pulls_before = [p.ref for p in node.pulls()]

    # The visibility timeout would hand it out again after 6 minutes, past the
    # run's stale window. The node's next worker takes it back as it starts.
    restarted = time.time()
    d.services.start_worker("node-2")
    run = wait_for_run_end(d, run_id, 60)
    measured("worker killed outright: restart -> run completed (s)", round(run["finished"] - restarted, 2))
    assert run["status"] == "completed"
    outcomes = {r["image"]: (r["status"], r["attempts"]) for r in run["results"]}
    # taken back, it asked the node first: present, and no second crictl pull of it
    assert outcomes == {taken_ref: ("present", 1), queued_ref: ("pulled", 1)}, outcomes
    assert [p.ref for p in node.pulls()] == [*pulls_before, queued_ref]
    # and it ran first, ahead of the pull that was still queued
    assert received_ids(d.services.log("worker-node-2"))[0] == message["headers"]["id"]
    assert set(d.cluster.digests) <= set(d.held("node-2"))
    assert not redis.hexists("unacked", tag)
    assert "took back 1 unacknowledged pulls of node.node-2" in d.services.log("worker-node-2")
    redis.close()


def test_a_worker_of_another_node_leaves_unacknowledged_pulls_alone(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": []})
    d.configure(time_out=20, max_parallel=1)
    d.start(nodes=["node-1"])
    d.cluster.proxy.delay(3)
    # a pull held by node-2's (dead) worker: in kombu's unacked hash, not in its queue
    redis = d.cluster.redis.client()
    run_id = started_run(d.cli("sync"))
    d.services.start_worker("node-2")
    node = d.cluster.node("node-2")
    wait_for(lambda: node.processes(r"crictl.* pull"), 30, "a pull on node-2")
    worker = d.services.worker("node-2")
    pool = children(worker.pid)
    os.kill(worker.pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pool), 10, "the pool processes gone")
    tags = redis.hkeys("unacked")
    assert len(tags) == 1
    # node-1's worker restarts: node-2's pull is not its to take
    d.services.stop("worker-node-1")
    d.services.start_worker("node-1")
    assert redis.hkeys("unacked") == tags and redis.llen("node.node-2") == 0
    assert run_status(d, run_id) == "running"
    redis.close()


# == 2. Redis restarted in the middle of a run =================================================


def test_a_redis_restart_mid_run_loses_no_outcome_and_frees_the_lock(deploy):
    d = deploy(nodes=2)
    images = [f"bcm11/app{i}:1" for i in range(4)]
    d.cluster.seed({"node-1": images, "node-2": []})
    d.configure(time_out=10, max_parallel=2)
    d.start()
    node = d.cluster.node("node-2")
    d.cluster.proxy.delay(3)
    run_id = started_run(d.cli("sync"))
    wait_for(lambda: len(node.processes(r"crictl.* pull ")) >= 2, 30, "two pulls on node-2")

    # Down long enough that pulls finish and report while it is away (the
    # reports wait for it), then back with the data of its AOF.
    down = time.monotonic()
    d.cluster.redis.stop()
    wait_for(lambda: any(p.end for p in node.pulls()), 20, "a pull ending while Redis is down")
    d.cluster.redis.start()
    measured("Redis outage (s)", round(time.monotonic() - down, 2))

    run = wait_for_run_end(d, run_id, 60)
    assert run["status"] == "completed", run
    assert run["counts"] == {"pulled": 4}
    assert len(run["results"]) == 4
    assert lock_holder(d) is None
    assert len(d.held("node-2")) == 4
    # the stale check has nothing to do with a finished run, even much later
    assert finalize_stale(load_settings(d.config_path), d.cluster.redis.client(), now=time.time() + 3600) == []
    again = d.cli("sync", "--wait")
    assert again.returncode == 0 and "every node already holds every image" in again.stdout


# == 3. the process holding the lock dies ========================================================


def test_a_lock_whose_holder_died_expires_and_the_next_scheduled_run_proceeds(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": []})
    node = d.cluster.node("node-2")
    hang = node.workdir / "hang-listing"
    hang.touch()
    tamper_crictl(node, hang_flag=hang)
    d.configure(time_out=8, schedule=10)
    d.start()
    ttl = stale_after(load_settings(d.config_path))
    control = d.services.processes["control"]

    # A sync that takes the lock, then sticks listing node-2's images.
    trigger = start_cli(d, "sync")
    holder = wait_for(lambda: lock_holder(d), 30, "the lock taken")
    sync_child = wait_for(lambda: commands_by_worker_child(control.pid, node, r"crictl.* images"),
                          30, "the sync task listing node-2")
    os.kill(next(iter(sync_child)), signal.SIGKILL)
    hang.unlink()

    # The sync is delivered again (acks_late) and finds the lock held, as does every trigger.
    answer = finish(trigger, 60)
    assert answer.returncode == 3, answer.stdout + answer.stderr
    assert f"already running: run {holder} holds the lock" in answer.stderr
    assert lock_holder(d) == holder
    assert d.history() == []  # the dead run never got as far as a record

    # The dead holder's lock lives stale_after, from its last renewal.
    with d.cluster.redis.client() as client:
        left = client.ttl(keys.LOCK)
    assert 0 < left <= ttl, (left, ttl)
    measured("lock TTL (stale_after) with time_out=8 (s)", ttl)

    # Beat's triggers find the lock held while it lives...
    d.services.start_beat(due=("sync",))
    wait_for(lambda: "this beat trigger does nothing" in d.services.log("control"), 60,
             "beat's sync refused by the live lock")
    assert d.history() == [] and lock_holder(d) == holder

    # ...and the first one after it expired (time passes: the TTL is cut short) runs.
    with d.cluster.redis.client() as client:
        client.expire(keys.LOCK, 1)
    expired_at = time.time()
    new_run = d.history(wait_for(lambda: runs_with_status(d, "completed"), 60, "a beat run after the lock expired")[0])
    assert new_run["trigger"] == "beat" and new_run["id"] != holder
    assert new_run["started"] >= expired_at, "a run started while the dead holder's lock was live"
    assert new_run["counts"] == {"pulled": 1}, new_run
    assert d.cluster.ref("bcm11/a:1") in d.held("node-2")
    assert lock_holder(d) is None


# == 4. a node going down in the middle of a run =================================================


def test_nodes_going_down_mid_run_end_their_pulls_with_a_reason_and_the_others_finish(deploy):
    d = deploy(nodes=4)
    images = [f"bcm11/app{i}:1" for i in range(4)]
    d.cluster.seed({"node-1": images, "node-2": [], "node-3": [], "node-4": []})
    d.configure(time_out=10, max_parallel=1, retries=1)
    d.start()
    vanished, no_runtime = d.cluster.node("node-3"), d.cluster.node("node-4")
    d.cluster.proxy.delay(1.5)
    sync = start_cli(d, "sync", "--wait")
    for node in (vanished, no_runtime):
        wait_for(lambda node=node: node.processes(r"crictl.* pull "), 30, f"a pull on {node.name}")
    went_down = time.monotonic()
    take_down(vanished)  # the whole node: connections, sshd, what it ran, containerd
    no_runtime.stop_containerd()  # sshd still answers
    result = finish(sync)
    measured("nodes down to the end of the run (s)", round(time.monotonic() - went_down, 1))
    assert result.returncode == 1, result.stdout + result.stderr

    run = d.history(started_run(result))
    assert run["status"] == "completed"
    assert sum(run["counts"].values()) == run["expected"] == 12
    assert len(d.held("node-2")) == 4
    summary = one_line(result.stdout)
    for node in (vanished, no_runtime):
        lost = [r for r in run["results"] if r["node"] == node.name and r["status"] not in ("pulled", "present")]
        assert lost, run["results"]
        for outcome in lost:
            assert outcome["status"] == "failed", outcome
            assert f"{node.name}: {outcome['image']} failed: {outcome['reason'][:40]}" in summary
            if node is vanished:
                # the pull cut short is tried again, and that attempt finds the node gone
                assert outcome["attempts"] == 2, outcome
                assert outcome["reason"].startswith("Cannot connect to node-3 via SSH ("), outcome
                assert "connection refused): check that the node is up and sshd is running" in outcome["reason"]
            else:
                assert "rpc error: code = Unavailable" in outcome["reason"], outcome
                assert "containerd.sock" in outcome["reason"], outcome
    assert no_runtime.processes(r"crictl.* pull") == []


def test_queued_pulls_for_a_node_whose_worker_is_down_expire_and_the_run_says_so(deploy):
    d = deploy(nodes=3)
    images = [f"bcm11/app{i}:1" for i in range(3)]
    d.cluster.seed({"node-1": images, "node-2": [], "node-3": []})
    d.configure(time_out=10, max_parallel=1)
    d.start(nodes=["node-1", "node-2"])  # node-3 is up, its worker is not
    run_id = started_run(d.cli("sync"))
    wait_for(lambda: reported(d, run_id) == 3, 60, "node-2's pulls reported")
    settings_ = load_settings(d.config_path)

    # node-3's pulls wait in its queue, each with the expiry the run gave it
    redis = d.cluster.redis.client()
    queued = [json.loads(m) for m in redis.lrange("node.node-3", 0, -1)]
    assert len(queued) == 3
    run = d.history(run_id)
    for message in queued:
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert abs(kwargs["deadline"] - run["started"] - pull_expiry(settings_, 3)) < 5
    measured("expiry of 3 queued pulls, max_parallel=1, time_out=10 (s)", pull_expiry(settings_, 3))

    # Nothing reports for node-3: the stale check ends the run once stale_after has passed
    assert run["status"] == "running" and lock_holder(d) == run_id
    later = time.time() + stale_after(settings_) + 1
    assert finalize_stale(settings_, redis, now=later) == [run_id]
    assert lock_holder(d) is None
    run = d.history(run_id)
    assert run["status"] == "abandoned" and run["counts"] == {"pulled": 3}
    assert "no pull reported for" in run["reason"]
    summary = d.cli("history", run_id).stdout
    assert "node node-3: 3 pulls never reported (worker or node down?)" in one_line(summary)
    redis.close()


def take_down(node):
    """The node vanishes: its SSH connections drop, then sshd, what it ran and containerd stop."""
    ports = _tcp_ports()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and any(ports.get(inode, (0, 0))[0] == node.ssh_port for inode in _sockets(entry)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
    node.stop()


# == 5. the registry down, or hanging ============================================================


def test_a_registry_that_is_down_fails_pulls_fast_and_one_that_hangs_ends_them_at_time_out(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1", "bcm11/b:1"], "node-2": []})
    # the registry's own failures first: no copying from node-1, which holds both
    d.configure(time_out=5, max_parallel=2, retries=2, transfer=False)
    d.start()
    node = d.cluster.node("node-2")

    d.cluster.registry.stop()
    began = time.monotonic()
    result = d.cli("sync", "--wait")
    measured("registry down: sync --wait until the run ended, retries=2 (s)", round(time.monotonic() - began, 1))
    assert result.returncode == 1
    run = d.history(started_run(result))
    assert run["counts"] == {"failed": 2}
    for outcome in run["results"]:
        assert outcome["attempts"] == 3  # transient: tried again twice, then given up
        assert "502 Bad Gateway" in outcome["reason"], outcome
    # fast: every attempt on the node ended on the registry's answer, none waited for time_out
    attempts = node.pulls()
    assert len(attempts) == 6 and {p.outcome for p in attempts} == {"error"}, attempts
    assert node.processes(r"crictl.* pull") == []
    assert d.held("node-2") == {}

    d.cluster.registry.start()
    d.cluster.proxy.hang()
    began = time.monotonic()
    result = d.cli("sync", "--wait")
    measured("registry hanging: sync --wait until the run ended, time_out=5 (s)", round(time.monotonic() - began, 1))
    run = d.history(started_run(result))
    assert run["counts"] == {"timed_out": 2}
    for outcome in run["results"]:
        assert outcome["attempts"] == 1
        assert "did not finish within time_out (5 s); stopped on the node" in outcome["reason"]
    assert node.processes(r"crictl.* pull") == []
    assert node.processes(r"\btimeout\b") == []
    assert d.held("node-2") == {}

    # with transfer (the default), a registry still down after the retries hands over to node-1
    d.cluster.proxy.passthrough()
    d.cluster.registry.stop()
    d.services.stop_all()
    d.configure(time_out=20, max_parallel=2, retries=1, runtime="ctr")
    d.start()
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(started_run(result))
    assert run["counts"] == {"copied": 2}, run
    for outcome in run["results"]:
        assert outcome["attempts"] == 2 and outcome["source"] == "node-1", outcome
        assert outcome["reason"].startswith("registry: ") and "502 Bad Gateway" in outcome["reason"], outcome
    assert set(d.held("node-2")) == {d.cluster.ref("bcm11/a:1"), d.cluster.ref("bcm11/b:1")}


# == 6. transient failures are retried with backoff, permanent ones are not ====================


def test_transient_registry_errors_are_retried_with_backoff_and_permanent_ones_are_not(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/flaky:1", "bcm11/gone:1"], "node-2": []})
    d.cluster.registry.delete_image("bcm11/gone", "1")
    # the registry's answers, not a copy from node-1, are what this is about
    d.configure(time_out=10, max_parallel=2, retries=3, transfer=False)
    d.start()
    node = d.cluster.node("node-2")
    flaky = d.cluster.ref("bcm11/flaky:1")

    # 503 until two attempts have failed, then the registry is back
    d.cluster.proxy.error(503, match="/bcm11/flaky/")
    sync = start_cli(d, "sync", "--wait")
    wait_for(lambda: len([p for p in node.pulls() if p.ref == flaky and p.end]) >= 2, 60, "two failed attempts")
    d.cluster.proxy.passthrough()
    run = d.history(started_run(finish(sync)))
    by_image = {r["image"]: r for r in run["results"]}
    assert by_image[flaky]["status"] == "pulled" and by_image[flaky]["attempts"] == 3
    gone = by_image[d.cluster.ref("bcm11/gone:1")]
    assert gone["status"] == "failed" and gone["attempts"] == 1 and "not found" in gone["reason"]
    assert flaky in d.held("node-2")

    # the backoff: 2 s then 4 s nominal, each with jitter of +-50 %, and the pauses on the node
    log = d.services.log("worker-node-2")
    delays = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in log.splitlines()
              if f"{flaky} failed (" in line and "; retry " in line]
    assert len(delays) == 2
    assert 1.0 <= delays[0] <= 3.0 and 2.0 <= delays[1] <= 6.0, delays
    attempts = [p for p in node.pulls() if p.ref == flaky]
    pauses = [later.start - earlier.end for earlier, later in zip(attempts, attempts[1:], strict=False)]
    assert all(pause >= delay - 0.1 for pause, delay in zip(pauses, delays, strict=True)), (pauses, delays)
    measured("backoff delays chosen / pauses seen on the node (s)",
             f"{delays} / {[round(p, 2) for p in pauses]}")

    # 401: not retried
    d.cluster.seed({"node-1": ["bcm11/private:1"]})
    d.cluster.proxy.error(401, match="/bcm11/private/")
    run = d.history(started_run(d.cli("sync", "--wait")))
    private = {r["image"]: r for r in run["results"]}[d.cluster.ref("bcm11/private:1")]
    assert private["status"] == "failed" and private["attempts"] == 1, private
    assert "401" in private["reason"] or "unauthorized" in private["reason"].lower()
    measured("reason of a 401", private["reason"])

    # connection reset: retried, then it works
    d.cluster.proxy.passthrough()
    d.cluster.seed({"node-1": ["bcm11/rst:1"]})
    rst = d.cluster.ref("bcm11/rst:1")
    d.cluster.proxy.reset(match="/bcm11/rst/")
    sync = start_cli(d, "sync", "--wait")
    wait_for(lambda: [p for p in node.pulls() if p.ref == rst and p.end], 60, "a reset attempt")
    d.cluster.proxy.passthrough()
    run = d.history(started_run(finish(sync)))
    reset = {r["image"]: r for r in run["results"]}[rst]
    assert reset["status"] == "pulled" and reset["attempts"] == 2, reset
    retried = [line for line in d.services.log("worker-node-2").splitlines() if f"{rst} failed (" in line]
    measured("a reset, as the worker logs it", retried[0].split("] ", 1)[1])
    assert rst in d.held("node-2")


# == 7. crafted image names ======================================================================


def crafted_names(registry, marker):
    """Names a tampered node could report, each of which would leave a file in ``marker``
    (or do worse) if it ever reached a shell."""
    evil = f"{registry}/bcm11/evil"
    return [
        f"{evil}:$(touch${{IFS}}{marker}/dollar)",
        f"{evil}:`touch${{IFS}}{marker}/backtick`",
        f"{evil};touch${{IFS}}{marker}/semicolon",
        f"{evil}:1|touch${{IFS}}{marker}/pipe",
        f"{evil}:1&&touch${{IFS}}{marker}/and",
        f"{evil}:1>{marker}/redirect",
        f"{evil}:1\ntouch${{IFS}}{marker}/newline",
        f"{evil}@sha256:$(touch${{IFS}}{marker}/digest)",
        f"--image-endpoint=unix://{marker}/socket",
        f"{registry}/bcm11/{'a' * 4000}:1",
        f"{registry}/bcm11/évil:1",
    ]


def pulled_repositories(d):
    """Repositories whose manifests any node asked the registry for."""
    return {r.path.removeprefix("/v2/").split("/manifests/")[0] for r in d.cluster.proxy.requests
            if r.kind == "manifest"}


def shown(name):
    """How a refused name is shown: cut at 80 characters."""
    return name if len(name) <= 80 else name[:77] + "..."


def test_an_unexpected_error_listing_one_node_skips_that_node_and_the_others_converge(deploy):
    d = deploy(nodes=3)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": ["nvidia/b:1"], "node-3": []})
    # node-2's runtime answers with a listing whose entry is no image at all
    tamper_crictl(d.cluster.node("node-2"), extra_images=["not an image"])
    d.configure()
    d.start()
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(started_run(result))
    assert run["status"] == "completed" and list(run["skipped"]) == ["node-2"], run
    assert run["skipped"]["node-2"].startswith("unexpected error listing images on node-2: AttributeError"), run
    # the others converge; node-2's images are not wanted while its listing cannot be read
    assert run["expected"] == 1 and run["counts"] == {"pulled": 1}, run
    assert d.held("node-3") == d.held("node-1") == {d.cluster.ref("bcm11/a:1"): d.cluster.digests[
        d.cluster.ref("bcm11/a:1")]}


@pytest.mark.parametrize("runtime", ["crictl", "ctr"])
def test_crafted_image_names_from_a_node_are_refused_and_never_run(deploy, tmp_path, runtime):
    d = deploy(nodes=2, runtime=runtime)
    marker = tmp_path / "markers"
    marker.mkdir()
    good = d.cluster.seed({"node-1": ["bcm11/good:1"], "node-2": []})["node-1"][0]
    source = d.cluster.node("node-1")
    names = crafted_names(d.cluster.registry_address, marker)
    if runtime == "crictl":
        # the CRI lists only names it can parse: a tampered crictl reports the rest
        tamper_crictl(source, [{"id": "sha256:" + "e" * 64, "repoTags": [n for n in names if "@" not in n],
                                "repoDigests": [n for n in names if "@" in n], "size": "1",
                                "uid": None, "username": "", "spec": None, "pinned": False}])
        reported = names
    else:
        # containerd's image store takes any name: tag the real image with them
        for name in names:
            source.run(["ctr", "-a", source.socket, "-n", "k8s.io", "images", "tag", good, name])
        # ctr's table shows a name with a newline on two lines, the second one parsed as a name
        reported = [n.split("\n")[-1] for n in names]
    d.configure(runtime=runtime)

    plan = json.loads(d.cli("plan", "--json").stdout)
    refused = {(r["node"], r["reference"]) for r in plan["refused"]}
    assert {("node-1", shown(n)) for n in reported} <= refused
    assert plan["missing"] == {"node-2": [good]}

    d.start()
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(started_run(result))
    assert {(r["node"], r["reference"]) for r in run["refused"]} == refused
    assert run["expected"] == 1 and run["counts"] == {"pulled": 1}
    assert "refused image name from node-1" in result.stdout
    assert set(d.cluster.node("node-2").images()) <= {good, good.rsplit(":", 1)[0] + "@" + d.cluster.digests[good]}
    assert pulled_repositories(d) == {"bcm11/good"}
    assert list(marker.iterdir()) == []
    # the names reach the logs escaped, one line per refusal
    main_log = "".join(p.read_text() for p in d.cluster.log_dir.glob("*/image-sync.log"))
    assert not any(line.startswith("touch") for line in main_log.splitlines())

    # A forged pull message carrying the names (someone with access to Redis) is refused too,
    # and reported into the run it names (a run id of imagesync's grammar: another is refused unreported).
    forged = "20261204-000000-f0f0f0"
    send = ("import json, sys; from imagesync.tasks import send_pull\n"
            f"for name in json.load(sys.stdin): send_pull('node-2', name, '{forged}', 600)")
    subprocess.run([sys.executable, "-c", send], input=json.dumps(names), text=True, check=True, timeout=60,
                   env={**os.environ, "IMAGESYNC_CONFIG": str(d.config_path)})

    def forged_lines():
        text = "".join(p.read_text() for p in d.cluster.log_dir.glob("*/failed_images.log"))
        return [line for line in text.splitlines() if f" run={forged} " in line]

    lines = wait_for(lambda: len(forged_lines()) >= len(names) and forged_lines(), 60, "the forged pulls reported")
    assert len(lines) == len(names)  # one line each: no name split a line in two
    assert all("status=failed" in line and 'reason="refused: ' in line for line in lines), lines
    failed_log = "".join(p.read_text() for p in d.cluster.log_dir.glob("*/failed_images.log"))
    assert not any(line.startswith("touch") for line in failed_log.splitlines())
    assert list(marker.iterdir()) == []
    assert pulled_repositories(d) == {"bcm11/good"}


# == 8. SSH host keys ============================================================================


def test_changed_and_unknown_host_keys_are_refused_with_what_to_do_and_accept_new_takes_only_unknown(deploy):
    d = deploy(nodes=3)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": ["bcm11/b:1"], "node-3": ["bcm11/c:1"]})
    changed, unknown = d.cluster.node("node-2"), d.cluster.node("node-3")
    known_hosts = d.cluster.known_hosts
    changed.regenerate_host_key()
    known_hosts.write_text("".join(line + "\n" for line in known_hosts.read_text().splitlines()
                                   if f"]:{unknown.ssh_port} " not in line))
    d.configure()
    wide = {"COLUMNS": "1000"}
    changed_message = (f"host key of [127.0.0.1]:{changed.ssh_port} does not match {known_hosts} "
                       "(reinstalled node, or someone in between): if the change is expected, run "
                       f"ssh-keygen -R '[127.0.0.1]:{changed.ssh_port}' -f {known_hosts} and add the new key")
    unknown_message = (f"host key of [127.0.0.1]:{unknown.ssh_port} is not in {known_hosts}: add it with "
                       f"ssh-keyscan -p {unknown.ssh_port} 127.0.0.1 >> {known_hosts} (after checking it), "
                       'or set ssh.host_key_policy = "accept-new"')

    check = d.cli("check", env=wide)
    assert check.returncode == 1
    rows = {line.split("│")[1].strip(): line for line in check.stdout.splitlines() if line.startswith("│")}
    assert changed_message in rows["node-2"] and "FAILED" in rows["node-2"]
    assert unknown_message in rows["node-3"] and "FAILED" in rows["node-3"]
    assert "2 of 3 nodes failed the check: node-2, node-3" in check.stderr

    d.start()
    result = d.cli("sync", "--wait", env=wide)
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(started_run(result))
    assert run["skipped"] == {"node-2": changed_message, "node-3": unknown_message}
    assert f"node-2 skipped: {changed_message}" in result.stdout
    only_a = d.cluster.ref("bcm11/a:1")
    assert run["expected"] == 0 and d.held("node-1") == {only_a: d.cluster.digests[only_a]}

    # accept-new: the unknown key is taken and written down; the changed one is still refused
    d.services.stop_all()
    d.configure(ssh={"host_key_policy": "accept-new"})
    check = d.cli("check", env=wide)
    rows = {line.split("│")[1].strip(): line for line in check.stdout.splitlines() if line.startswith("│")}
    assert "FAILED" not in rows["node-3"] and "crictl ok" in rows["node-3"]
    assert changed_message in rows["node-2"]
    assert unknown.known_hosts_line() in known_hosts.read_text().splitlines()
    assert changed.known_hosts_line() not in known_hosts.read_text().splitlines()
    d.start()
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(started_run(result))
    assert run["skipped"] == {"node-2": changed_message}
    assert len(d.held("node-1")) == len(d.held("node-3")) == 2
    assert d.held("node-2") == {d.cluster.ref("bcm11/b:1"): d.cluster.digests[d.cluster.ref("bcm11/b:1")]}


# == 9. secrets: Flower's credentials, a Redis password, TLS ======================================


def http_get(url, auth=None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_flower_asks_for_credentials_and_no_secret_shows_anywhere(deploy):
    password = "redis-" + secrets.token_hex(12)
    flower = ("admin", "flower-" + secrets.token_hex(12))
    login = ("robot", "registry-" + secrets.token_hex(12))
    d = deploy(nodes=2, redis_password=password, registry_login=login)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": []})
    password_file = d.workdir / "registry-password"
    password_file.write_text(login[1] + "\n")
    d.configure(registries={d.cluster.registry_address: {"username": login[0], "password_file": str(password_file)}})
    assert password in d.config_path.read_text()  # in redis_url, as an operator writes it
    d.start()
    d.services.start_flower(*flower)
    base = f"http://127.0.0.1:{d.services.flower_port}"
    for path in ("/", "/tasks", "/broker", "/api/tasks", "/api/workers"):
        assert http_get(base + path)[0] == 401, path
        assert http_get(base + path, ("admin", "wrong"))[0] == 401, path

    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr  # the password works end to end
    run_id = started_run(result)
    assert d.cluster.ref("bcm11/a:1") in d.held("node-2")

    status, tasks = wait_for(lambda: (lambda answer: answer[0] == 200 and "imagesync.pull" in answer[1] and answer)(
        http_get(f"{base}/api/tasks", flower)), 60, "the pull in Flower")
    assert d.cluster.ref("bcm11/a:1") in tasks  # task arguments are shown...
    seen = {"flower /api/tasks": tasks}
    for path in ("/api/workers?refresh=1", "/broker", "/tasks", "/workers"):
        seen[f"flower {path}"] = http_get(base + path, flower)[1]
    seen["flower /metrics (no auth)"] = http_get(base + "/metrics")[1]
    seen["config show"] = d.cli("config", "show", env={"COLUMNS": "1000"}).stdout
    seen["history --json"] = json.dumps(d.history(run_id))
    seen["history"] = d.cli("history").stdout
    for path in sorted(p for p in d.cluster.log_dir.rglob("*") if p.is_file()):
        seen[str(path)] = path.read_text(errors="replace")
    seen["worker, control and flower logs"] = services_logs(d)
    for where, text in seen.items():
        assert password not in text, f"the Redis password shows in {where}"
        assert flower[1] not in text, f"Flower's password shows in {where}"
        assert login[1] not in text, f"the registry password shows in {where}"
    assert "redis://:****@127.0.0.1" in seen["config show"]


def make_certificates(folder):
    """A private CA and a certificate for 127.0.0.1 signed by it (openssl)."""
    folder.mkdir(parents=True)

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=imagesync test CA")
    openssl("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.cnf")
    return folder


@pytest.fixture
def tls_redis(tmp_path):
    """redis-server with TLS only (no plain port) and a password; yields (port, password, CA file)."""
    certs = make_certificates(tmp_path / "tls")
    port, password = free_port(), "tls-" + secrets.token_hex(12)
    server = ServerProcess("redis-server (TLS)", [
        "redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
        "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "no",
        "--requirepass", password, "--dir", str(certs), "--save", "", "--appendonly", "no",
        "--maxmemory-policy", "noeviction", "--daemonize", "no",
    ], certs / "redis.log")
    server.start()
    try:
        server.wait_ready(lambda: port_open(port), 15)
        yield port, password, certs / "ca.crt"
    finally:
        server.stop()


def test_a_rediss_url_with_a_private_ca_works_end_to_end(deploy, tls_redis):
    import redis

    port, password, ca = tls_redis
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": []})
    d.configure(redis_url=url)
    d.start()
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(started_run(result))
    assert run["status"] == "completed" and run["counts"] == {"pulled": 1}
    assert d.cluster.ref("bcm11/a:1") in d.held("node-2")
    with redis.Redis.from_url(url) as client:
        assert client.exists(keys.run(run["id"]))  # the run went over TLS...
    with d.cluster.redis.client() as plain:
        assert plain.keys("imagesync:*") == []  # ...and nowhere else

    # A client that cannot verify the server, or does not speak TLS, says so in one line.
    for wrong, reason in ((url.replace(f"&ssl_ca_certs={ca}", ""), "certificate verify failed"),
                          (url.split("?")[0].replace("rediss://", "redis://"), "")):
        answer = d.cli("history", env={"IMAGESYNC_REDIS_URL": wrong})
        assert answer.returncode == 1
        assert answer.stderr.startswith("imagesync: cannot reach Redis at "), answer.stderr
        assert reason in answer.stderr
        assert "Traceback" not in answer.stderr and password not in answer.stderr
        assert len(answer.stderr.strip().splitlines()) == 1, answer.stderr
    # TLS options on a plain redis:// URL are a configuration error
    answer = d.cli("history", env={"IMAGESYNC_REDIS_URL": url.replace("rediss://", "redis://")})
    assert answer.returncode == 2
    assert answer.stderr.startswith(f"imagesync: IMAGESYNC_REDIS_URL: 'redis://:****@127.0.0.1:{port}/0?")
    assert answer.stderr.endswith(": ssl_ca_certs is a TLS option: use a rediss:// URL\n")
    services = services_logs(d)
    assert password not in services


# == 10. bad configuration through the real entry points =========================================


ENTRY_POINTS = {
    "imagesync worker --node node-1": ["-m", "imagesync.cli", "worker", "--node", "node-1"],
    "imagesync sync": ["-m", "imagesync.cli", "sync"],
    "imagesync beat": ["-m", "imagesync.cli", "beat"],
    "celery -A imagesync worker": ["-m", "celery", "-A", "imagesync", "worker", "-Q", "node.node-1"],
    "celery -A imagesync beat": ["-m", "celery", "-A", "imagesync", "beat"],
}

#: what celery prints itself before imagesync stops a worker started as root
_ROOT_WARNING = ("SecurityWarning: You're running the worker with superuser privileges", "absolutely not recommended",
                 "Please specify a different user", "User information: uid=0", "_warn_or_raise_security_error")


def _base_config(tmp_path):
    key = tmp_path / "id_test"
    key.write_text("not used: the configuration fails first\n")
    return {
        "prefixes": ["bcm11"],
        "time_out": 60,
        "log_dir": str(tmp_path / "logs"),
        "redis_url": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: nothing may get that far
        "ssh": {"key_file": str(key), "connect_timeout": 5},
        "nodes": [{"name": "node-1", "host": "127.0.0.1", "port": 1}],
    }


BAD_CONFIGS = {
    "wrong types": (lambda c: c.update(max_parallel="four", prefixes="bcm11", history=[1]),
                    ["max_parallel: 'four' is not a whole number of pulls", "prefixes: 'bcm11' is not a list",
                     "history: a list is not a whole number of runs"]),
    "no nodes": (lambda c: c.pop("nodes"), ["nodes: no nodes are configured"]),
    "duplicate node names": (lambda c: c["nodes"].append(dict(c["nodes"][0])),
                             ["nodes[1].name: 'node-1' is the name of another node too"]),
    "empty prefix": (lambda c: c.update(prefixes=["", "bcm11"]), ["prefixes[0]: empty value: write an image prefix"]),
    "nothing to sync": (lambda c: c.update(prefixes=[]), ["no prefixes and no images are configured"]),
    "missing key file": (lambda c: c["ssh"].update(key_file="/nonexistent/id_ed25519"),
                         ["ssh.key_file: '/nonexistent/id_ed25519' does not exist"]),
    "non-numeric timeouts": (lambda c: (c.update(time_out="soon"), c["ssh"].update(connect_timeout="fast")),
                             ["time_out: 'soon' is not a whole number of seconds",
                              "ssh.connect_timeout: 'fast' is not a number of seconds"]),
    # only the processes that write logs need log_dir
    "log_dir not writable": (lambda c: c.update(log_dir="/proc/imagesync-logs"), ["log_dir: cannot write to /proc/"],
                             [name for name in ENTRY_POINTS if name != "imagesync sync"]),
    "unusable redis_url": (lambda c: c.update(redis_url="redis://:pw@127.0.0.1:70000/0"),
                           ["redis_url: 'redis://:****@127.0.0.1:70000/0': Port out of range 0-65535: fix the URL"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_configuration_stops_every_entry_point_with_one_clean_listing(tmp_path, case):
    change, expected, *entry_points = BAD_CONFIGS[case]
    config = _base_config(tmp_path)
    change(config)
    path = tmp_path / "imagesync.toml"
    path.write_text(toml_dumps(config))
    env = {**os.environ, "IMAGESYNC_CONFIG": str(path)}
    env.pop("COLUMNS", None)

    def run(name):
        return name, subprocess.run([sys.executable, *ENTRY_POINTS[name]], env=env, cwd=tmp_path,
                                    capture_output=True, text=True, timeout=60)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(run, entry_points[0] if entry_points else ENTRY_POINTS))
    for name, result in results.items():
        lines = [line for line in result.stderr.splitlines()
                 if line.strip() and not any(noise in line for noise in _ROOT_WARNING)]
        assert result.returncode == 2, f"{name}: exit {result.returncode}\n{result.stderr}"
        assert "Traceback" not in result.stderr, f"{name}:\n{result.stderr}"
        assert lines and all(line.startswith("imagesync: ") for line in lines), f"{name}:\n{result.stderr}"
        for problem in expected:
            assert any(problem in line for line in lines), f"{name}: no {problem!r} in\n{result.stderr}"
    assert leftover_processes(path) == []  # no worker half started


def test_an_unknown_node_or_a_bad_override_stops_the_worker_before_celery_starts(tmp_path):
    path = tmp_path / "imagesync.toml"
    path.write_text(toml_dumps(_base_config(tmp_path)))
    env = {**os.environ, "IMAGESYNC_CONFIG": str(path)}
    unknown = subprocess.run([sys.executable, "-m", "imagesync.cli", "worker", "--node", "node-9"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2
    assert unknown.stderr == "imagesync: no node named 'node-9' in the configuration; known nodes: node-1\n"
    override = subprocess.run([sys.executable, "-m", "celery", "-A", "imagesync", "worker"],
                              env={**env, "IMAGESYNC_TIME_OUT": "ten", "IMAGESYNC_TIMEOUT": "10"},
                              capture_output=True, text=True, timeout=60)
    assert override.returncode == 2
    assert override.stderr.splitlines() == [
        "imagesync: IMAGESYNC_TIME_OUT: 'ten' is not a whole number of seconds",
        "imagesync: unknown environment variable IMAGESYNC_TIMEOUT: did you mean IMAGESYNC_TIME_OUT?",
    ]
    assert leftover_processes(path) == []


_values = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=False),
                    st.text(max_size=12), st.lists(st.text(max_size=8), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(["prefixes", "images", "time_out", "max_parallel", "schedule",
                                                "redis_url", "history", "retries", "nodes", "ssh", "log_dir"]),
                               _values, max_size=4),
       node=st.dictionaries(st.sampled_from(["name", "host", "port", "user", "runtime", "transport", "endpoint"]),
                            _values, max_size=3))
def test_the_cli_answers_any_configuration_with_a_table_or_plain_problems(tmp_path, changes, node):
    config = _base_config(tmp_path)
    config["log_dir"] = str(tmp_path / "logs")
    for key, value in changes.items():
        if key == "log_dir":
            continue  # the worker would create it anywhere
        config[key] = value
    if isinstance(config.get("nodes"), list) and config["nodes"] and isinstance(config["nodes"][0], dict):
        config["nodes"][0].update({k: v for k, v in node.items() if v is not None})
    path = tmp_path / "fuzz.toml"
    path.write_text(toml_dumps({k: v for k, v in config.items() if v is not None}))
    for argv in (["-c", str(path), "config", "show"], ["-c", str(path), "sync", "--node", "no-such-node"]):
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        assert code in (0, 2), (argv, code, err.getvalue())
        if code == 2:
            assert err.getvalue() and all(line.startswith("imagesync: ") for line in err.getvalue().splitlines())
        assert "Traceback" not in err.getvalue()
    assert code == 2  # no node is called no-such-node


# == 11. a node whose disk is full ===============================================================


def test_a_node_whose_disk_is_full_fails_the_pull_with_the_runtimes_reason(deploy):
    d = deploy(nodes=3)
    small, big = d.cluster.ref("bcm11/small:1"), d.cluster.ref("bcm11/big:1")
    d.cluster.seed({"node-1": ["bcm11/big:1"]}, size=3 * 1024 * 1024)
    d.cluster.seed({"node-1": ["bcm11/small:1"]}, size=1024)
    full = d.cluster.node("node-2")
    root = full.workdir / "containerd" / "root"
    # node-2's containerd, moved onto a 2 MiB tmpfs: the 3 MiB image cannot fit
    full.stop_containerd()
    subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "imagesync-full-disk", str(root)], check=True)
    try:
        full.start_containerd()
        # a disk the room check cannot see (its image_fs names no filesystem): the runtime finds it full
        d.configure(time_out=20, max_parallel=1, nodes_extra={"node-2": {"image_fs": "/nonexistent"}})
        d.start()
        result = d.cli("sync", "--wait")
        assert result.returncode == 1
        run = d.history(started_run(result))
        outcomes = {(r["node"], r["image"]): r for r in run["results"]}
        failed = outcomes[("node-2", big)]
        assert failed["status"] == "failed" and failed["attempts"] == 1  # retrying cannot help
        assert "no space left on device" in failed["reason"], failed
        assert str(root) in failed["reason"]
        assert outcomes[("node-2", small)]["status"] == "pulled"  # what fits still comes
        assert f"node-2: {big} failed" in one_line(result.stdout)
        assert set(d.held("node-2")) == {small}
        assert set(d.held("node-3")) == {small, big}
        assert full.processes(r"crictl.* pull") == []
    finally:
        full.stop_containerd()
        subprocess.run(["umount", "-l", str(root)], check=False)


# == a busy control worker is not a missing one ==================================================


def test_the_cli_waits_for_a_control_worker_that_took_the_run_and_gives_up_on_none(deploy, tmp_path):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": []})
    d.configure()
    d.start()
    # node-1's listing hangs while the flag exists: a long inventory
    flag = tmp_path / "hang"
    flag.write_text("")
    tamper_crictl(d.cluster.node("node-1"), hang_flag=flag)
    stderr = tmp_path / "cli.err"
    with stderr.open("w") as errors:
        cli = subprocess.Popen(
            [sys.executable, "-m", "imagesync.cli", "sync", "--wait", "--timeout", "2"],
            env={**os.environ, "IMAGESYNC_CONFIG": str(d.config_path)}, stdout=subprocess.PIPE,
            stderr=errors, text=True)
        wait_for(lambda: "still listing images; waiting" in stderr.read_text(), 30,
                 "the CLI to see that the control worker took the run")
        assert cli.poll() is None  # past its 2 s, and still waiting: nothing revoked
        flag.unlink()
        out, _ = cli.communicate(timeout=120)
    assert cli.returncode == 0, stderr.read_text() + out
    assert d.cluster.ref("bcm11/a:1") in d.held("node-2")

    # no control worker at all: the CLI gives up after its wait, and the task is revoked
    d.services.stop("control")
    nobody = d.cli("sync", "--timeout", "2")
    assert nobody.returncode == 1
    assert "no control worker started the run within 2 s" in nobody.stderr


def test_a_sync_that_reached_none_of_its_target_nodes_fails_and_names_them(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": []})
    d.configure()
    d.start()
    # (before any run: no SSH connection of the control worker outlives its sshd)
    d.cluster.node("node-2").stop_sshd()
    only = d.cli("sync", "--wait", "--node", "node-2")
    assert only.returncode == 1, only.stdout + only.stderr
    assert "skipped node-2 (Cannot connect to node-2 via SSH" in one_line(only.stderr)
    assert d.cluster.ref("bcm11/a:1") not in d.held("node-2")
    # node-2 down, node-1 up: an ordinary run (node-2 skipped), nothing missed
    assert d.cli("sync", "--wait").returncode == 0
