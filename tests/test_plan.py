from imagesync.facts import NodeFacts
from imagesync.planning.plan import BACKUP, PEERS, REGISTRY, Policy
from imagesync.planning.planner import make_plan
from imagesync.runtimes import Image

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
PREFIXES = ["bcm11.local:5000", "nvcr.io/nvidia"]


def image(tag=None, digest=D1, repo=None):
    repo = repo or tag.rsplit(":", 1)[0]
    return Image(id=digest, tags=(tag,) if tag else (), digests=(f"{repo}@{digest}",))


def test_each_node_lacks_what_the_others_hold():
    plan = make_plan(
        {
            "w1": [image("bcm11.local:5000/hpc/app:1"), image("docker.io/library/nginx:1", D2)],
            "w2": [image("nvcr.io/nvidia/pytorch:24.01-py3", D3)],
        },
        PREFIXES,
    )
    assert plan.missing == {"w1": ["nvcr.io/nvidia/pytorch:24.01-py3"], "w2": ["bcm11.local:5000/hpc/app:1"]}
    assert plan.total == 2
    assert ("w2", "bcm11.local:5000/hpc/app:1") in plan.pulls
    assert "docker.io/library/nginx:1" not in plan.wanted


def test_unreachable_nodes_are_neither_sources_nor_targets():
    plan = make_plan(
        {"w1": [image("bcm11.local:5000/a:1")], "w2": []},
        PREFIXES,
        unreachable={"w3": "Cannot connect to w3 via SSH"},
    )
    assert plan.nodes == ["w1", "w2"]
    assert plan.skipped == {"w3": "Cannot connect to w3 via SSH"}
    assert plan.missing == {"w2": ["bcm11.local:5000/a:1"]}


def test_tag_drift_is_reported():
    plan = make_plan(
        {"w1": [image("nvcr.io/nvidia/app:1", D1)], "w2": [image("nvcr.io/nvidia/app:1", D2)]},
        PREFIXES,
    )
    assert plan.total == 0
    assert len(plan.drift) == 1
    assert plan.drift[0].reference == "nvcr.io/nvidia/app:1"
    assert dict(plan.drift[0].digests) == {"w1": D1, "w2": D2}


def test_untagged_images_travel_by_digest():
    plan = make_plan({"w1": [image(None, D1, repo="nvcr.io/nvidia/triton")], "w2": []}, PREFIXES)
    assert plan.missing == {"w2": [f"nvcr.io/nvidia/triton@{D1}"]}


def test_crafted_names_are_refused_not_planned():
    evil = Image(id=D1, tags=("nvcr.io/nvidia/x:1;touch /tmp/pwned", "nvcr.io/nvidia/$(id):1"), digests=())
    plan = make_plan({"w1": [evil], "w2": []}, PREFIXES)
    assert plan.total == 0
    assert {r.reference for r in plan.refused} == {"nvcr.io/nvidia/x:1;touch /tmp/pwned", "nvcr.io/nvidia/$(id):1"}
    assert all(r.node == "w1" for r in plan.refused)


def test_declared_images_are_wanted_everywhere():
    plan = make_plan({"w1": [], "w2": [image("nginx:1", D2, repo="nginx")]}, PREFIXES, declared=["nginx:1", "bad;name"])
    assert plan.missing == {"w1": ["docker.io/library/nginx:1"]}
    assert [r.node for r in plan.refused] == ["config"]


def test_targets_limit_pulls_but_not_sources():
    plan = make_plan(
        {"w1": [image("nvcr.io/nvidia/a:1")], "w2": [], "w3": []}, PREFIXES, targets=["w3"]
    )
    assert plan.missing == {"w3": ["nvcr.io/nvidia/a:1"]}


def test_short_names_are_normalized_before_comparing():
    plan = make_plan(
        {"w1": [image("nvcr.io/nvidia/a:1")], "w2": [Image(id=D1, tags=("nvcr.io/nvidia/a:1",), digests=())]},
        PREFIXES,
    )
    assert plan.total == 0


