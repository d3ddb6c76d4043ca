"""Node-to-node transfer without a cluster: the streaming primitive, the commands, the
holders, and a waiting copy (the whole path is in test_transfer.py)."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace

import fakeredis
import pytest

from imagesync import keys
from imagesync.attempt import Attempt, WaitForHolder, spent_since
from imagesync.budgets import stale_after
from imagesync.config import Node, Settings
from imagesync.errors import CommandTimedOut, RefusedReference
from imagesync.facts import NodeFacts
from imagesync.outcomes import FAILED, PULLED, TIMED_OUT, Outcome
from imagesync.planning.plan import DEFAULT_ROUTE, PEERS, REGISTRY, Policy, Route
from imagesync.planning.planner import make_plan
from imagesync.runs import Run, pull_key, summary_lines
from imagesync.runtimes import Ctr, Image
from imagesync.semaphore import Semaphore
from imagesync.transfer import (
    MIN_COPY_SECONDS,
    REQUEUE_AFTER,
    SERVE_LEASE,
    SERVES,
    Holders,
    from_peers,
    note_holder,
    wait_limit,
)
from imagesync.transport import LocalTransport

REF = "reg.local:5000/bcm11/app:1"
DIGEST = "sha256:" + "a" * 64
FACTS = NodeFacts(platform="linux/amd64", ctr=True)


def test_a_local_stream_carries_bytes_both_ways_and_reports_the_exit_status():
    stream = LocalTransport("n").open("cat; echo done >&2; exit 3")
    data = bytes(range(256)) * 4096  # 1 MiB: more than a pipe holds, so reads and writes must alternate
    received = bytearray()
    for start in range(0, len(data), 65536):
        stream.write(data[start:start + 65536], timeout=5)
        while len(received) < start + 65536:
            received += stream.read(65536, timeout=5)
    stream.close_input()
    while chunk := stream.read(65536, timeout=5):
        received += chunk
    assert bytes(received) == data
    assert stream.wait(5) == 3
    assert "done" in stream.stderr()
    stream.close()


def test_a_stream_whose_command_does_not_read_holds_the_writer_back_then_times_out():
    stream = LocalTransport("n").open("sleep 30")
    with pytest.raises(CommandTimedOut, match="no progress within 0.5 s"):
        stream.write(b"x" * (4 * 1024 * 1024), timeout=0.5)
    with pytest.raises(CommandTimedOut):  # the writer gave up while the command still ran
        stream.wait(0)
    stream.close()  # stops the command
    assert stream.wait(1) < 0


def test_export_and_import_commands_are_quoted_and_checked():
    ctr = Ctr(address="/run/containerd/containerd.sock", namespace="k8s.io")
    export = ctr.export_command(REF, 60, "linux/amd64")
    assert shlex.split(export)[:6] == ["timeout", "-k", "5", "60", "sh", "-c"]
    script = shlex.split(export)[6]
    assert "ctr --address /run/containerd/containerd.sock --namespace k8s.io images export " \
           "--platform linux/amd64 - reg.local:5000/bcm11/app:1" in script
    imported = shlex.split(ctr.import_command(REF, DIGEST, 60, "linux/amd64"))[6]
    assert "images import --platform linux/amd64 -;" in imported
    assert f'"$after" != {DIGEST}' in imported and "images rm reg.local:5000/bcm11/app:1" in imported
    with pytest.raises(RefusedReference):
        ctr.export_command("reg.local:5000/x:1;rm -rf /", 60)
    with pytest.raises(ValueError, match="not a manifest digest"):
        ctr.import_command(REF, "sha256:$(id)", 60)


def test_holders_whose_runtime_names_no_digest_still_serve_when_none_names_one():
    # an image imported with ctr: the CRI reports its tag, no repo digest
    local = Image(id="sha256:" + "1" * 64, tags=(REF,), digests=())
    plan = make_plan({"n1": [local], "n2": []}, ["reg.local:5000/bcm11"],
                     facts={"n1": FACTS, "n2": FACTS}, policy=Policy())
    route = plan.route("n2", REF)
    assert route.sources == (REGISTRY, PEERS)
    assert (route.peers, route.digest) == (("n1",), None)
    assert route.describe() == "registry, then n1 if not found"


def test_a_node_without_ctr_is_no_source():
    local = Image(id="sha256:" + "1" * 64, tags=(REF,), digests=())
    plan = make_plan({"n1": [local], "n2": []}, ["reg.local:5000/bcm11"],
                     facts={"n1": NodeFacts(platform="linux/amd64", ctr=False), "n2": FACTS}, policy=Policy())
    assert plan.route("n2", REF).sources == (REGISTRY,)


def settings(**extra):
    return Settings(nodes=[Node(name="n1"), Node(name="n2")], prefixes=["reg.local:5000/bcm11"], time_out=20,
                    **extra)


def test_a_waiting_copy_hands_over_as_soon_as_its_seed_fails(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr("imagesync.transfer.time.sleep", waits.append)
    redis = fakeredis.FakeRedis()
    config = settings(source="peers-first")
    route = Route((PEERS, REGISTRY), (), None, seed="n1", platform="linux/amd64")
    failed = Outcome("n1", REF, FAILED, reason="not found")
    redis.hset(keys.run_results("r1"), pull_key("n1", REF), failed.to_json())
    outcome, transient = from_peers(Attempt(config, config.node("n2"), REF, route, "r1", check=False, redis=redis))
    assert waits == []  # not one look more for a holder
    assert (outcome.status, transient) == (FAILED, False)
    assert outcome.reason == "no node holds it: n1, which was to get it from the registry, failed: not found"


def test_a_node_that_can_serve_copies_becomes_a_holder_with_its_platform_under_peers_first_only():
    redis = fakeredis.FakeRedis()
    config = settings(source="peers-first")
    copies = Route((REGISTRY, PEERS), platform="linux/arm64")

    def pulled(node, route, status=PULLED, run_id="r1", config=config):
        attempt = Attempt(config, config.node(node), REF, route, run_id, redis=redis)
        note_holder(attempt, Outcome(node, REF, status))

    pulled("n1", copies)
    pulled("n2", copies, FAILED)
    pulled("n2", DEFAULT_ROUTE)  # no copies to or from it: no ctr there, or an agent
    assert redis.hgetall(keys.run_holders("r1", REF)) == {b"n1": b"linux/arm64"}
    assert 0 < redis.ttl(keys.run_holders("r1", REF)) <= stale_after(settings())  # as long as the run's record
    pulled("n1", copies, run_id="r2", config=settings())
    assert not redis.exists(keys.run_holders("r2", REF))


def test_a_learned_holder_serves_only_nodes_of_its_platform_and_only_as_a_configured_node():
    redis = fakeredis.FakeRedis()
    config = settings(source="peers-first")
    redis.hset(keys.run_holders("r1", REF), mapping={"n1": "linux/arm64", "agent-x": "linux/amd64"})

    def holders(platform):
        route = Route((PEERS, REGISTRY), seed="n1", platform=platform)
        return Holders(Attempt(config, config.node("n2"), REF, route, "r1", redis=redis), REF).current()

    assert holders("linux/amd64") == []  # n1 is arm64; agent-x is no node of the configuration
    assert holders("linux/arm64") == ["n1"]
    assert holders(None) == ["n1"]  # a node of unknown platform, as the plan's holders


def test_a_waiting_copy_goes_back_to_its_queue_and_keeps_its_budget(monkeypatch):
    monkeypatch.setattr("imagesync.transfer.time.sleep", pytest.fail)  # never waits in its process
    redis = fakeredis.FakeRedis()
    config = settings(source="peers-first")
    route = Route((PEERS, REGISTRY), (), None, seed="n1", platform="linux/amd64")
    attempt = Attempt(config, config.node("n2"), REF, route, "r1", check=False, redis=redis, requeue=True)
    with pytest.raises(WaitForHolder) as waiting:
        from_peers(attempt)
    assert REQUEUE_AFTER[0] <= waiting.value.delay <= REQUEUE_AFTER[1]
    # back from its queue later: its time_out began when it first did
    resumed = Attempt(config, config.node("n2"), REF, route, "r1", check=False, redis=redis, requeue=True,
                      spent=spent_since(waiting.value.began, now=waiting.value.began + 4))
    assert 4 <= resumed.elapsed() < 5 and resumed.remaining() <= config.time_out - 4
    with pytest.raises(WaitForHolder):
        from_peers(resumed)
    # past half of time_out with no holder: the next source gets the other half
    late = replace(resumed, spent=wait_limit(config))
    outcome, transient = from_peers(late)
    assert (outcome.status, transient) == (FAILED, False)
    assert outcome.reason == f"no node came to hold it within {wait_limit(config):g} s (half of time_out)"
    assert outcome.duration >= wait_limit(config)


def test_a_copy_after_the_registry_waits_for_a_busy_holder_as_long_as_time_out_allows(monkeypatch, redis_client):
    """A real Redis: a holder's serving slots are a semaphore, a Lua script."""
    class Waited(Exception):
        pass

    def sleep(seconds):
        raise Waited

    monkeypatch.setattr("imagesync.transfer.time.sleep", sleep)
    redis = redis_client
    config = settings()
    Semaphore(redis, keys.node_serves("n1"), SERVES, SERVE_LEASE).acquire("another copy")
    route = Route((REGISTRY, PEERS), ("n1",), platform="linux/amd64")
    # the last source, after the registry (so the pull waits in its process, see pulls.get_image):
    # no source after it to give half of time_out to
    past_half = Attempt(config, config.node("n2"), REF, route, "r1", check=False, redis=redis,
                        spent=wait_limit(config) + 1)
    with pytest.raises(Waited):
        from_peers(past_half)
    spent = replace(past_half, spent=config.time_out - MIN_COPY_SECONDS + 1)
    outcome, transient = from_peers(spent)
    assert (outcome.status, transient) == (TIMED_OUT, False)
    assert outcome.reason == f"every holder was busy until time_out ({config.time_out} s) was spent"


def test_the_summary_says_where_copies_came_from():
    copied = [Outcome(n, REF, "copied", source="n1") for n in ("n2", "n3")]
    run = Run(id="r1", status="completed", trigger="manual", started=0.0, finished=1.0, expected=2,
              counts={"copied": 2}, expected_per_node={"n2": 1, "n3": 1}, skipped={}, drift=[], refused=[],
              wanted=1, results=copied)
    assert "run r1: 2 copied from n1" in summary_lines(run)
    assert json.loads(copied[0].to_json())["source"] == "n1"
