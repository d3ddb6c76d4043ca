"""The disk guard (imagesync.planning.room): room before a pull, evictions by the node.

Pure planner tests first, then one real cluster whose node-2 keeps its
containerd root on a small tmpfs.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import fakeredis
import pytest

from imagesync import keys
from imagesync.facts import NodeFacts
from imagesync.outcomes import Outcome
from imagesync.planning import room
from imagesync.planning.plan import SKIPPED, Policy
from imagesync.planning.planner import make_plan
from imagesync.runtimes import Image
from imagesync.sizes import MinFree

MiB = 2**20
REG = "registry.example:5000"


def image(name: str, size_mib: float) -> Image:
    return Image(id=f"sha256:{name}", tags=[f"{REG}/{name}"], digests=[], size=int(size_mib * MiB))


def disk(total_mib: float, free_mib: float) -> NodeFacts:
    return NodeFacts(platform="linux/amd64", disk_total=int(total_mib * MiB), disk_free=int(free_mib * MiB), ctr=True)


def plan_with(conditions, holder=(), empty_facts=None, declared=()):
    inventories = {"full": list(holder), "empty": []}
    facts = {"full": disk(1000, 900), "empty": empty_facts if empty_facts is not None else disk(100, 50)}
    return make_plan(inventories, [f"{REG}/bcm11"], declared, facts=facts, policy=Policy(conditions=conditions))


# -- min_free --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, total, keep", [
    ("20%", 1000, 200), ("0%", 1000, 0), ("50GiB", 10, 50 * 2**30), ("500 MB", 1, 500_000_000),
    (4096, 1, 4096), ("1.5kib", 1, 1536),
])
def test_min_free_is_a_share_or_a_size(text, total, keep):
    assert MinFree.parse(text).bytes_of(total) == keep


@pytest.mark.parametrize("text, says", [
    ("x", "is not a size"), ("100%", "out of range"), ("ten%", "not a percentage"), ("5 parsecs", "units"),
    (True, "is not a size"), (1.5, "is not a size"),
])
def test_a_wrong_min_free_says_what_to_write(text, says):
    with pytest.raises(ValueError, match=says):
        MinFree.parse(text)


def test_the_configuration_refuses_a_wrong_min_free_in_one_line(tmp_path):
    from imagesync.config import load_settings
    from imagesync.errors import ConfigError

    path = tmp_path / "c.toml"
    path.write_text('prefixes = ["bcm11"]\nmin_free = "lots"\n[[nodes]]\nname = "n1"\nhost = "127.0.0.1"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "min_free" in str(caught.value) and "is not a size" in str(caught.value)


# -- room before a pull ----------------------------------------------------------------------------


def test_pulls_get_room_smallest_first_and_what_does_not_fit_is_skipped_with_the_figures():
    # 100 MiB disk, 50 free, 20% = 20 MiB kept: 30 MiB to give; each pull costs 3x its size
    images = [image("bcm11/a:1", 2), image("bcm11/b:1", 4), image("bcm11/c:1", 5), image("bcm11/d:1", 20)]
    plan = plan_with([room.room(MinFree.parse("20%"))], holder=images)
    # a (6 MiB) and b (12 MiB) fit: 32 left; c (15 MiB) would leave 17 < 20; d (60) never fits
    assert plan.missing["empty"] == [f"{REG}/bcm11/a:1", f"{REG}/bcm11/b:1"]
    skipped = plan.excluded["empty"]
    assert set(skipped) == {f"{REG}/bcm11/c:1", f"{REG}/bcm11/d:1"}
    why = skipped[f"{REG}/bcm11/c:1"]
    assert why.kind == SKIPPED
    assert why.reason == ("not enough room: needs ~15.0 MiB (3x its 5.0 MiB); 50.0 MiB free of 100.0 MiB, "
                          "18.0 MiB of it promised to earlier pulls of this run; min_free 20% = 20.0 MiB")
    assert "full" not in plan.excluded  # 900 MiB free


def test_declared_images_get_room_before_the_union():
    images = [image("bcm11/a:1", 2), image("bcm11/big:1", 9)]
    plan = plan_with([room.room(MinFree.parse("20%"), [f"{REG}/bcm11/big:1"])], holder=images)
    # big (27 MiB) first: 23 left, 3 short of a's 6 MiB
    assert plan.missing["empty"] == [f"{REG}/bcm11/big:1"]
    assert f"{REG}/bcm11/a:1" in plan.excluded["empty"]


def test_an_image_of_unknown_size_goes_last_and_only_while_the_node_is_above_min_free():
    images = [image("bcm11/a:1", 2)]
    declared = [f"{REG}/bcm11/nobody:1"]
    roomy = plan_with([room.room(MinFree.parse("20%"))], holder=images, declared=declared)
    assert roomy.missing["empty"] == [f"{REG}/bcm11/a:1", f"{REG}/bcm11/nobody:1"]
    tight = plan_with([room.room(MinFree.parse("46%"))], holder=images, declared=declared)
    # 50 free, 46 kept: a (6 MiB) does not fit; the unknown one still may (the node is above min_free)
    assert tight.missing["empty"] == [f"{REG}/bcm11/nobody:1"]
    tight = plan_with([room.room(MinFree.parse("51%"))], holder=images, declared=declared)
    # 50 free, 51 kept: the node is already below min_free
    assert "empty" not in tight.missing
    assert "size unknown" in tight.excluded["empty"][f"{REG}/bcm11/nobody:1"].reason


def test_a_node_whose_disk_is_unknown_is_not_guarded():
    plan = plan_with([room.room(MinFree.parse("99%"))], holder=[image("bcm11/a:1", 2)],
                     empty_facts=NodeFacts(platform="linux/amd64"))
    assert plan.missing["empty"] == [f"{REG}/bcm11/a:1"] and not plan.excluded


# -- pinning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, can", [("1.6.20~ds1", False), ("v1.7.13", True), ("2.0.0", True), ("", None)])
def test_pinning_is_known_from_containerds_version(answer, can):
    class Node:
        platform = None

    assert NodeFacts.parse(Node(), {"containerd": answer}).can_pin is can  # type: ignore[arg-type]


# -- evictions -------------------------------------------------------------------------------------


def run_plan(redis, inventories, facts, limited=False):
    """What a run's start does: plan with what Redis remembers, then remember."""
    scope = room.only_wanted if limited else room.configured([f"{REG}/bcm11"], [])
    memory = room.Memory.load(redis, inventories)
    plan = make_plan(inventories, [f"{REG}/bcm11"], facts=facts,
                     policy=Policy(conditions=[room.evictions(memory, scope)]))
    room.remember(redis, plan, scope)
    return plan


