"""Where a node's missing image comes from, and whether it belongs there: node
facts, routes, exclusions and the chain of sources. Pure logic, no server."""

from __future__ import annotations

import subprocess

import pytest

from imagesync import facts, pulls
from imagesync.attempt import Attempt, NodeFailed
from imagesync.config import Node, Settings
from imagesync.facts import NodeFacts
from imagesync.outcomes import COPIED, FAILED, PULLED, TIMED_OUT, Outcome
from imagesync.outcomes import NOT_APPLICABLE as NA_OUTCOME
from imagesync.planning.plan import (
    BACKUP,
    DEFAULT_ROUTE,
    NOT_FOR_NODE,
    PEERS,
    REGISTRY,
    Plan,
    Policy,
    Route,
)
from imagesync.planning.planner import make_plan
from imagesync.runs import Run, summary_lines
from imagesync.runtimes import Image

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def image(*tags: str, digest: str = A, size: int = 0) -> Image:
    repo_digests = tuple(f"{tag.rsplit(':', 1)[0]}@{digest}" for tag in tags)
    return Image(id=digest, tags=tags, digests=repo_digests, size=size)


def node_facts(platform: str = "linux/amd64", ctr: bool = True) -> NodeFacts:
    return NodeFacts(platform=platform, ctr=ctr)


# -- facts -------------------------------------------------------------------

def test_the_probes_run_before_the_listing_in_one_command_and_keep_its_exit_status():
    node = Node(name="n1", image_fs="/var/lib/containerd")
    command = facts.wrap(node, "sh -c 'echo LISTING; exit 3'")
    result = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True)
    assert result.returncode == 3
    raw, listing = facts.split(result.stdout)
    assert listing == "LISTING\n"
    assert set(raw) == set(facts.probes(node)) >= {"machine", "ctr", "disk"}
    assert raw["machine"]  # uname -m answered


def test_a_disk_and_a_platform_are_read_from_the_probes():
    node = Node(name="n1")
    parsed = NodeFacts.parse(node, {"machine": "aarch64", "ctr": "/usr/bin/ctr", "disk": "1000 250"})
    assert (parsed.platform, parsed.platform_from, parsed.arch) == ("linux/arm64/v8", "node", "arm64")
    assert (parsed.disk_total, parsed.disk_free, parsed.ctr) == (1000 * 1024, 250 * 1024, True)


def test_what_could_not_be_learned_is_unknown_and_the_setting_wins():
    unknown = NodeFacts.parse(Node(name="n1"), {"machine": "vax", "ctr": "", "disk": ""})
    assert (unknown.platform, unknown.disk_total, unknown.ctr) == (None, None, False)
    configured = NodeFacts.parse(Node(name="n1", platform="linux/ppc64le"), {"machine": "x86_64"})
    assert (configured.platform, configured.platform_from) == ("linux/ppc64le", "config")


def test_output_without_facts_is_all_listing():
    assert facts.split('{"images": []}') == ({}, '{"images": []}')


@pytest.mark.parametrize(("machine", "platform"), [
    ("x86_64", "linux/amd64"), ("ppc64le", "linux/ppc64le"), ("armv7l", "linux/arm/v7"), ("s390x", "linux/s390x"),
])
def test_machines_map_to_oci_platforms(machine, platform):
    assert facts.platform_of(machine) == platform


# -- routes and exclusions ---------------------------------------------------

def plan_of(inventories, policy=None, node_facts_of=None) -> Plan:
    known = {node: node_facts() for node in inventories} if node_facts_of is None else node_facts_of
    return make_plan(inventories, ["registry.test"], facts=known, policy=policy)


def test_without_a_policy_every_pull_comes_from_the_registry():
    plan = plan_of({"a": [image("registry.test/x:1")], "b": []})
    assert plan.missing == {"b": ["registry.test/x:1"]}
    assert plan.route("b", "registry.test/x:1") == DEFAULT_ROUTE
    assert plan.route("b", "registry.test/x:1").describe() == "registry"


def test_holders_are_the_fallback_after_the_registry_then_the_backup():
    plan = plan_of({"a": [image("registry.test/x:1")], "b": []}, Policy(backup=True))
    route = plan.route("b", "registry.test/x:1")
    assert route.sources == (REGISTRY, BACKUP, PEERS)
    assert (route.peers, route.digest, route.platform) == (("a",), A, "linux/amd64")
    assert route.describe() == "registry, then backup, then a if not found"
    assert plan.to_dict()["routes"]["b"]["registry.test/x:1"]["from"] == route.describe()


def test_a_node_without_ctr_neither_serves_nor_receives_a_copy():
    inventories = {"a": [image("registry.test/x:1")], "b": [], "c": []}
    plan = plan_of(inventories, Policy(), {"a": node_facts(ctr=False), "b": node_facts(), "c": node_facts()})
    assert plan.route("b", "registry.test/x:1") == DEFAULT_ROUTE
    assert plan.notes == ["no node-to-node copies to or from a: ctr is not on it "
                          "(install containerd's ctr, or set transfer = false)"]
    assert plan_of(inventories, Policy(transfer=False), {"a": node_facts(ctr=False), "b": node_facts(),
                                                          "c": node_facts()}).notes == []
    plan = plan_of(inventories, Policy(), {"a": node_facts(), "b": node_facts(ctr=False), "c": node_facts()})
    assert plan.route("b", "registry.test/x:1") == DEFAULT_ROUTE
    assert plan.route("c", "registry.test/x:1").sources == (REGISTRY, PEERS)


