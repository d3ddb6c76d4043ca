"""Platforms without a cluster: matching, verdicts, the planner's conditions, the commands, the settings."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from pathlib import Path

import pytest

from imagesync import keys
from imagesync.config import Node, Settings, load_settings
from imagesync.errors import ConfigError
from imagesync.facts import NodeFacts
from imagesync.outcomes import PULLED, Outcome
from imagesync.planning.plan import NOT_FOR_NODE, Policy
from imagesync.planning.planner import make_plan
from imagesync.planning.platforms import (
    PlatformCheck,
    Verdicts,
    arch_references,
    judge,
    matches,
    per_architecture,
    platform_condition,
    record_failed_pull,
)
from imagesync.registry import LookupFailed, RegistryClient, look_up
from imagesync.runs import COMPLETED, RUNNING, RunStore
from imagesync.runtimes import Crictl, Ctr, Image

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
ARM_ONLY = "reg.local:5000/bcm11/arm-only:1"
AMD64 = NodeFacts(platform="linux/amd64", ctr=True)
ARM64 = NodeFacts(platform="linux/arm64/v8", ctr=True)


def image(tag, digest=D1):
    return Image(id=digest, tags=(tag,), digests=(f"{tag.rsplit(':', 1)[0]}@{digest}",))


class FakeRegistry:
    """A registry client that knows some digests' platforms (and tags' digests) and counts what it is asked."""

    def __init__(self, platforms, hang=(), tags=None):
        self.known = platforms
        self.hang = set(hang)
        self.tags = tags or {}
        self.asked: list[str] = []
        self.resolved: list[str] = []
        self.release = threading.Event()

    def digest_of(self, image):
        self.resolved.append(image)
        if image not in self.tags:
            raise LookupFailed(f"{image}: HTTP 404")
        return self.tags[image]

    def platforms(self, image, digest):
        self.asked.append(digest)
        if digest in self.hang:
            self.release.wait(30)
        if digest not in self.known:
            raise LookupFailed(f"{image}: HTTP 404")
        return self.known[digest]


def settings(**extra):
    return Settings(nodes=[Node(name="amd"), Node(name="arm")], prefixes=["reg.local:5000/bcm11"], **extra)


def plan_with(redis, registry, inventories, facts=None, config=None):
    config = config or settings()
    condition = platform_condition(config, redis, registry)
    return make_plan(inventories, config.prefixes, config.declared_images(),
                     facts=facts or {"amd": AMD64, "arm": ARM64},
                     policy=Policy(conditions=(per_architecture(config.per_architecture()), condition),
                                   watch=arch_references(config.per_architecture())))


def test_platforms_match_as_containerd_matches_them():
    assert matches("linux/arm64/v8", "linux/arm64")
    assert matches("linux/arm64", "linux/arm64/v8")
    assert matches("linux/amd64", "linux/amd64")
    assert not matches("linux/amd64", "linux/arm64")
    assert not matches("linux/arm/v6", "linux/arm/v7")
    assert not matches("linux/amd64", "windows/amd64")


def test_a_verdict_says_why_or_nothing():
    has_arm = {"has": json.dumps(["linux/arm64"])}
    assert judge(has_arm, "linux/amd64") == "no manifest for linux/amd64: the image has linux/arm64"
    assert judge(has_arm, "linux/arm64/v8") is None
    assert judge({"not:linux/amd64": "pull"}, "linux/amd64") == "no manifest for linux/amd64 (a pull found none)"
    assert judge({"not:linux/amd64": "pull"}, "linux/arm64") is None
    assert judge(None, "linux/amd64") is None


def test_an_image_without_the_nodes_platform_is_not_applicable_and_judged_once(redis_client):
    registry = FakeRegistry({D1: ["linux/arm64"]})
    inventories = {"amd": [], "arm": [image(ARM_ONLY)]}
    plan = plan_with(redis_client, registry, inventories)
    assert plan.missing == {}
    why = plan.excluded["amd"][ARM_ONLY]
    assert (why.kind, why.reason) == (NOT_FOR_NODE, "no manifest for linux/amd64: the image has linux/arm64")
    assert registry.asked == [D1]
    assert redis_client.ttl(keys.platforms(D1)) > 0

    again = plan_with(redis_client, registry, inventories)
    assert again.excluded["amd"][ARM_ONLY].kind == NOT_FOR_NODE
    assert registry.asked == [D1]  # learned once: no second request


def test_a_tag_pushed_again_with_the_platform_is_judged_afresh(redis_client):
    registry = FakeRegistry({D1: ["linux/arm64"], D2: ["linux/amd64", "linux/arm64"]})
    assert plan_with(redis_client, registry, {"amd": [], "arm": [image(ARM_ONLY)]}).total == 0
    plan = plan_with(redis_client, registry, {"amd": [], "arm": [image(ARM_ONLY, D2)]})
    assert plan.missing == {"amd": [ARM_ONLY]}
    assert plan.excluded == {}
    assert registry.asked == [D1, D2]


def test_a_tag_pushed_again_while_its_holders_keep_the_old_digest_is_judged_by_the_new_one(redis_client):
    registry = FakeRegistry({D1: ["linux/arm64"], D2: ["linux/amd64", "linux/arm64"]}, tags={ARM_ONLY: D1})
    inventories = {"amd": [], "arm": [image(ARM_ONLY)]}
    assert plan_with(redis_client, registry, inventories).excluded["amd"][ARM_ONLY].kind == NOT_FOR_NODE
    registry.tags[ARM_ONLY] = D2  # pushed again, with amd64; the arm node still holds D1
    plan = plan_with(redis_client, registry, inventories)
    assert plan.missing == {"amd": [ARM_ONLY]} and plan.excluded == {}
    # the tag is asked again by each plan that would keep it off a node; D2's platforms learned once
    assert (registry.resolved, registry.asked) == ([ARM_ONLY, ARM_ONLY], [D1, D2])


def test_a_registry_that_does_not_answer_costs_the_budget_and_no_verdict(redis_client):
    registry = FakeRegistry({D1: ["linux/arm64"]}, hang={D1})
    try:
        found = look_up(registry, {D1: ARM_ONLY}, budget=0.5)
        # asked, and given up on while the registry still holds the answer back
        assert registry.asked == [D1] and not registry.release.is_set()
    finally:
        registry.release.set()
    assert found == {}
    plan = plan_with(redis_client, FakeRegistry({}), {"amd": [], "arm": [image(ARM_ONLY)]})
    assert plan.missing == {"amd": [ARM_ONLY]}  # unknown: pulled as usual
    assert Verdicts(redis_client).read([D1]) == {}


def test_a_node_of_a_holders_platform_needs_no_verdict(redis_client):
    registry = FakeRegistry({D1: ["linux/amd64"]})
    facts = {"amd": AMD64, "amd2": AMD64, "arm": ARM64}
    amd_only = "reg.local:5000/bcm11/amd-only:1"
    # the amd64 holder vouches for the other amd64 node: nothing is asked
    plan = plan_with(redis_client, registry, {"amd": [image(amd_only)], "amd2": []}, facts)
    assert plan.missing == {"amd2": [amd_only]} and registry.asked == []
    # a node of another platform is asked about
    plan = plan_with(redis_client, registry, {"amd": [image(amd_only)], "amd2": [], "arm": []}, facts)
    assert plan.excluded["arm"][amd_only].kind == NOT_FOR_NODE and registry.asked == [D1]
    assert plan.missing == {"amd2": [amd_only]}
    # what Redis knows still applies: a failed pull's verdict outweighs a holder
    record_failed_pull(redis_client, f"no match for platform in manifest {D2}: not found", "linux/amd64")
    plan = plan_with(redis_client, registry, {"amd": [image(ARM_ONLY, D2)], "amd2": []}, facts)
    assert plan.excluded["amd2"][ARM_ONLY].reason == "no manifest for linux/amd64 (a pull found none)"


def test_a_deferred_check_leaves_the_pairs_it_must_ask_about_planned_until_settled(redis_client):
    registry = FakeRegistry({D1: ["linux/arm64"]})
    facts = {"amd": AMD64, "amd2": AMD64, "arm": ARM64}
    config = settings()
    check = PlatformCheck(config, redis_client, registry, defer=True)
    held = "reg.local:5000/bcm11/held:1"
    plan = make_plan({"amd": [image(held, D2)], "amd2": [], "arm": [image(ARM_ONLY)]}, config.prefixes,
                     facts=facts, policy=Policy(conditions=(check,)))
    # nothing was asked while planning; the amd64 nodes' pulls of ARM_ONLY wait for an answer
    assert registry.asked == [] and registry.resolved == []
    assert check.awaiting == {("amd", ARM_ONLY): "linux/amd64", ("amd2", ARM_ONLY): "linux/amd64",
                              ("arm", held): "linux/arm64/v8"}
    assert plan.missing == {"amd": [ARM_ONLY], "amd2": [ARM_ONLY, held], "arm": [held]}
    kept_off = check.settle({("amd", ARM_ONLY), ("amd2", ARM_ONLY)})
    assert kept_off == {pair: "no manifest for linux/amd64: the image has linux/arm64"
                        for pair in (("amd", ARM_ONLY), ("amd2", ARM_ONLY))}
    assert registry.asked == [D1] and check.awaiting == {("arm", held): "linux/arm64/v8"}


def test_a_run_leaves_out_the_pulls_a_late_verdict_keeps_off_and_completes_when_the_rest_reported(redis_client):
    store = RunStore(redis_client, stale_after=60, lock_ttl=60)
    redis_client.set("imagesync:lock", "r1")
    store.create("r1", trigger="t", pulls=[("a", "x"), ("b", "x"), ("b", "y")], skipped={}, drift=[],
                 refused=[], wanted=2)
    assert store.record("r1", Outcome("b", "y", PULLED)) == 1
    why = {"kind": NOT_FOR_NODE, "reason": "no manifest for linux/amd64"}
    assert store.exclude("r1", {"a": {"x": why}}) == 1
    assert store.exclude("r1", {"a": {"x": why}}) == 1  # the same call again counts nothing twice
    run = store.get("r1")
    assert (run.status, run.expected, run.expected_per_node) == (RUNNING, 2, {"b": 2})
    assert store.exclude("r1", {"b": {"x": why}}) == 2
    run = store.get("r1")
    assert (run.status, run.expected, run.expected_per_node, run.unreported()) == (COMPLETED, 1, {"b": 1}, {})
    assert run.excluded == {"a": {"x": why}, "b": {"x": why}}
    assert redis_client.get("imagesync:lock") is None and store.stale(now=10**12) == []
    assert store.exclude("r1", {"a": {"y": why}}) == 0  # over: nothing changes


def test_a_failed_pull_leaves_a_verdict_the_next_plan_uses(redis_client):
    reason = f"failed to pull: no match for platform in manifest {D1}: not found"
    assert record_failed_pull(redis_client, reason, "linux/amd64")
    assert not record_failed_pull(redis_client, "not found", "linux/amd64")
    plan = plan_with(redis_client, FakeRegistry({}), {"amd": [], "arm": [image(ARM_ONLY)]})
    assert plan.excluded["amd"][ARM_ONLY].reason == "no manifest for linux/amd64 (a pull found none)"


def test_without_redis_nothing_is_excluded():
    plan = plan_with(None, FakeRegistry({D1: ["linux/arm64"]}), {"amd": [], "arm": [image(ARM_ONLY)]})
    assert plan.missing == {"amd": [ARM_ONLY]}


ENTRY = {"ref": "reg.local:5000/jarvice/ubuntu:xenial",
         "arch": {"amd64": "reg.local:5000/library/ubuntu:xenial", "arm64": "reg.local:5000/arm64v8/ubuntu:xenial"}}


def test_each_node_pulls_its_architectures_reference(redis_client):
    config = Settings(nodes=[Node(name="amd"), Node(name="arm"), Node(name="ppc")], images=[ENTRY])
    facts = {"amd": AMD64, "arm": ARM64, "ppc": NodeFacts(platform="linux/ppc64le")}
    plan = plan_with(redis_client, FakeRegistry({}), {"amd": [], "arm": [], "ppc": []}, facts, config)
    ref = ENTRY["ref"]
    assert plan.route("amd", ref).pull_as == ENTRY["arch"]["amd64"]
    assert plan.route("arm", ref).pull_as == ENTRY["arch"]["arm64"]
    assert plan.route("arm", ref).describe() == f"registry ({ENTRY['arch']['arm64']})"
    assert plan.excluded["ppc"][ref].reason == "no reference for ppc64le: the entry has amd64, arm64"
    assert plan.missing == {"amd": [ref], "arm": [ref]}


def test_a_node_holding_its_architectures_reference_holds_the_entry_and_that_is_not_drift(redis_client):
    config = Settings(nodes=[Node(name="amd"), Node(name="arm")], images=[ENTRY])
    ref = ENTRY["ref"]
    inventories = {
        # crictl could not tag: the amd64 node holds only its architecture's name
        "amd": [image(ENTRY["arch"]["amd64"], D1)],
        # ctr tagged the arm64 reference as ref too
        "arm": [Image(id=D2, tags=(ENTRY["arch"]["arm64"], ref),
                      digests=(f"{ENTRY['arch']['arm64'].rsplit(':', 1)[0]}@{D2}", f"{ref.rsplit(':', 1)[0]}@{D2}"))],
    }
    plan = plan_with(redis_client, FakeRegistry({}), inventories, config=config)
    assert plan.missing == {}
    assert plan.held("amd", ref)[0]
    assert plan.drift == []

    # under a prefix the digests are known: across architectures that is not drift, within one it is
    config = Settings(nodes=[Node(name="amd"), Node(name="arm")], images=[ENTRY], prefixes=["reg.local:5000/jarvice"])
    drifting = {"amd": [image(ref, D1)], "arm": [image(ref, D2)]}
    assert plan_with(redis_client, FakeRegistry({}), drifting, None, config).drift == []
    facts = {"amd": AMD64, "arm": AMD64}
    assert [d.reference for d in plan_with(redis_client, FakeRegistry({}), drifting, facts, config).drift] == [ref]


def test_a_multi_arch_tag_held_on_two_platforms_is_not_drift():
    # ctr and crictl both report the index digest for a multi-arch tag, whatever the node's platform
    tag = "reg.local:5000/bcm11/multi:1"
    plan = make_plan({"amd": [image(tag, D1)], "arm": [image(tag, D1)]}, ["reg.local:5000/bcm11"],
                     facts={"amd": AMD64, "arm": ARM64})
    assert plan.drift == []


def test_ctr_pulls_a_chosen_platform_and_tags_the_entry_name():
    command = Ctr(namespace="k8s.io").pull_command("reg.local/arm64v8/u:1", 60, platform="linux/arm64",
                                                   also_as="reg.local/jarvice/u:1").command
    assert "images pull --platform linux/arm64 reg.local/arm64v8/u:1 && " in command
    assert "images tag --force reg.local/arm64v8/u:1 reg.local/jarvice/u:1" in command
    assert command.startswith("timeout -k 5 60 sh -c ")
    plain = Crictl().pull_command("reg.local/arm64v8/u:1", 60, platform="linux/arm64", also_as="x/y:1").command
    assert plain == "timeout -k 5 60 crictl pull reg.local/arm64v8/u:1"


# -- the settings ------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_images_take_tables_next_to_plain_strings(tmp_path):
    loaded = load_settings(write(tmp_path, "imagesync.toml", """
