from imagesync.facts import NodeFacts
from imagesync.planning.plan import BACKUP, PEERS, REGISTRY, Policy, Route
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


def test_agent_nodes_copy_from_serving_agents_and_ssh_nodes_from_ssh_nodes():
    serving = NodeFacts(platform="linux/amd64", ctr=True, via_agent=True, serves=True)
    silent = NodeFacts(platform="linux/amd64", ctr=True, via_agent=True)
    ssh = NodeFacts(platform="linux/amd64", ctr=True)
    held, new = "registry.test/app:1", "registry.test/new:1"
    facts = {"g1": serving, "g2": serving, "g3": serving, "q1": silent, "s1": ssh, "s2": ssh, "s3": ssh}
    inventories = {node: [] for node in facts} | {"g1": [image(held, D1)], "s1": [image(held, D1)]}
    plan = make_plan(inventories, ["registry.test"], declared=[new], facts=facts, policy=Policy(source="peers-first"))
    for target, holder in (("g2", "g1"), ("g3", "g1"), ("s2", "s1"), ("s3", "s1")):
        route = plan.route(target, held)
        assert (route.sources[0], route.peers, route.mirror) == (PEERS, (holder,), target.startswith("g")), route
    assert plan.route("q1", held).sources == (REGISTRY,)  # its agent serves nothing: no copies to it either
    # an image nobody holds: one seed among the agents, one among the SSH nodes, each waited for by its own
    routes = {node: plan.route(node, new) for node in facts}
    seeds = {node for node, route in routes.items() if route.sources[0] == REGISTRY and PEERS in route.sources}
    assert len(seeds) == 2 and {node[0] for node in seeds} == {"g", "s"}, routes
    for node, route in routes.items():
        if route.sources[0] == PEERS:
            assert route.seed[0] == node[0] and route.mirror == (node[0] == "g"), (node, route)
    assert Route.from_dict(routes["g2"].to_dict()) == routes["g2"]


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


# -- moved tags (planning.refresh) and labels (planning.labels) ------------------------------------


class _Registry:
    """A registry client answering each tag's current digest from a dict (no answer: not there)."""

    def __init__(self, current):
        self.current = current
        self.asked = []

    def current_digest(self, image):
        self.asked.append(image)
        if image not in self.current:
            from imagesync.registry import LookupFailed

            raise LookupFailed(f"{image}: HTTP 404")
        return self.current[image]


def _settings(**values):
    from imagesync.config import Settings

    values.setdefault("prefixes", PREFIXES)
    values.setdefault("nodes", [{"name": "w1"}, {"name": "w2"}, {"name": "w3"}])
    return Settings(**values)


def test_a_moved_tag_is_pulled_again_by_the_nodes_holding_the_old_digest_and_pinned_digests_never_move():
    from imagesync.planning.refresh import moved_tags

    app, gone = "nvcr.io/nvidia/app:1", "nvcr.io/nvidia/gone:1"
    registry = _Registry({app: D2})
    facts = {node: NodeFacts(platform="linux/amd64", ctr=True) for node in ("w1", "w2", "w3")}
    policy = Policy(conditions=(moved_tags(_settings(), registry),), transfer=True)
    same = [image(gone, D1), image(None, D3, repo="nvcr.io/nvidia/triton")]
    plan = make_plan({"w1": [image(app, D1), *same], "w2": [image(app, D2), *same], "w3": [image(app, D1), *same]},
                     PREFIXES, facts=facts, policy=policy)
    # w2 holds the registry's digest: it is the source the others may copy from
    assert plan.moved == {("w1", app): (D1, D2), ("w3", app): (D1, D2)}
    assert app in plan.missing["w1"] and app in plan.missing["w3"] and "w2" not in plan.missing
    route = plan.route("w1", app)
    assert (route.replaces, route.digest, route.sources, route.peers) == (D1, D2, (REGISTRY, PEERS), ("w2",))
    assert "moved: sha256:111111111111 -> sha256:222222222222" in route.describe()
    # the tag gone upstream stays drift-free and unmoved; a digest reference is never asked about
    assert all(image_ != gone for _, image_ in plan.moved)
    assert not any("@" in asked for asked in registry.asked)
    assert plan.to_dict()["moved"]["w1"] == {app: {"held": D1, "now": D2}}