def test_holders_of_another_platform_do_not_serve():
    inventories = {"arm": [image("registry.test/x:1")], "x86": []}
    known = {"arm": node_facts("linux/arm64/v8"), "x86": node_facts("linux/amd64")}
    assert plan_of(inventories, Policy(), known).route("x86", "registry.test/x:1") == DEFAULT_ROUTE


def test_the_digest_most_holders_hold_is_the_one_copied():
    inventories = {"a": [image("registry.test/x:1", digest=B)], "b": [image("registry.test/x:1")],
                   "c": [image("registry.test/x:1")], "d": []}
    route = plan_of(inventories, Policy()).route("d", "registry.test/x:1")
    assert (route.peers, route.digest) == (("b", "c"), A)


def test_peers_first_pulls_each_new_image_once_and_spreads_the_seeds():
    inventories = {"a": [image("registry.test/held:1")], "b": [], "c": [], "d": []}
    plan = make_plan(inventories, ["registry.test"], declared=["registry.test/new:1", "registry.test/new:2"],
                     facts={n: node_facts() for n in inventories}, policy=Policy(source="peers-first"))
    # held somewhere: everyone copies first
    for node in "bcd":
        assert plan.route(node, "registry.test/held:1").sources == (PEERS, REGISTRY)
    # held nowhere: one seed per image pulls it, the others wait for holders
    seeds_of = set()
    for name in ("registry.test/new:1", "registry.test/new:2"):
        routes = {node: plan.route(node, name) for node in "abcd"}
        seeds = [node for node, route in routes.items() if route.sources[0] == REGISTRY]
        assert len(seeds) == 1
        seeds_of.add(seeds[0])
        assert all(route.seed == seeds[0] for node, route in routes.items() if node != seeds[0])
        assert "after" in routes["d" if seeds[0] != "d" else "c"].describe()
    assert len(seeds_of) == 2  # spread: no node fetches every new image
    # a node's registry pulls are queued before its copies
    for node, images in plan.missing.items():
        firsts = [plan.route(node, name).sources[0] for name in images]
        assert firsts == sorted(firsts, key=lambda source: source == PEERS)


def test_a_condition_excludes_a_pull_with_its_kind_and_reason():
    def no_x_on_b(plan: Plan) -> None:
        plan.exclude("b", "registry.test/x:1", NOT_FOR_NODE, "no linux/amd64 manifest")

    plan = plan_of({"a": [image("registry.test/x:1"), image("registry.test/y:1")], "b": []},
                   Policy(conditions=[no_x_on_b]))
    assert plan.missing == {"b": ["registry.test/y:1"]}
    assert plan.excluded_as_dict() == {"b": {"registry.test/x:1": {"kind": "n/a",
                                                                  "reason": "no linux/amd64 manifest"}}}
    assert plan.total == 1


def test_sizes_come_from_the_runtime_of_a_node_that_holds_the_image():
    plan = plan_of({"a": [image("registry.test/x:1", size=5_000_000)], "b": []})
    assert plan.sizes["registry.test/x:1"] == 5_000_000


def test_a_route_travels_as_a_dict_and_back():
    route = Route((PEERS, REGISTRY), ("a", "b"), A, "c", "linux/amd64", "registry.test/x-amd64:1")
    assert Route.from_dict(route.to_dict()) == route
    assert Route.from_dict(None) == DEFAULT_ROUTE
    assert DEFAULT_ROUTE.to_dict() == {"sources": ["registry"]}


# -- the chain of sources ----------------------------------------------------

@pytest.fixture
def sources(monkeypatch):
    """Replace the fetchers with scripted answers: source -> (status, reason, transient)."""
    answers: dict[str, tuple[str, str, bool]] = {}
    asked: list[str] = []

    def fake(source):
        def fetch(attempt):
            asked.append(source)
            status, reason, transient = answers[source]
            return attempt.outcome(status, reason, source="a" if status == COPIED else ""), transient
        return fetch

    monkeypatch.setattr(pulls, "fetcher", fake)
    return answers, asked


@pytest.fixture
def make_settings():
    return lambda: Settings(nodes=[Node(name="b")], prefixes=["registry.test"], time_out=60)


def attempt(settings_factory, route, last=True):
    settings = settings_factory()
    return Attempt(settings, settings.nodes[0], "registry.test/x:1", route, "r1", last=last)