def test_a_name_judged_once_is_refused_on_every_node_that_reports_it():
    # make_plan judges each distinct name once and shares the verdict between nodes
    evil = Image(id=D1, tags=("nvcr.io/nvidia/x:1;reboot",), digests=())
    plan = make_plan({"w1": [evil], "w2": [evil], "w3": [image("nvcr.io/nvidia/a:1")]}, PREFIXES)
    assert sorted((r.node, r.reference) for r in plan.refused) == [
        ("w1", "nvcr.io/nvidia/x:1;reboot"), ("w2", "nvcr.io/nvidia/x:1;reboot")]
    assert plan.missing == {"w1": ["nvcr.io/nvidia/a:1"], "w2": ["nvcr.io/nvidia/a:1"]}


def test_holdings_with_a_shared_memo_match_holdings_without():
    from imagesync.planning.holdings import holdings

    images = [image("nvcr.io/nvidia/a:1"), image(None, D2, repo="nvcr.io/nvidia/b"), image("other.io/c:1", D3),
              Image(id=D1, tags=("nvcr.io/nvidia/$(id):1",), digests=())]
    memo: dict = {}
    for node in ("w1", "w2"):
        shared = holdings(node, images, PREFIXES, memo=memo)
        alone = holdings(node, images, PREFIXES)
        assert shared == alone
    assert alone.references == {"nvcr.io/nvidia/a:1": D1, f"nvcr.io/nvidia/b@{D2}": D2}


def test_a_declared_digest_reference_is_held_by_a_node_holding_that_digest():
    app = "nvcr.io/nvidia/app"
    nodes = {"w1": [image(f"{app}:1", D1)], "w2": [image(f"{app}:2", D1)], "w3": [image(f"{app}:1", D2)]}
    declared = [f"{app}@{D1}", f"{app}:1@{D1}"]
    plan = make_plan(nodes, PREFIXES, declared)
    assert sorted(plan.missing) == ["w1", "w2", "w3"]
    assert f"{app}@{D1}" not in plan.missing["w1"] + plan.missing["w2"]
    assert f"{app}:1@{D1}" not in plan.missing["w1"] + plan.missing["w2"]
    assert {f"{app}@{D1}", f"{app}:1@{D1}"} <= set(plan.missing["w3"])  # another digest is not it


def test_an_untagged_image_next_to_the_same_digest_tagged_settles():
    app = "nvcr.io/nvidia/app"
    plan = make_plan({"w1": [image(None, D1, repo=app)], "w2": [image(f"{app}:1", D1)]}, PREFIXES)
    # w1 lacks the tag; w2 holds the digest under the tag, so it lacks nothing
    assert plan.missing == {"w1": [f"{app}:1"]}
    # once w1 has pulled the tag, the cluster is converged: nothing to plan
    converged = make_plan({"w1": [image(f"{app}:1", D1)], "w2": [image(f"{app}:1", D1)]}, PREFIXES)
    assert converged.missing == {} and converged.total == 0


def test_a_run_whose_targets_were_all_skipped_has_missed_them():
    from imagesync.sync import missed_targets

    down = {"w2": "Cannot connect to w2 via SSH"}
    plan = make_plan({"w1": [image("nvcr.io/nvidia/a:1")]}, PREFIXES, unreachable=down)
    assert missed_targets(plan, ["w1", "w2"], ["w2"]) == down  # sync --node w2
    assert missed_targets(plan, ["w1", "w2"], ["w1"]) == {}
    assert missed_targets(plan, ["w1", "w2"], None) == {}  # one of two down: the run goes on
    everyone = {"w1": "refused", **down}
    assert missed_targets(make_plan({}, PREFIXES, unreachable=everyone), ["w1", "w2"], None) == everyone


def test_a_declared_image_outside_the_prefixes_is_held_under_its_digest():
    declared = "registry.other:5000/arm/tool:1"
    plan = make_plan({"w1": [image(declared, D2)], "w2": [image(declared, D3)], "w3": []}, PREFIXES,
                     declared=[declared])
    assert plan.held("w1", declared) == (True, D2)
    assert plan.missing == {"w3": [declared]}
    assert [(drift.reference, drift.digests) for drift in plan.drift] == [(declared, {"w1": D2, "w2": D3})]


