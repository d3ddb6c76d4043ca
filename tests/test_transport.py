"""Transports against a real sshd + containerd node, and on this machine."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers import wait_for

from imagesync.errors import (
    AuthenticationFailed,
    CommandTimedOut,
    ConfigError,
    HostKeyChanged,
    HostKeyUnknown,
    NodeUnreachable,
)
from imagesync.transport import PROGRESS_TAIL, LocalTransport, SSHTransport
from testcluster.cluster import Cluster
from testcluster.process import free_port


@pytest.fixture(scope="module")
def node_cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("transport"), nodes=1) as cluster:
        yield cluster


def _ssh(cluster, **kwargs):
    node = cluster.nodes[0]
    options = dict(host=node.ssh_host, port=node.ssh_port, user=node.ssh_user, key_file=node.key_file,
                   known_hosts=cluster.known_hosts, connect_timeout=3)
    options.update(kwargs)
    return SSHTransport(node.name, **options)


@pytest.mark.cluster
def test_runs_commands_with_the_nodes_environment_and_keeps_one_connection(node_cluster):
    transport = _ssh(node_cluster)
    first = transport.run("echo $CONTAINERD_ADDRESS; echo oops >&2; exit 3", timeout=10)
    assert first.stdout.strip() == node_cluster.nodes[0].socket
    assert first.stderr.strip() == "oops"
    assert first.exit_code == 3 and not first.ok
    connection = transport._connection
    assert transport.run("crictl images -o json", timeout=10).ok
    assert transport._connection is connection
    transport.close()


@pytest.mark.cluster
def test_reconnects_after_the_connection_drops(node_cluster):
    transport = _ssh(node_cluster)
    assert transport.run("true", timeout=10).ok
    node = node_cluster.nodes[0]
    node.stop_sshd()
    node.kill_session_processes()
    node.start_sshd()
    assert transport.run("echo again", timeout=10).stdout.strip() == "again"
    transport.close()


@pytest.mark.cluster
@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"port": "closed"}, NodeUnreachable, "Cannot connect to node-1 via SSH"),
        ({"key_file": "other"}, AuthenticationFailed, "ssh-copy-id"),
        ({"known_hosts": "empty"}, HostKeyUnknown, "ssh-keyscan"),
    ],
)
def test_connection_errors_become_one_clear_error(node_cluster, tmp_path, options, error, words):
    from testcluster.node import generate_key

    if options.get("port") == "closed":
        options["port"] = free_port()
    if options.get("key_file") == "other":
        options["key_file"] = generate_key(tmp_path / "other_key", "stranger")
    if options.get("known_hosts") == "empty":
        options["known_hosts"] = tmp_path / "known_hosts"
        options["known_hosts"].write_text("")
    transport = _ssh(node_cluster, **options)
    with pytest.raises(error) as caught:
        transport.run("true", timeout=10)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.cluster
def test_host_key_policies(node_cluster, tmp_path):
    node = node_cluster.nodes[0]
    known_hosts = tmp_path / "known_hosts"
    transport = _ssh(node_cluster, known_hosts=known_hosts, host_key_policy="accept-new")
    assert transport.run("true", timeout=10).ok
    transport.close()
    assert f"[127.0.0.1]:{node.ssh_port} ssh-ed25519" in known_hosts.read_text()
    node.regenerate_host_key()
    try:
        for policy in ("accept-new", "reject"):
            with pytest.raises(HostKeyChanged, match="does not match"):
                _ssh(node_cluster, known_hosts=known_hosts, host_key_policy=policy).run("true", timeout=10)
    finally:
        node_cluster.known_hosts.write_text(node.known_hosts_line() + "\n")


@pytest.mark.cluster
def test_accept_new_records_in_a_file_that_keeps_the_key(node_cluster, tmp_path, monkeypatch):
    node = node_cluster.nodes[0]
    # no known_hosts given: ssh's own, ~/.ssh/known_hosts, where the key stays for the next connection
    monkeypatch.setenv("HOME", str(tmp_path))
    transport = _ssh(node_cluster, known_hosts=None, host_key_policy="accept-new")
    assert transport.known_hosts == tmp_path / ".ssh" / "known_hosts"
    assert transport.run("true", timeout=10).ok
    transport.close()
    assert transport.known_hosts.read_text() == node.known_hosts_line() + "\n"
    # a file that keeps nothing would take any key, a changed one too, on every connection: refused
    for forgetful in (Path(os.devnull), tmp_path):
        with pytest.raises(ConfigError, match=f"^invalid configuration: known_hosts {forgetful} of {node.name} "
                                              "keeps nothing, so ssh.host_key_policy = \"accept-new\" would"):
            _ssh(node_cluster, known_hosts=forgetful, host_key_policy="accept-new")
    assert _ssh(node_cluster, known_hosts=Path(os.devnull), host_key_policy="reject").known_hosts == Path(os.devnull)


@pytest.mark.cluster
def test_a_command_past_its_timeout_raises(node_cluster):
    transport = _ssh(node_cluster)
    began = time.monotonic()
    with pytest.raises(CommandTimedOut):
        transport.run("sleep 30", timeout=1)
    # raised at its timeout, not once the command had ended
    assert time.monotonic() - began < 30
    assert transport.run("echo fine", timeout=10).stdout.strip() == "fine"


@pytest.mark.cluster
def test_threads_run_their_commands_on_one_connection_at_once(node_cluster, tmp_path):
    # a worker whose pool is threads: a node's pulls share its connection, each on a channel;
    # every command waits until all of them have started, so none may wait for another to end
    transport, threads = _ssh(node_cluster), 6
    meeting = f"/tmp/imagesync-meet-{os.getpid()}"
    command = (f"mkdir -p {meeting}; touch {meeting}/$$; for i in $(seq 100); do "
               f"[ $(ls {meeting} | wc -l) -ge {threads} ] && exit 0; sleep 0.1; done; exit 1")
    transport.run(f"rm -rf {meeting}", timeout=10)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda _: transport.run(command, timeout=30), range(threads)))
    assert [r.exit_code for r in results] == [0] * threads
    connection = transport._connection
    assert transport.run(f"rm -rf {meeting}", timeout=10).ok and transport._connection is connection
    transport.close()


@pytest.mark.cluster
def test_a_command_that_times_out_leaves_the_other_threads_commands_running(node_cluster):
    from concurrent.futures import ThreadPoolExecutor

    transport = _ssh(node_cluster)
    assert transport.run("true", timeout=10).ok
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(transport.run, "sleep 3; echo finished", 30)
        with pytest.raises(CommandTimedOut):
            transport.run("sleep 30", timeout=1)
        assert not other.done()  # the two ran at once
        # its channel closed, not the connection that carries the other command
        assert other.result().stdout.strip() == "finished"
    transport.close()


@pytest.mark.cluster
def test_a_command_of_a_task_gives_up_at_the_tasks_time_limit(node_cluster):
    # a worker whose pool is threads: no signal stops the task at its soft limit, so its
    # commands wait on their channels no longer than that (imagesync.timelimits)
    from imagesync.timelimits import Watchdog

    transport, limits = _ssh(node_cluster), Watchdog(RuntimeError)  # not started: the deadline alone
    limits.began("t1", "imagesync.pull", soft=2, hard=30)
    began = time.monotonic()
    try:
        with pytest.raises(CommandTimedOut):
            transport.run("sleep 30", timeout=60)
    finally:
        limits.ended()
    assert time.monotonic() - began < 20
    assert transport.run("echo fine", timeout=10).stdout.strip() == "fine"  # the next task has no limit left
    transport.close()


@pytest.mark.cluster
def test_a_connection_keeps_no_record_of_every_command_it_ever_ran(node_cluster, monkeypatch):
    # paramiko records every channel id a connection used; a worker's connection to a
    # node runs a command per pull for months: its record is bounded
    from imagesync.transport import ssh

    monkeypatch.setattr(ssh._RecentChannels, "KEEP", 20)
    transport = _ssh(node_cluster)
    for _ in range(60):
        assert transport.run("true", timeout=10).ok
    seen = transport._connection.client.get_transport().channels_seen
    assert 0 < len(seen) <= 20 and max(seen) >= 59  # the latest are there
    transport.close()


def _group_members(pgid: int) -> list[int]:
    """Live processes (zombies left out) of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(stat.parent.name))
    return members