def test_an_image_the_node_lost_is_evicted_and_after_two_in_a_row_it_waits_for_room():
    redis = fakeredis.FakeRedis()
    a = image("bcm11/a:1", 2)
    ref = f"{REG}/bcm11/a:1"
    facts = {"n1": disk(100, 50), "n2": disk(100, 50)}
    first = run_plan(redis, {"n1": [a], "n2": [a]}, facts)
    assert first.evicted == {}
    second = run_plan(redis, {"n1": [a], "n2": []}, facts)
    assert second.evicted == {"n2": [ref]} and second.missing == {"n2": [ref]}  # once: pulled back
    room.pulled(redis, Outcome("n2", ref, "pulled"))
    third = run_plan(redis, {"n1": [a], "n2": []}, facts)
    assert third.evicted == {"n2": [ref]}
    assert "n2" not in third.missing
    reason = third.excluded["n2"][ref].reason
    assert reason.startswith("evicted by the node 2 times in a row (likely the kubelet's image GC)")
    assert "free now 50.0 MiB, at the last eviction 50.0 MiB, needs 6.0 MiB more" in reason
    # not held, not pulled: no new eviction, and still held back
    fourth = run_plan(redis, {"n1": [a], "n2": []}, facts)
    assert fourth.evicted == {} and "n2" not in fourth.missing
    # the node has room now: pulled again, and once it keeps it, the count starts over
    roomy = {"n1": disk(100, 50), "n2": disk(100, 60)}
    assert run_plan(redis, {"n1": [a], "n2": []}, roomy).missing == {"n2": [ref]}
    room.pulled(redis, Outcome("n2", ref, "pulled"))
    run_plan(redis, {"n1": [a], "n2": [a]}, roomy)
    assert redis.hgetall(keys.node_evictions("n2")) == {}