# -- routes: seeds per platform, the digest a restore checks ------------------------------

def test_peers_first_picks_a_seed_per_platform_and_each_node_waits_for_its_own():
    amd, arm = NodeFacts(platform="linux/amd64", ctr=True), NodeFacts(platform="linux/arm64/v8", ctr=True)
    facts = {"a1": amd, "a2": amd, "a3": amd, "r1": arm, "r2": arm}
    new = "registry.test/new:1"
    plan = make_plan({node: [] for node in facts}, ["registry.test"], declared=[new], facts=facts,
                     policy=Policy(source="peers-first"))
    routes = {node: plan.route(node, new) for node in facts}
    seeds = {node for node, route in routes.items() if route.sources[0] == REGISTRY}
    assert {facts[node].platform for node in seeds} == {"linux/amd64", "linux/arm64/v8"} and len(seeds) == 2
    for node, route in routes.items():
        if node not in seeds:
            assert route.sources[0] == PEERS
            assert facts[route.seed].platform == facts[node].platform, (node, route)


def test_an_arm_node_seeds_an_image_only_amd_nodes_hold():
    amd, arm = NodeFacts(platform="linux/amd64", ctr=True), NodeFacts(platform="linux/arm64/v8", ctr=True)
    held = "registry.test/app:1"
    plan = make_plan({"a1": [image(held)], "a2": [], "r1": [], "r2": []}, ["registry.test"],
                     facts={"a1": amd, "a2": amd, "r1": arm, "r2": arm}, policy=Policy(source="peers-first"))
    assert plan.route("a2", held).peers == ("a1",)
    arm_routes = {node: plan.route(node, held) for node in ("r1", "r2")}
    assert sorted(route.sources[0] for route in arm_routes.values()) == [PEERS, REGISTRY]
    assert all(route.peers == () for route in arm_routes.values())
    waiting = next(route for route in arm_routes.values() if route.sources[0] == PEERS)
    assert waiting.seed in arm_routes and arm_routes[waiting.seed].sources[0] == REGISTRY


def test_a_restore_checks_the_digest_the_cluster_runs_even_when_no_holder_can_export_it():
    held = "registry.test/app:1"
    agent = NodeFacts(platform="linux/amd64", ctr=True, via_agent=True)
    no_ctr = NodeFacts(platform="linux/amd64", ctr=False)
    ctr = NodeFacts(platform="linux/amd64", ctr=True)
    # holders that are agents, or lack ctr; with transfer = false too
    cases = [({"h1": agent, "h2": agent}, ctr, True), ({"h1": no_ctr, "h2": no_ctr}, no_ctr, True),
             ({"h1": agent, "h2": no_ctr}, ctr, False)]
    for holders, target, transfer in cases:
        inventories = {"h1": [image(held, D1)], "h2": [image(held, D1)], "t": []}
        plan = make_plan(inventories, ["registry.test"], facts={**holders, "t": target},
                         policy=Policy(transfer=transfer, backup=True))
        route = plan.route("t", held)
        assert (route.sources, route.peers, route.digest) == ((REGISTRY, BACKUP), (), D1), (holders, transfer)


def test_a_restore_checks_the_digest_most_nodes_of_its_platform_hold():
    held = "registry.test/app:1"
    amd, arm = NodeFacts(platform="linux/amd64"), NodeFacts(platform="linux/arm64/v8")
    inventories = {"a1": [image(held, D1)], "r1": [image(held, D2)], "r2": [image(held, D2)], "a2": [], "r3": []}
    plan = make_plan(inventories, ["registry.test"], facts={"a1": amd, "a2": amd, "r1": arm, "r2": arm, "r3": arm},
                     policy=Policy(transfer=False, backup=True))
    assert (plan.route("a2", held).digest, plan.route("r3", held).digest) == (D1, D2)