[[nodes]]
name = "a"

[[images]]
ref = "ubuntu:xenial"
arch.amd64 = "docker.io/library/ubuntu:xenial"
arch.ppc64le = "docker.io/ppc64le/ubuntu:xenial"
"""), {})
    assert loaded.declared_images() == ["ubuntu:xenial"]
    assert loaded.per_architecture() == {"docker.io/library/ubuntu:xenial": {
        "amd64": "docker.io/library/ubuntu:xenial", "ppc64le": "docker.io/ppc64le/ubuntu:xenial"}}
    mixed = load_settings(write(tmp_path, "mixed.toml", """
images = ["busybox:1.36", {ref = "u:1", arch = {arm64 = "arm64v8/u:1"}}]
[[nodes]]
name = "a"
"""), {})
    assert mixed.declared_images() == ["busybox:1.36", "u:1"]


def test_an_image_table_with_a_mistake_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "bad.toml", """
images = [{ref = "u:1", archs = {}}, {arch = {amd64 = "a b"}}]
[[nodes]]
name = "a"
"""), {})
    assert caught.value.problems == [
        "unknown key images[0].archs: did you mean arch?",
        "images[1].ref is missing",
        "images[1].arch.amd64: 'a b' contains spaces or control characters: write an image reference",
    ]


SEED_003 = [
    {"ref": "ubuntu:xenial", "registry": "docker.io", "private": False, "config": "jarvice-docker",
     "arch": {"amd64": "docker.io/library/ubuntu:xenial", "ppc64le": "docker.io/ppc64le/ubuntu:xenial"}},
    {"ref": "fail-test", "registry": "docker.io", "private": True, "config": "jarvice-docker",
     "arch": {"amd64": "docker.io/kenhill/abc123:test"}},
]


def test_seed_003s_image_config_is_read_as_it_is(tmp_path):
    images = write(tmp_path, "image.config", json.dumps(SEED_003, indent=4))
    loaded = load_settings(write(tmp_path, "imagesync.toml", f"""
