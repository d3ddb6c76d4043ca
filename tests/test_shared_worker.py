"""One worker for many nodes (``imagesync worker --nodes`` / ``--all-nodes``).

Unit tests of the node slots and of the worker's command line against a real
redis-server; then one worker serving every node of a real cluster, whose
crictl pull logs show how many pulls each node ran at once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import defaultdict

import pytest
import redis
from helpers import finish, measured, run_status, start_cli, started_run, wait_for, wait_for_run_end

from imagesync import keys, nodeslots
from imagesync.cli.common import CommandError
from imagesync.cli.serve import shared_worker_argv
from imagesync.config import load_settings
from imagesync.nodeslots import NodeSlots, default_concurrency, shares_pool
from imagesync.semaphore import Semaphore
from testcluster.measure import max_concurrency

# -- node slots ----------------------------------------------------------------------------------


def test_a_node_gives_max_parallel_slots_and_other_nodes_their_own(redis_client):
    slots = NodeSlots(redis_client, max_parallel=2, lease=60)
    a1, a2 = slots.take("a", "p1", wait=0), slots.take("a", "p2", wait=0)
    assert a1 and a2
    assert slots.take("a", "p3", wait=0) is None
    assert slots.take("b", "p3", wait=0)
    assert sorted(h.split(":")[0] for h in Semaphore(redis_client, keys.node_pulls("a"), 2, 1).holders()) == [
        "p1", "p2"]
    slots.give_back("a", a1)
    assert slots.take("a", "p3", wait=0)


def test_a_pull_waits_for_a_slot_then_gives_up(redis_client):
    looks = []

    def sleep(seconds):
        looks.append(seconds)
        time.sleep(seconds)

    slots = NodeSlots(redis_client, max_parallel=1, lease=60, sleep=sleep)
    held = slots.take("a", "p1", wait=0)
    assert held and looks == []
    began = time.monotonic()
    assert slots.take("a", "p2", wait=0.5) is None
    assert time.monotonic() - began >= 0.5  # it waited its whole wait
    assert len(looks) >= 2 and all(0 < s <= 1.5 * nodeslots.POLL for s in looks)  # looking again and again

    def give_back_while_waiting(seconds):
        looks.append(seconds)
        slots.give_back("a", held)

    looks.clear()
    waiting = NodeSlots(redis_client, max_parallel=1, lease=60, sleep=give_back_while_waiting)
    assert waiting.take("a", "p2", wait=60)
    assert len(looks) == 1  # taken at the first look after the slot was given back


def test_a_redelivered_pull_takes_a_slot_of_its_own(redis_client):
    # A worker died under pull p1: its slot stays taken until its lease runs out,
    # because the node-side pull may still run. The redelivered p1 (same task id)
    # must not count as the holder of that slot.
    slots = NodeSlots(redis_client, max_parallel=1, lease=60)
    dead = slots.take("a", "p1", wait=0)
    assert dead
    assert slots.take("a", "p1", wait=0) is None
    # the dead one's lease runs out (shortened here to 0.2 s from now)
    assert Semaphore(redis_client, keys.node_pulls("a"), 1, 0.2).refresh(dead)
    again = slots.take("a", "p1", wait=30)
    assert again and again != dead
    assert slots.semaphore("a").holders() == [again]


def test_a_slot_that_cannot_be_given_back_is_left_to_its_lease(redis_client, redis_server, caplog):
    slots = NodeSlots(redis_client, max_parallel=1, lease=60)
    holder = slots.take("a", "p1", wait=0)
    assert holder
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    NodeSlots(unreachable, max_parallel=1, lease=60).give_back("a", holder)  # does not raise
    assert "frees itself within 60 s" in caplog.text


def test_which_workers_take_node_slots():
    assert not shares_pool(["node.a"], 4, 4, "node.")
    assert shares_pool(["node.a"], 5, 4, "node.")
    assert shares_pool(["node.a", "node.b"], 2, 4, "node.")
    assert not shares_pool(["imagesync"], 2, 4, "node.")


@pytest.mark.parametrize("nodes, max_parallel, expected", [(10, 4, 10), (2, 4, 4), (1, 4, 4), (3, 1, 3), (10, 2, 10)])
def test_default_concurrency(nodes, max_parallel, expected):
    assert default_concurrency(nodes, max_parallel, "prefork") == expected


def test_a_thread_pool_runs_every_node_at_its_limit():
    assert default_concurrency(50, 4, "threads") == 50 * 4


def test_a_waiting_pull_wakes_when_this_process_gives_a_slot_of_its_node_back(redis_client):
    # a thread pool's poll is long (THREAD_POLL): a slot given back by a thread of the
    # same process must not wait for it
    slots = NodeSlots(redis_client, max_parallel=1, lease=60, poll=30)
    held = slots.take("a", "p1", wait=0)
    assert held
    timer = threading.Timer(0.3, slots.give_back, ("a", held))
    timer.start()
    began = time.monotonic()
    assert slots.take("a", "p2", wait=20)
    timer.join()
    assert time.monotonic() - began < 10  # woken by the give-back, not by the 15..45 s poll


# -- the worker's command line -------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path):
    nodes = "\n".join(f'[[nodes]]\nname = "w{i}"\nhost = "10.0.0.{i}"\n' for i in range(1, 4))
    path = tmp_path / "imagesync.toml"
    path.write_text(f'redis_url = "redis://127.0.0.1:1/0"\nprefixes = ["r.example/x"]\nmax_parallel = 2\n'
                    f'log_dir = "{tmp_path}"\n{nodes}')
    return load_settings(path)


def test_the_worker_of_named_nodes_consumes_their_queues(settings):
    assert shared_worker_argv(settings, "w1, w3,w1", None, "prefork") == [
        "-P", "prefork", "-Q", "node.w1,node.w3", "-c", "2", "-n", "w1+1@%h"]
    assert shared_worker_argv(settings, None, 5) == [
        "-P", "threads", "-Q", "node.w1,node.w2,node.w3", "-c", "5", "-n", "w1+2@%h"]
    # threads by default: every node at max_parallel (2)
    assert shared_worker_argv(settings, "w1,w2", None) == [
        "-P", "threads", "-Q", "node.w1,node.w2", "-c", "4", "-n", "w1+1@%h"]


def test_the_worker_of_many_nodes_refuses_what_it_cannot_serve(settings):
    with pytest.raises(Exception, match="no node named 'w9'"):
        shared_worker_argv(settings, "w1,w9", None)
    with pytest.raises(CommandError, match="--nodes"):
        shared_worker_argv(settings, " , ", None)
    with pytest.raises(CommandError, match="at least 1"):
        shared_worker_argv(settings, "w1,w2", 0)


def test_a_pool_is_chosen_only_for_a_worker_of_several_nodes(settings, monkeypatch, capsys):
    # a worker of one node runs max_parallel prefork processes: the only pool Celery keeps limits in
    from imagesync.cli import main

    monkeypatch.setenv("IMAGESYNC_CONFIG", str(settings.path))
    assert main(["worker", "--node", "w1", "--pool", "threads"]) == 2
    assert capsys.readouterr().err == ("imagesync: --pool goes with --nodes or --all-nodes: a worker of one node "
                                       "runs max_parallel pulls in as many processes\n")


# -- on a real cluster -----------------------------------------------------------------------------


#: the pool of the worker of every node: threads (the default), and prefork
POOLS = ("threads", "prefork")


@pytest.fixture(scope="module", params=POOLS)
def shared(tmp_path_factory, request):
    """A 4-node cluster served by the control worker and ONE worker for all nodes, whose pool
    is threads, then prefork: each test below runs with both."""
    from conftest import Deployment

    from testcluster.cluster import Cluster
    from testcluster.install import ensure_system_packages

    ensure_system_packages()
    workdir = tmp_path_factory.mktemp("shared")
    with Cluster(workdir / "cluster", nodes=4) as cluster:
        d = Deployment(cluster, workdir)
        with d.services:
            d.configure(max_parallel=2)
            d.services.start_control(wait=False)
            # 8 processes (threads) for 4 nodes of max_parallel 2: the pool alone would let
            # one node run up to 8 pulls at once; only the node slots hold it to 2
            d.pool = request.param
            d.services.start_shared_worker("shared", *_worker_args(d))
            d.services.wait_ready("control")
            # Celery's banner names the pool it runs
            log = d.services.log("shared")
            assert f"concurrency: 8 ({'thread' if d.pool == 'threads' else 'prefork'})" in log
            assert ("keeps its tasks' time limits itself" in log) == (d.pool == "threads")
            yield d


def _worker_args(d):
    return ("--all-nodes", "--pool", d.pool, "--concurrency", "8")


def _sample_holders(d, nodes, stop, seen):
    with d.cluster.redis.client() as client:
        sems = {n: Semaphore(client, keys.node_pulls(n), 2, 1) for n in nodes}
        while not stop.is_set():
            for n, sem in sems.items():
                seen[n] = max(seen[n], len(sem.holders()))
            time.sleep(0.02)


def _holders(d, node):
    with d.cluster.redis.client() as client:
        return Semaphore(client, keys.node_pulls(node), 2, 1).holders()


def _running(d, node, since):
    return [p for p in d.cluster.node(node).pulls()[since:] if p.end is None]


@pytest.mark.cluster
def test_one_worker_converges_every_node_and_holds_max_parallel_per_node(shared):
    d = shared
    images = [f"bcm11/many{i}:1" for i in range(6)]
    # node-2 lacks all 6, node-3 3 and node-4 1. The proxy holds every download:
    # 5 pulls hold their node's slots (2 + 2 + 1) and stay under way; the other
    # 3 processes of the pool take pulls of full nodes, which wait for a slot,
    # then go back to their queue and come again.
    d.cluster.seed({"node-1": images, "node-3": images[:3], "node-4": images[:5]})
    before = {n: len(d.cluster.node(n).pulls()) for n in ("node-2", "node-3", "node-4")}
    log_before = d.services.log("shared").count("back in the queue")
    stop, seen = threading.Event(), defaultdict(int)
    sampler = threading.Thread(target=_sample_holders, args=(d, ["node-2", "node-3", "node-4"], stop, seen))
    sampler.start()
    d.cluster.proxy.hold()
    try:
        sync = start_cli(d, "sync", "--wait")
        for node, full in (("node-2", 2), ("node-3", 2), ("node-4", 1)):
            wait_for(lambda node=node, full=full: len(_holders(d, node)) == full
                     and len(_running(d, node, before[node])) == full, 60, f"{full} pulls under way on {node}")
        # README: a pull whose node is full waits up to 5 s in its pool process, then goes back to its queue
        wait_for(lambda: d.services.log("shared").count("back in the queue") > log_before, 60,
                 "a pull of a full node back in its queue")
        assert len(_holders(d, "node-2")) == 2 and len(_running(d, "node-2", before["node-2"])) == 2
    finally:
        d.cluster.proxy.release()
        result = finish(sync, timeout=120)
        stop.set()
        sampler.join()
    assert result.returncode == 0, result.stdout + result.stderr
    run = wait_for_run_end(d, started_run(result), 30)
    # going back to the queue kept the run alive and counted no attempt
    assert run["status"] == "completed"
    results = run["results"]
    assert sorted((r["node"], r["status"]) for r in results) == sorted(
        [("node-2", "pulled")] * 6 + [("node-3", "pulled")] * 3 + [("node-4", "pulled")] * 1)
    assert {r["attempts"] for r in results} == {1}
    for name in ("node-2", "node-3", "node-4"):
        assert {d.cluster.ref(i) for i in images} <= set(d.held(name)), name
    # measured where the pulls run: the crictl processes on each node
    concurrent = {}
    for name in ("node-2", "node-3", "node-4"):
        pulls = d.cluster.node(name).pulls()[before[name]:]
        assert all(p.end is not None for p in pulls)
        concurrent[name] = max_concurrency((p.start, p.end) for p in pulls)
    requeued = d.services.log("shared").count("back in the queue") - log_before
    measured("pulls at once per node (crictl logs)", concurrent)
    measured("slot holders at once per node (sampled)", dict(seen))
    measured("pulls sent back to their queue while their node was full", requeued)
    assert requeued >= 1
    assert concurrent == {"node-2": 2, "node-3": 2, "node-4": 1}
    if d.pool == "threads":  # a node's pulls at once shared its one connection
        ports = {d.cluster.node(n).ssh_port for n in ("node-2", "node-3", "node-4")}
        assert sorted(_ssh_connections(d.services.processes["shared"].pid, ports)) == sorted(ports)
    assert max(seen.values()) == 2
    # every slot was given back
    assert [_holders(d, n) for n in ("node-2", "node-3", "node-4")] == [[], [], []]


@pytest.mark.cluster
def test_a_shared_worker_killed_outright_has_the_pulls_of_all_its_queues_taken_back(shared):
    # README: a worker that died outright has the unacknowledged pulls of its
    # queues taken back by the next worker as it starts; here the worker of
    # every node, killed with pulls of two nodes under way
    d = shared
    images = [f"bcm11/orphan{i}:1" for i in range(2)]
    d.cluster.seed({"node-1": images, "node-4": images})
    d.cluster.proxy.hold()
    try:
        run_id = started_run(d.cli("sync"))
        for node in ("node-2", "node-3"):
            wait_for(lambda node=node: len(_holders(d, node)) == 2, 60, f"2 pulls under way on {node}")
        with d.cluster.redis.client() as client:
            unacked = {tag: json.loads(raw)[2] for tag, raw in client.hgetall("unacked").items()}
        orphans = {tag for tag, queue in unacked.items() if queue.startswith("node.")}
        assert sorted(unacked[tag] for tag in orphans) == ["node.node-2"] * 2 + ["node.node-3"] * 2
        worker = d.services.processes.pop("shared")
        os.killpg(worker.pid, signal.SIGKILL)  # the main process and its pool, at once: nothing acknowledges
        worker.kill()
    finally:
        d.cluster.proxy.release()
    # the node-side pulls end (their downloads go on); only then may their slots
    # free, which their leases do long after: shortened here to 0.1 s from now
    for node in ("node-2", "node-3"):
        wait_for(lambda node=node: not d.cluster.node(node).processes(r"crictl.* pull"), 60, f"no pull on {node}")
        with d.cluster.redis.client() as client:
            for holder in _holders(d, node):
                Semaphore(client, keys.node_pulls(node), 2, 0.1).refresh(holder)
    assert run_status(d, run_id) == "running"

    d.services.start_shared_worker("shared", *_worker_args(d))
    run = wait_for_run_end(d, run_id, 60)
    assert run["status"] == "completed", run
    assert sorted((r["node"], r["image"]) for r in run["results"]) == sorted(
        (node, d.cluster.ref(image)) for node in ("node-2", "node-3") for image in images)
    assert {r["status"] for r in run["results"]} <= {"pulled", "present"}, run["results"]
    log = d.services.log("shared")
    [line] = [line for line in log.splitlines() if "took back" in line]
    assert "took back 4 unacknowledged pulls of " in line and "node.node-2" in line and "node.node-3" in line
    with d.cluster.redis.client() as client:
        assert not any(client.hexists("unacked", tag) for tag in orphans)
    for node in ("node-2", "node-3"):
        assert {d.cluster.ref(image) for image in images} <= set(d.held(node))


def _ssh_connections(pid, ports):
    """The sshd port of every established TCP connection of process ``pid`` to one of ``ports``."""
    remote = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            port = int(fields[2].rsplit(":", 1)[1], 16)
            if port in ports and fields[3] == "01":
                remote[fields[9]] = port
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in remote:
            found.append(remote[link[8:-1]])
    return found


def _sshd_children(node):
    """The sshd processes serving the node's SSH connections (children of its sshd)."""
    sshd, found, parents = node.pids["sshd"], [], None
    parents = {sshd}
    while parents:
        children = set()
        for entry in os.listdir("/proc"):
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)
                comm = stat[0].split("(", 1)[1]
                ppid = int(stat[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in parents and comm.startswith("sshd"):
                children.add(int(entry))
        found += children
        parents = children
    return found


@pytest.mark.cluster
def test_a_pull_that_overruns_is_stopped_on_the_node_and_reported_timed_out(shared):
    # The node's SSH connection hangs under a pull (its sshd stopped): no exit status
    # ever comes back. The node-side timeout ends the pull there; the worker gives up
    # on the channel at its deadline, within the task's time limit (kept by the worker
    # itself when its pool is threads), and reports the pull timed out.
    d = shared
    time_out = 3
    d.configure(max_parallel=2, time_out=time_out)
    d.services.stop("shared")
    d.services.start_shared_worker("shared", *_worker_args(d))
    image = "bcm11/overrun:1"
    d.cluster.seed({"node-1": [image], "node-3": [image], "node-4": [image]})
    node = d.cluster.node("node-2")
    d.cluster.proxy.hold()
    stopped = []
    try:
        # the pull is caught under way while `sync` still runs: the command returns once the run
        # has sent every pull, the tags held asked about after the first, and the pull's 3 s may be over
        sync = start_cli(d, "sync")
        wait_for(lambda: node.processes(r"crictl.* pull"), 60, "the pull under way on node-2")
        stopped = _sshd_children(node)
        assert stopped
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        began = time.monotonic()
        run_id = started_run(finish(sync))
        run = wait_for_run_end(d, run_id, 120)
        took = time.monotonic() - began
        # on the node, nothing of the pull is left: its own timeout ended it
        assert node.processes(r"crictl.* pull") == [] and node.processes(r"\btimeout\b") == []
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        d.cluster.proxy.release()
    measured(f"hung connection ({d.pool}): pull stopped and reported after (s)", round(took, 1))
    [outcome] = run["results"]
    assert (outcome["node"], outcome["status"]) == ("node-2", "timed_out"), outcome
    assert "did not finish within" in outcome["reason"], outcome
    # the worker goes on: the next run reaches node-2 again over a new connection
    d.configure(max_parallel=2)
    d.services.stop("shared")
    d.services.start_shared_worker("shared", *_worker_args(d))
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert d.cluster.ref(image) in d.held("node-2")