def test_evictions_are_counted_when_a_run_starts_never_when_one_is_planned():
    redis = fakeredis.FakeRedis()
    a = image("bcm11/a:1", 2)
    facts = {"n1": disk(100, 50), "n2": disk(100, 50)}
    run_plan(redis, {"n1": [a], "n2": [a]}, facts)
    memory = room.Memory.load(redis, ["n1", "n2"])
    for _ in range(3):  # imagesync plan / status
        plan = make_plan({"n1": [a], "n2": []}, [f"{REG}/bcm11"], facts=facts,
                         policy=Policy(conditions=[room.evictions(memory, room.only_wanted)]))
        assert plan.evicted == {"n2": [f"{REG}/bcm11/a:1"]} and "n2" in plan.missing
    assert redis.hgetall(keys.node_evictions("n2")) == {}


def test_a_run_limited_to_some_images_leaves_what_is_known_of_the_others():
    redis = fakeredis.FakeRedis()
    a, b = image("bcm11/a:1", 2), image("bcm11/b:1", 2)
    facts = {"n1": disk(100, 50)}
    run_plan(redis, {"n1": [a, b]}, facts)
    # a webhook run for b alone: its inventory is asked about b only
    limited = make_plan({"n1": [b]}, (), [f"{REG}/bcm11/b:1"], facts=facts,
                        policy=Policy(conditions=[room.evictions(room.Memory.load(redis, ["n1"]), room.only_wanted)]))
    room.remember(redis, limited, room.only_wanted)
    assert limited.evicted == {}
    assert {m.decode() for m in redis.smembers(keys.node_held("n1"))} == {f"{REG}/bcm11/a:1", f"{REG}/bcm11/b:1"}


def test_the_run_record_and_summary_say_what_was_evicted(redis_client):
    from imagesync.runs import RunStore, summary_lines

    store = RunStore(redis_client, stale_after=60, lock_ttl=60)
    store.create("r1", trigger="test", pulls=[], skipped={}, drift=[], refused=[], wanted=1,
                 evicted={"n2": [f"{REG}/bcm11/a:1"]})
    run = store.get("r1")
    assert run is not None and run.evicted == {"n2": [f"{REG}/bcm11/a:1"]}
    assert any(f"n2: {REG}/bcm11/a:1 evicted by the node since the last run" in line for line in summary_lines(run))


# -- on a real cluster -----------------------------------------------------------------------------

TMPFS = 40 * MiB
TIGHT = {"time_out": 30, "max_parallel": 2, "min_free": "20%"}


def unique(name: str) -> str:
    """An image name of one test alone, e.g. ``bcm11/evicted-3f9a1c:1``."""
    repo, tag = name.split(":")
    return f"{repo}-{uuid.uuid4().hex[:6]}:{tag}"


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """Two nodes; node-2's containerd root is a 40 MiB tmpfs, and its image_fs."""
    from conftest import Deployment

    from testcluster.cluster import Cluster
    from testcluster.install import ensure_system_packages

    ensure_system_packages()
    workdir = tmp_path_factory.mktemp("room")
    with Cluster(workdir / "cluster", nodes=2) as cluster:
        node = cluster.node("node-2")
        root = node.workdir / "containerd" / "root"
        node.stop_containerd()
        subprocess.run(["rm", "-rf", str(root)], check=True)
        root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS}", "imagesync-room-test", str(root)], check=True)
        try:
            node.start_containerd()
            d = Deployment(cluster, workdir)
            with d.services:
                d.configure(**TIGHT, nodes_extra={"node-2": {"image_fs": str(root)}})
                d.start()
                yield d
        finally:
            node.stop_containerd()
            subprocess.run(["umount", "-l", str(root)], check=False)