images_file = "{images}"
[registries."docker.io"]
username = "jarvice"
password = "secret"
[[nodes]]
name = "a"
"""), {})
    assert loaded.declared_images() == ["ubuntu:xenial", "fail-test"]
    assert loaded.per_architecture()["docker.io/library/fail-test:latest"] == {"amd64": "docker.io/kenhill/abc123:test"}


def test_a_private_entry_without_a_login_is_one_clear_line(tmp_path):
    images = write(tmp_path, "image.config", json.dumps(SEED_003))
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "imagesync.toml", f'images_file = "{images}"\n[[nodes]]\nname = "a"\n'), {})
    assert caught.value.problems == [
        f'images_file: {images} entry 2 (fail-test) is private on docker.io: add a [registries."docker.io"] '
        "login (username, and password or password_file)"
    ]
    write(tmp_path, "image.config", "{not json")
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "imagesync.toml", {})
    assert caught.value.problems[0].startswith(f"images_file: {images} cannot be read as JSON")


class _TokenRegistry(http.server.BaseHTTPRequestHandler):
    """A registry that wants a bearer token from its realm, which wants the login (as Docker Hub and NGC do)."""

    index = json.dumps({"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"platform": {"os": "unknown", "architecture": "unknown"}}]}).encode()
    seen: list[tuple[str, str]] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        self.seen.append((self.path, auth))
        if self.path.startswith("/token?"):
            if auth != "Basic " + base64.b64encode(b"robot:pw").decode():
                return self._send(401, b"{}")
            return self._send(200, json.dumps({"token": "T0K"}).encode())
        if auth != "Bearer T0K":
            realm = f"http://{self.headers['Host']}/token"
            return self._send(401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}",service="reg",scope="x"'})
        return self._send(200, self.index, {"Content-Type": "application/vnd.oci.image.index.v1+json"})

    def _send(self, status, body, headers=None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_the_registry_client_follows_a_bearer_challenge_with_the_login(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenRegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        config = Settings(nodes=[Node(name="a")], images=["x"],
                          registries={host: {"username": "robot", "password": "pw"}})
        assert RegistryClient(config).platforms(f"{host}/team/app:1", D1) == ["linux/arm64/v8"]
        assert [path for path, _ in _TokenRegistry.seen] == [
            f"/v2/team/app/manifests/{D1}", "/token?service=reg&scope=x", f"/v2/team/app/manifests/{D1}"]
    finally:
        server.shutdown()
