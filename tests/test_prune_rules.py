"""Prune's rules (imagesync.retired) with plain data: which images leave a node, and why the others stay."""

from __future__ import annotations

from imagesync.retired import RETIRED, UNMANAGED, WANTED, Rules, verdicts
from imagesync.runtimes import Image
from imagesync.runtimes.removal import Containers

REG = "reg.local"
NOBODY = Containers({})


def image(*tags: str, digest: str = "a", digests: tuple[str, ...] = ()) -> Image:
    return Image(id="sha256:" + digest * 64, tags=tuple(f"{REG}/{tag}" for tag in tags), digests=digests)


def rules(**given) -> Rules:
    base = {"prefixes": (f"{REG}/bcm11",), "declared": frozenset(), "remembered": {}, "exclude": ()}
    return Rules(**(base | given))


def test_only_managed_images_are_judged_and_an_unmanaged_one_is_never_touched():
    judge = rules(exclude=(f"{REG}/*",)).judge
    assert judge("n", f"{REG}/bcm11/app:1") == (RETIRED, f"matches exclude '{REG}/*'")
    # outside the prefixes and never declared: not imagesync's, whatever exclude says
    assert judge("n", f"{REG}/team/tool:1") == (UNMANAGED, "")
    assert judge("n", "not a valid name!") == (UNMANAGED, "")
    assert verdicts("n", [image("team/tool:1"), image("other/x:2", digest="b")], rules(exclude=(f"{REG}/*",)),
                    NOBODY) == []


def test_a_declared_image_leaves_once_no_longer_declared_unless_a_prefix_still_covers_it():
    remembered = {f"{REG}/tools/old:1": "20261201-000000-aaaaaa", f"{REG}/bcm11/moved:1": "20261201-000000-aaaaaa"}
    judge = rules(remembered=remembered, declared=frozenset({f"{REG}/tools/new:1"})).judge
    assert judge("n", f"{REG}/tools/old:1") == (
        RETIRED, "no longer declared (last declared by run 20261201-000000-aaaaaa)")
    assert judge("n", f"{REG}/tools/new:1") == (WANTED, "")
    assert judge("n", f"{REG}/bcm11/moved:1") == (WANTED, "")  # under a prefix: still wanted


def test_an_untagged_image_is_judged_by_its_digest_names():
    digest = "sha256:" + "d" * 64
    remembered = {f"{REG}/tools/pinned:1@{digest}": "20261201-000000-aaaaaa"}
    held = Image(id="sha256:" + "e" * 64, digests=(f"{REG}/tools/pinned@{digest}",))
    [verdict] = verdicts("n", [held], rules(remembered=remembered), NOBODY)
    assert verdict.remove and verdict.image == f"{REG}/tools/pinned@{digest}"


def test_the_labels_rule_retires_what_the_nodes_labels_no_longer_select():
    def labels(node: str, name: str) -> str | None:
        return "not for this node's labels (it needs gpu; the node has none)" if node == "cpu-1" else None

    gpu = rules(prefixes=(f"{REG}/nvidia",), labels=labels)
    [verdict] = verdicts("cpu-1", [image("nvidia/cuda:12")], gpu, NOBODY)
    assert verdict.remove and verdict.reason.startswith("not for this node's labels")
    assert verdicts("gpu-1", [image("nvidia/cuda:12")], gpu, NOBODY) == []


def test_an_image_stays_while_another_of_its_names_is_wanted_or_not_imagesyncs():
    excluding = rules(exclude=(f"{REG}/bcm11/scratch",))
    wanted_too = image("bcm11/scratch:1", "bcm11/app:1")
    foreign_too = image("bcm11/scratch:2", "team/tool:1", digest="b")
    by_image = {v.image: v for v in verdicts("n", [wanted_too, foreign_too], excluding, NOBODY)}
    assert not by_image[f"{REG}/bcm11/scratch:1"].remove
    assert by_image[f"{REG}/bcm11/scratch:1"].reason == f"it is also {REG}/bcm11/app:1, still wanted on this node"
    assert by_image[f"{REG}/bcm11/scratch:2"].reason == f"it is also {REG}/team/tool:1, not managed by imagesync"


def test_an_image_a_container_uses_stays_and_so_does_every_image_of_a_node_that_cannot_say():
    excluding = rules(exclude=(f"{REG}/bcm11/scratch",))
    held = image("bcm11/scratch:1")
    used = Containers({held.id: ("web (5a1b)",)})
    [verdict] = verdicts("n", [held], excluding, used)
    assert not verdict.remove and verdict.reason == "in use by container web (5a1b)"
    [verdict] = verdicts("n", [held], excluding, None)
    assert not verdict.remove and "could not say" in verdict.reason
    [verdict] = verdicts("n", [held], excluding, NOBODY)
    assert verdict.remove and verdict.reason == f"matches exclude '{REG}/bcm11/scratch'"


def test_a_prune_follows_only_a_completed_run_that_beat_started_and_only_with_prune_on():
    import fakeredis

    from imagesync import keys
    from imagesync.config import Settings
    from imagesync.prune import follows

    redis = fakeredis.FakeRedis()
    runs = {"20261204-000001-aaaaaa": ("completed", "beat"), "20261204-000002-aaaaaa": ("completed", "cli"),
            "20261204-000003-aaaaaa": ("cancelled", "beat"), "20261204-000004-aaaaaa": ("abandoned", "beat")}
    for run_id, (status, trigger) in runs.items():
        redis.hset(keys.run(run_id), mapping={"status": status, "trigger": trigger})
    on = Settings(nodes=[{"name": "n"}], prefixes=[f"{REG}/bcm11"], prune=True)
    assert [run_id for run_id in runs if follows(on, redis, run_id)] == ["20261204-000001-aaaaaa"]
    assert not follows(on, redis, "20261204-000009-aaaaaa")  # no such run
    off = Settings(nodes=[{"name": "n"}], prefixes=[f"{REG}/bcm11"])
    assert not follows(off, redis, "20261204-000001-aaaaaa")