def test_a_permanent_failure_hands_over_to_the_next_source(sources, make_settings):
    answers, asked = sources
    answers.update({REGISTRY: (FAILED, "manifest unknown", False), PEERS: (COPIED, "", False)})
    outcome, transient = pulls.get_image(attempt(make_settings, Route((REGISTRY, PEERS), ("a",))))
    assert (outcome.status, outcome.source, transient, asked) == (COPIED, "a", False, [REGISTRY, PEERS])
    assert outcome.reason == "registry: manifest unknown"
    assert outcome.describe() == "copied from a"


def test_a_passing_failure_retries_before_handing_over(sources, make_settings):
    answers, asked = sources
    answers.update({REGISTRY: (FAILED, "connection refused", True), PEERS: (COPIED, "", False)})
    outcome, transient = pulls.get_image(attempt(make_settings, Route((REGISTRY, PEERS)), last=False))
    assert (outcome.status, transient, asked) == (FAILED, True, [REGISTRY])
    outcome, transient = pulls.get_image(attempt(make_settings, Route((REGISTRY, PEERS)), last=True))
    assert (outcome.status, asked) == (COPIED, [REGISTRY, REGISTRY, PEERS])


def test_every_source_failing_says_what_each_answered(sources, make_settings):
    answers, _ = sources
    answers.update({REGISTRY: (FAILED, "not found", False), BACKUP: (FAILED, "not in the backup", False)})
    outcome, _ = pulls.get_image(attempt(make_settings, Route((REGISTRY, BACKUP))))
    assert (outcome.status, outcome.reason) == (FAILED, "registry: not found; backup: not in the backup")


def test_a_node_that_failed_itself_ends_the_route(monkeypatch, make_settings):
    asked = []

    def fetcher(source):
        def fetch(attempt):
            asked.append(source)
            raise NodeFailed(attempt.outcome(FAILED, "Cannot connect to b via SSH"), True)
        return fetch

    monkeypatch.setattr(pulls, "fetcher", fetcher)
    outcome, transient = pulls.get_image(attempt(make_settings, Route((REGISTRY, PEERS), ("a",))))
    assert (outcome.status, outcome.reason, transient, asked) == (FAILED, "Cannot connect to b via SSH", True,
                                                                 [REGISTRY])


@pytest.mark.parametrize("status", [PULLED, TIMED_OUT, NA_OUTCOME])
def test_success_timeout_and_not_applicable_end_the_route(sources, make_settings, status):
    answers, asked = sources
    answers.update({REGISTRY: (status, "", False), PEERS: (COPIED, "", False)})
    outcome, _ = pulls.get_image(attempt(make_settings, Route((REGISTRY, PEERS))))
    assert (outcome.status, asked) == (status, [REGISTRY])


def test_not_applicable_is_no_failure_and_exclusions_are_in_the_summary():
    outcome = Outcome("b", "registry.test/x:1", NA_OUTCOME, reason="no match for platform in manifest")
    assert not outcome.failed and not outcome.succeeded
    run = Run(id="r1", status="completed", trigger="cli", started=0.0, finished=1.0, expected=1,
              counts={NA_OUTCOME: 1}, expected_per_node={"b": 1}, skipped={}, drift=[], refused=[], wanted=2,
              excluded={"c": {"registry.test/x:1": {"kind": "skipped", "reason": "not enough room"}}},
              results=[outcome])
    assert run.failures == 0
    lines = summary_lines(run)
    assert "run r1: c: registry.test/x:1 skipped: not enough room" in lines
    assert any("not applicable" in line and "no match for platform" in line for line in lines)


# -- pinning -----------------------------------------------------------------

def test_a_declared_image_with_pin_is_pinned_only_where_containerd_can():
    settings = Settings(nodes=[Node(name="a")], prefixes=["registry.test"],
                        images=["registry.test/plain:1", {"ref": "registry.test/kept:1", "pin": True}])
    assert settings.pinned_images() == frozenset({"registry.test/kept:1"})
    known = {"old": NodeFacts(platform="linux/amd64", ctr=True, containerd="1.6.20~ds1"),
             "new": NodeFacts(platform="linux/amd64", ctr=True, containerd="1.7.13")}
    plan = make_plan({"old": [], "new": []}, ["registry.test"], declared=settings.declared_images(),
                     facts=known, policy=Policy(pinned=settings.pinned_images()))
    assert plan.route("new", "registry.test/kept:1").pin
    assert not plan.route("old", "registry.test/kept:1").pin
    assert not plan.route("new", "registry.test/plain:1").pin
    assert Route.from_dict(plan.route("new", "registry.test/kept:1").to_dict()).pin


def test_a_pinned_pull_labels_the_image_after_it_succeeds():
    from imagesync.runtimes import PINNED_LABEL, Crictl, Ctr

    command = Ctr().pull_command("registry.test/kept:1", 60, pin=True).command
    assert f"images pull registry.test/kept:1 && ctr --namespace k8s.io images label registry.test/kept:1 " \
           f"{PINNED_LABEL}" in command
    assert "label" not in Ctr().pull_command("registry.test/kept:1", 60).command
    # the CRI has no call to label an image
    assert "label" not in Crictl().pull_command("registry.test/kept:1", 60, pin=True).command