def test_refresh_false_leaves_a_moved_tag_as_drift():
    from imagesync.planning.policy import policy_for

    app = "nvcr.io/nvidia/app:1"
    plan = make_plan({"w1": [image(app, D1)], "w2": [image(app, D2)]}, PREFIXES,
                     policy=policy_for(_settings(refresh=False)))
    assert plan.moved == {} and plan.total == 0 and [d.reference for d in plan.drift] == [app]


def test_a_labelled_prefix_goes_only_to_nodes_carrying_its_labels_and_they_still_hold_what_they_hold():
    from imagesync.planning.labels import NOT_FOR_LABELS, label_condition, unselected
    from imagesync.planning.refresh import moved_tags

    settings = _settings(
        nodes=[{"name": "w1", "labels": ["gpu", "a100"]}, {"name": "w2", "labels": ["gpu"]}, {"name": "w3"}],
        prefixes=["bcm11.local:5000", {"name": "nvcr.io/nvidia", "nodes": ["gpu"]}],
        images=[{"ref": "docker.io/library/big:1", "nodes": ["a100"]}, "docker.io/library/small:1"])
    cuda, app = "nvcr.io/nvidia/cuda:12", "bcm11.local:5000/app:1"
    registry = _Registry({cuda: D2})
    policy = Policy(conditions=(moved_tags(settings, registry), label_condition(settings, None)))
    plan = make_plan({"w1": [image(cuda, D1)], "w2": [image(app, D3)], "w3": [image(cuda, D1)]},
                     settings.prefixes, settings.declared_images(), policy=policy)
    assert plan.missing == {
        "w1": ["bcm11.local:5000/app:1", "docker.io/library/big:1", "docker.io/library/small:1", cuda],  # cuda moved
        "w2": ["docker.io/library/small:1", cuda],
        "w3": ["bcm11.local:5000/app:1", "docker.io/library/small:1"],
    }
    why = plan.excluded["w3"]
    assert why["docker.io/library/big:1"].kind == "n/a"
    assert why["docker.io/library/big:1"].reason == f"{NOT_FOR_LABELS} (it needs a100; the node has none)"
    assert "docker.io/library/big:1" in plan.excluded["w2"]
    # w3 holds cuda: not updated there, not excluded, and still a holder
    assert ("w3", cuda) not in plan.moved and cuda not in why and plan.held("w3", cuda) == (True, D1)
    assert plan.labels == {"w1": ("gpu", "a100"), "w2": ("gpu",), "w3": ()}
    assert unselected(settings, ["gpu"], cuda) is None
    assert unselected(settings, [], cuda).startswith(NOT_FOR_LABELS)
    assert unselected(settings, [], app) is None


def test_plain_prefixes_mean_every_node():
    from imagesync.planning.labels import label_condition

    settings = _settings(nodes=[{"name": "w1", "labels": ["gpu"]}, {"name": "w2"}])
    plan = make_plan({"w1": [image("nvcr.io/nvidia/cuda:12")], "w2": []}, settings.prefixes,
                     policy=Policy(conditions=(label_condition(settings, None),)))
    assert plan.missing == {"w2": ["nvcr.io/nvidia/cuda:12"]} and plan.excluded == {}