@pytest.mark.cluster
def test_on_a_small_disk_what_fits_is_pulled_smallest_first_and_the_rest_is_skipped(tight):
    d = tight
    # each pull is estimated at 3x: small 3, m1 12, m2 15, m3 18, big 36 MiB; about 31 MiB may be used
    sizes = {"bcm11/small:1": 1, "bcm11/m1:1": 4, "bcm11/m2:1": 5, "bcm11/m3:1": 6, "bcm11/big:1": 12}
    for name, size in sizes.items():
        d.cluster.seed({"node-1": [name]}, size=size * MiB)
    ref = {name: d.cluster.ref(name) for name in sizes}
    planned = json.loads(d.cli("plan", "--json").stdout)
    facts = planned["facts"]["node-2"]
    print(f"measured: node-2 image fs before the run: {facts['disk_free']} free of {facts['disk_total']}")
    assert planned["missing"]["node-2"] == [ref["bcm11/small:1"], ref["bcm11/m1:1"], ref["bcm11/m2:1"]]

    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr  # skipping is not failing
    run = d.history(_run_id(result))
    assert run["status"] == "completed" and run["counts"] == {"pulled": 3}
    # (images of other tests on this cluster left out)
    skipped = {image: why for image, why in run["excluded"]["node-2"].items() if image in ref.values()}
    assert set(skipped) == {ref["bcm11/m3:1"], ref["bcm11/big:1"]}
    for why in skipped.values():
        assert why["kind"] == "skipped" and why["reason"].startswith("not enough room: needs ~")
        assert "free of 40.0 MiB" in why["reason"] and "min_free 20% = 8.0 MiB" in why["reason"]
    assert "promised to earlier pulls of this run" in skipped[ref["bcm11/m3:1"]]["reason"]
    assert f"{ref['bcm11/m3:1']} skipped: not enough room" in result.stdout + result.stderr
    assert set(d.held("node-2")) & set(ref.values()) == {ref["bcm11/small:1"], ref["bcm11/m1:1"], ref["bcm11/m2:1"]}
    status = d.cli("status")
    assert status.returncode == 0 and "skipped" in status.stdout
    check = d.cli("check", env={"COLUMNS": "1000"})
    assert "containerd 1.6.20~ds1 cannot pin images (1.7 or later can)" in check.stdout, check.stdout


@pytest.mark.cluster
def test_an_image_removed_behind_imagesyncs_back_is_reported_evicted(tight):
    d = tight
    node = d.cluster.node("node-2")
    name = unique("bcm11/evicted:1")
    [small] = d.cluster.seed({"node-1": [name], "node-2": [name]})["node-2"]
    first = d.cli("sync", "--wait")  # a run that finds node-2 holding it, and remembers so
    assert first.returncode == 0, first.stdout + first.stderr
    assert small in d.held("node-2")
    node.run(["ctr", "-a", node.socket, "-n", "k8s.io", "images", "rm", small])
    status = d.cli("status", "--json")
    assert json.loads(status.stdout)["evicted"] == {"node-2": [small]}
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(_run_id(result))
    assert run["evicted"] == {"node-2": [small]}
    assert small in d.held("node-2")  # once: pulled back
    # a second time in a row: not pulled again until the node has more room
    node.run(["ctr", "-a", node.socket, "-n", "k8s.io", "images", "rm", small])
    again = d.cli("sync", "--wait")
    run = d.history(_run_id(again))
    assert run["evicted"] == {"node-2": [small]}
    why = run["excluded"]["node-2"][small]
    assert why["reason"].startswith("evicted by the node 2 times in a row")
    assert small not in d.held("node-2")


@pytest.mark.cluster
def test_check_says_when_a_nodes_image_filesystem_cannot_be_read_and_that_node_is_not_guarded(tight, tmp_path):
    # README: "A node whose image filesystem cannot be read is not guarded (`imagesync check` says so)."
    d = tight
    [large] = d.cluster.seed({"node-1": [unique("bcm11/large:1")]}, size=12 * MiB)["node-1"]
    guarded = json.loads(d.cli("plan", "--json").stdout)
    assert guarded["excluded"]["node-2"][large]["reason"].startswith("not enough room")

    unreadable = "/nonexistent/imagesync-image-fs"
    config = d.cluster.write_config(tmp_path / "unreadable.toml", **TIGHT,
                                    nodes_extra={"node-2": {"image_fs": unreadable}})
    env = {"IMAGESYNC_CONFIG": str(config), "COLUMNS": "1000"}
    check = d.cli("check", env=env)
    rows = {line.split("│")[1].strip(): line for line in check.stdout.splitlines() if " crictl " in line}
    row = rows["node-2"]
    assert f"unknown ({unreadable})" in row, check.stdout
    assert (f"cannot read the image filesystem at {unreadable}: set image_fs for this node (until then, pulls to "
            "it are not checked for room)") in row, check.stdout
    assert "cannot read the image filesystem" not in rows["node-1"]
    # not guarded: the image that does not fit is planned for it all the same
    unguarded = json.loads(d.cli("plan", "--json", env=env).stdout)
    assert unguarded["facts"]["node-2"]["disk_total"] is None
    assert large in unguarded["missing"]["node-2"]
    assert large not in unguarded["excluded"].get("node-2", {})


def _run_id(result: subprocess.CompletedProcess) -> str:
    from helpers import started_run

    return started_run(result)