def test_local_transport_runs_and_times_out_with_the_whole_pipeline(tmp_path):
    transport = LocalTransport("here", {"MARK": "x1"})
    result = transport.run("echo $MARK; exit 4", timeout=5)
    assert (result.stdout.strip(), result.exit_code) == ("x1", 4)
    group_file, marker = tmp_path / "group", tmp_path / "survivor"
    # the shell leads a session of its own: its pid is the pipeline's process group
    with pytest.raises(CommandTimedOut):
        transport.run(f"echo $$ > {group_file}; sleep 60 | sleep 60; touch {marker}", timeout=2)
    pgid = int(group_file.read_text())
    wait_for(lambda: not _group_members(pgid), 10, f"the end of process group {pgid}")
    assert not marker.exists()


@pytest.mark.cluster
def test_large_output_on_both_streams_arrives_whole(node_cluster):
    # both streams share the channel's window: reading one to its end first would stall
    transport = _ssh(node_cluster)
    result = transport.run("head -c 3000000 /dev/zero | tr '\\0' o; head -c 3000000 /dev/zero | tr '\\0' e >&2",
                           timeout=30)
    assert result.ok
    assert (len(result.stdout), len(result.stderr)) == (3_000_000, 3_000_000)
    assert set(result.stdout) == {"o"} and set(result.stderr) == {"e"}
    transport.close()


def _peak_of(call, *args, **kwargs):
    """What ``call`` returns, and the most memory Python held at once while it ran."""
    tracemalloc.start()
    try:
        return call(*args, **kwargs), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.cluster
def test_a_pulls_progress_is_kept_as_its_tail_however_much_it_writes(node_cluster):
    # a long pull rewrites its progress for half an hour: here 50 MB on each stream, then its last words
    command = ("head -c 50000000 /dev/zero | tr '\\0' o; echo; echo 'done: sha256:abc'; "
               "head -c 50000000 /dev/zero | tr '\\0' e >&2; echo >&2; echo 'the reason' >&2")
    for transport in (_ssh(node_cluster), LocalTransport("here")):
        result, peak = _peak_of(transport.run, command, timeout=120, tail=PROGRESS_TAIL)
        assert result.ok
        assert (len(result.stdout), len(result.stderr)) == (PROGRESS_TAIL, PROGRESS_TAIL)
        assert result.stdout.endswith("oo\ndone: sha256:abc\n") and result.stderr.endswith("ee\nthe reason\n")
        # what is held at once is the tail and the transport's own buffers, not the 100 MB written
        assert peak < 8 * 2**20, f"{type(transport).__name__} held {peak / 2**20:.1f} MiB at once"
        transport.close()


@pytest.mark.cluster
def test_commands_run_in_a_process_holding_more_than_1024_descriptors(node_cluster):
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"the descriptor limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        transport = _ssh(node_cluster)
        assert transport.run("echo past 1024", timeout=10).stdout.strip() == "past 1024"
        transport.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