def test_an_agents_labels_come_from_its_flag_else_agent_labels_and_travel_with_its_registration():
    import fakeredis

    from imagesync.agents import agent_node, register
    from imagesync.planning.labels import labels_of, node_labels

    settings = _settings(agents=True, agent_labels=["gpu"])
    redis = fakeredis.FakeRedis()
    register(redis, agent_node(settings, "a1"), None, None, forget=60)
    register(redis, agent_node(settings, "a2", labels="cpu, big"), None, None, forget=60)
    assert node_labels(settings, redis, ["w1", "a1", "a2"]) == {"w1": (), "a1": ("gpu",), "a2": ("cpu", "big")}
    assert labels_of(settings, None, "a1") == ()  # without Redis, no agent is known


def test_the_old_digest_of_a_moved_tag_left_untagged_on_a_node_is_not_spread_unless_declared():
    import fakeredis

    from imagesync.planning.refresh import moved_tags

    app, repo = "nvcr.io/nvidia/app:1", "nvcr.io/nvidia/app"
    redis = fakeredis.FakeRedis()
    registry = _Registry({app: D2})
    policy = Policy(conditions=(moved_tags(_settings(), registry, redis=redis),))
    # the registry moved app:1 from D1 to D2; w1 is updated in this run
    first = make_plan({"w1": [image(app, D1)], "w2": [image(app, D2)]}, PREFIXES, policy=policy)
    assert first.moved == {("w1", app): (D1, D2)}
    # next run: w1 kept the old image as an untagged name (the CRI does), w2 never had it
    leftover = image(None, D1, repo=repo)
    inventories = {"w1": [image(app, D2), leftover], "w2": [image(app, D2)]}
    second = make_plan(inventories, PREFIXES, policy=policy)
    assert second.missing == {} and f"{repo}@{D1}" not in second.wanted
    # without the memory it would spread, as any untagged image does; declared, it is wanted
    assert make_plan(inventories, PREFIXES).missing == {"w2": [f"{repo}@{D1}"]}
    declared = Policy(conditions=(moved_tags(_settings(images=[f"{repo}@{D1}"]), registry, redis=redis),))
    assert make_plan(inventories, PREFIXES, [f"{repo}@{D1}"], policy=declared).missing == {"w2": [f"{repo}@{D1}"]}


def test_asked_later_a_plan_moves_nothing_yet_and_names_the_pulls_an_answer_may_change():
    """A run sends first what no answer about the tags held can change; the plan made with the
    answers moves what the plan made at once would have moved."""
    from imagesync.planning.refresh import Later, moved_tags

    app, new, repo = "nvcr.io/nvidia/app:1", "nvcr.io/nvidia/new:1", "nvcr.io/nvidia/app"
    registry = _Registry({app: D2, new: D3})
    facts = {node: NodeFacts(platform="linux/amd64", ctr=True) for node in ("w1", "w2", "w3")}
    # w1 holds app under the old digest and an untagged old image; w2 the new digest and `new`
    inventories = {"w1": [image(app, D1), image(None, D3, repo=repo)], "w2": [image(app, D2), image(new, D3)],
                   "w3": []}

    def plan(source: str, later: Later | None = None, answers: dict | None = None):
        settings = _settings(source=source)
        condition = moved_tags(settings, registry, later=later, answers=answers)
        return make_plan(inventories, PREFIXES, facts=facts, policy=Policy(conditions=(condition,), transfer=True,
                                                                            source=source))

    later = Later()
    first = plan("registry", later)
    assert registry.asked == [] and first.moved == {}
    assert sorted(later.tags) == [app, new] and later.leftovers == {f"{repo}@{D3}"}
    # registry first: only the digest name that may be app's leftover waits
    assert later.waiting(first) == {(node, f"{repo}@{D3}") for node in ("w2", "w3")}
    # peers first: a tag copied from its holders waits too (they may hold an old digest)
    peers_first = plan("peers-first", Later())
    assert {pull for pull in Later.waiting(later, peers_first) if "@" not in pull[1]} == {
        ("w1", new), ("w3", app), ("w3", new)}
    # with the answers, the plan moves w1's app as a plan that asks at once does
    answered = plan("registry", answers=registry.current)
    assert answered.moved == plan("registry").moved == {("w1", app): (D1, D2)}
