"""Platforms on the real cluster: images with nothing for a node's platform, multi-arch
indexes, per-architecture references, and seed 003's image.config.

Three ctr nodes, all amd64 here; node-3 is configured as ``platform = "linux/arm64"``,
so its pulls take the arm64 manifest (``ctr images pull --platform``). Indexes are
built as OCI layouts and pushed with ``skopeo copy --all``. Every assertion on images
asks the nodes' containerd directly.

The module's cluster is set up once, up to the end of a first run (the plan before it,
``d.first_plan``; the run, ``d.first`` and ``d.first_run``; the plan after it,
``d.settled_plan``); each test reads that or sets up its own images, so none needs another.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Deployment
from helpers import measured, started_run, wait_for

from imagesync import keys
from imagesync.attempt import Attempt
from imagesync.config import load_settings
from imagesync.outcomes import PULLED
from imagesync.planning.plan import REGISTRY, Route
from imagesync.pulls import from_registry
from imagesync.registry import RegistryClient
from imagesync.runs import pull_key
from imagesync.runtimes import PINNED_LABEL
from testcluster.cluster import Cluster
from testcluster.image import write_oci_index

pytestmark = pytest.mark.cluster

SEED_003 = [
    {"ref": "ubuntu:xenial", "registry": "docker.io", "private": False, "config": "jarvice-docker",
     "arch": {"amd64": "docker.io/library/ubuntu:xenial", "ppc64le": "docker.io/ppc64le/ubuntu:xenial"}},
    {"ref": "fail-test", "registry": "docker.io", "private": True, "config": "jarvice-docker",
     "arch": {"amd64": "docker.io/kenhill/abc123:test"}},
]


#: a registry name only the nodes know (their hosts.toml points it at the test registry): the control
#: host cannot ask it which platforms an image has, so only a pull finds out
NODES_ONLY = "mirror.imagesync.invalid:5000"


def push_index(cluster: Cluster, workdir, image: str, platforms: list[str], generation: int = 1) -> str:
    """Push ``repo:tag`` as an OCI index with one manifest per platform; returns its digest."""
    repo, tag = image.rsplit(":", 1)
    layout = workdir / f"{repo.replace('/', '-')}-{tag}-{generation}"
    digest = write_oci_index(layout, repo, tag, platforms, size=1024 + generation)
    subprocess.run(["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                    f"docker://{cluster.registry.address}/{image}"], check=True, capture_output=True, timeout=60)
    return digest


def ctr_pull(d: Deployment, node: str, image: str, platform: str | None = None) -> None:
    """Pull on a node as an operator would with ctr (``--platform`` stores another platform's image)."""
    n = d.cluster.node(node)
    argv = ["ctr", "-a", n.socket, "-n", "k8s.io", "images", "pull", "--hosts-dir", str(n.workdir / "certs.d")]
    n.run(argv + (["--platform", platform] if platform else []) + [d.cluster.ref(image)])


def labels(d: Deployment, node: str) -> dict[str, set[str]]:
    """Each image reference a node's containerd holds -> its labels, as ``ctr images ls`` shows them."""
    n = d.cluster.node(node)
    out = n.run(["ctr", "-a", n.socket, "-n", "k8s.io", "images", "ls"]).stdout
    return {fields[0]: set(fields[-1].split(",")) - {"-"}
            for fields in (line.split() for line in out.splitlines()[1:]) if len(fields) >= 3}


def reach_only_from_nodes(cluster: Cluster, name: str) -> None:
    """Point the registry name ``name`` at the test registry in every node's hosts dir."""
    for node in cluster.nodes:
        hosts = node.workdir / "certs.d" / name / "hosts.toml"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f'server = "http://{cluster.proxy.address}"\n\n'
                         f'[host."http://{cluster.proxy.address}"]\n  capabilities = ["pull", "resolve"]\n')


def cli_json(d: Deployment, *args: str):
    result = d.cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("platforms")
    began = time.monotonic()
    with Cluster(workdir / "cluster", nodes=3, runtime="ctr") as cluster:
        deployment = Deployment(cluster, workdir)
        with deployment.services:
            ref = cluster.ref
            indexes = {
                "arm-only": ("bcm11/arm-only:1", ["linux/arm64"]),
                "multi": ("bcm11/multi:1", ["linux/amd64", "linux/arm64"]),
                "arm-tool": ("arm/tool:1", ["linux/arm64"]),
                # declared, and held by no node: judged by the digest its tag names in the registry
                "declared": ("arm/declared:1", ["linux/arm64"]),
                # declared under a name only the nodes resolve: containerd's own "no match for platform"
                "nodes-only": ("arm/nodes-only:1", ["linux/arm64"]),
                # pushed again with amd64 by a test
                "again": ("bcm11/again:1", ["linux/arm64"]),
                "kept": ("bcm11/kept:1", ["linux/amd64", "linux/arm64"]),
            }
            with ThreadPoolExecutor(4) as pool:
                pushed = {name: pool.submit(push_index, cluster, workdir, image, platforms)
                          for name, (image, platforms) in indexes.items()}
                deployment.digests = {name: future.result() for name, future in pushed.items()}
            cluster.push_many(["amd/tool:1", "library/ubuntu:xenial", "kenhill/abc123:test", "pinning/kept:1"])
            reach_only_from_nodes(cluster, NODES_ONLY)
            # held by the arm64 node: the amd64 nodes need their registry's verdict (an amd64 holder
            # would vouch for them, test_a_run_asks_only_what_no_holder_vouches_for_...)
            ctr_pull(deployment, "node-3", "bcm11/arm-only:1", platform="linux/arm64")
            ctr_pull(deployment, "node-3", "bcm11/again:1", platform="linux/arm64")
            ctr_pull(deployment, "node-1", "bcm11/multi:1")
            # seed 003's file as it is, its registry names pointed at the test registry
            image_config = workdir / "image.config"
            pointed = json.dumps(SEED_003, indent=4).replace('"docker.io', f'"{cluster.registry_address}')
            image_config.write_text(pointed)
            deployment.configure(
                runtime="ctr",
                nodes_extra={"node-3": {"platform": "linux/arm64"}},
                images=[{"ref": ref("jarvice/tool:1"),
                         "arch": {"amd64": ref("amd/tool:1"), "arm64": ref("arm/tool:1")}},
                        ref("arm/declared:1"), f"{NODES_ONLY}/arm/nodes-only:1",
                        {"ref": ref("bcm11/kept:1"), "pin": True}],
                images_file=str(image_config),
                registries={cluster.registry_address: {"username": "jarvice", "password": "not checked here"}},
                # tags pushed again here are judged while their holders keep the old digest: no moved-tag updates
                refresh=False,
            )
            deployment.start()
            measured("cluster, images and workers ready", f"{time.monotonic() - began:.1f} s")
            deployment.first_plan = cli_json(deployment, "plan")
            began = time.monotonic()
            deployment.first = deployment.cli("sync", "--wait")
            measured("first sync", f"{time.monotonic() - began:.1f} s")
            assert deployment.first.returncode == 0, deployment.first.stdout + deployment.first.stderr
            deployment.first_run = deployment.history(started_run(deployment.first))
            deployment.settled_plan = cli_json(deployment, "plan")
            yield deployment


def test_check_and_status_show_each_nodes_platform(d):
    check = d.cli("check", env={"COLUMNS": "300"})
    assert "linux/amd64" in check.stdout and "linux/arm64 (config)" in check.stdout, check.stdout + check.stderr
    status = d.cli("status", env={"COLUMNS": "300"})
    assert status.returncode == 0, status.stderr
    assert "linux/amd64" in status.stdout and "linux/arm64" in status.stdout
    facts = cli_json(d, "status")["facts"]
    assert {node: f["platform"] for node, f in facts.items()} == {
        "node-1": "linux/amd64", "node-2": "linux/amd64", "node-3": "linux/arm64"}
    assert facts["node-3"]["platform_from"] == "config"


def test_an_image_with_nothing_for_amd64_is_na_there_and_the_rest_syncs(d):
    arm_only, multi = d.cluster.ref("bcm11/arm-only:1"), d.cluster.ref("bcm11/multi:1")
    plan = d.first_plan
    assert plan["excluded"]["node-2"][arm_only] == {
        "kind": "n/a", "reason": "no manifest for linux/amd64: the image has linux/arm64"}
    declared = d.cluster.ref("arm/declared:1")
    for node in ("node-1", "node-2"):
        assert plan["excluded"][node][declared]["kind"] == "n/a"
    assert declared in plan["missing"]["node-3"]

    run = d.first_run
    pulls = {(r["node"], r["image"]): r["status"] for r in run["results"]}
    assert ("node-2", arm_only) not in pulls  # no pull was sent
    assert pulls[("node-3", declared)] == "pulled" and ("node-1", declared) not in pulls
    assert run["excluded"]["node-2"][arm_only]["kind"] == "n/a"
    assert arm_only not in d.cluster.node("node-2").images()
    # the arm64 node holds it (ctr --platform linux/arm64), and the multi-arch index went everywhere
    assert d.cluster.node("node-3").images()[arm_only] == d.digests["arm-only"]
    for node in ("node-2", "node-3"):
        assert d.cluster.node(node).images()[multi] == d.digests["multi"]
    assert pulls[("node-2", multi)] == pulls[("node-3", multi)] == "pulled"
    # ctr reports the index digest whatever platform it took: the same tag on two platforms is not drift
    assert multi not in {item["reference"] for item in d.settled_plan["drift"]}

    status = d.cli("status", env={"COLUMNS": "300"})
    row = next(line for line in status.stdout.splitlines() if "arm-only" in line)
    assert "n/a" in row


def test_a_pull_containerd_finds_nothing_for_amd64_is_not_applicable_and_the_next_plan_knows(d):
    image, digest = f"{NODES_ONLY}/arm/nodes-only:1", d.digests["nodes-only"]
    # the control host could not ask that registry: no verdict, so the amd64 nodes pulled it
    for node in ("node-1", "node-2"):
        assert image in d.first_plan["missing"][node]
    results = {r["node"]: r for r in d.first_run["results"] if r["image"] == image}
    for node in ("node-1", "node-2"):
        assert results[node]["status"] == "not_applicable", results[node]
        assert f"no match for platform in manifest {digest}: not found" in results[node]["reason"]
    assert results["node-3"]["status"] == PULLED
    assert d.cluster.node("node-3").images()[image] == digest
    # n/a is no failure: the run completed, and its summary says what was not applicable
    assert d.first_run["status"] == "completed"
    assert "not applicable" in d.first.stdout
    # the verdict is kept under the digest containerd named...
    with d.cluster.redis.client() as client:
        assert client.hget(keys.platforms(digest), "not:linux/amd64") == b"pull"
    # ... and the next plan leaves the image off an amd64 node that lacks it. (ctr keeps the
    # index's name after such a pull; without it, node-2 lacks the image as a node that never tried.)
    node2 = d.cluster.node("node-2")
    node2.run(["ctr", "-a", node2.socket, "-n", "k8s.io", "images", "rm", image], check=False)
    assert image not in node2.images()
    plan = cli_json(d, "plan")
    assert plan["excluded"]["node-2"][image] == {"kind": "n/a",
                                                 "reason": "no manifest for linux/amd64 (a pull found none)"}
    assert image not in plan["missing"].get("node-2", [])


def test_each_node_pulls_its_architectures_reference_and_holds_it_under_ref(d):
    ref = d.cluster.ref
    entry, amd, arm = ref("jarvice/tool:1"), ref("amd/tool:1"), ref("arm/tool:1")
    one, three = d.cluster.node("node-1").images(), d.cluster.node("node-3").images()
    assert one[entry] == one[amd] == d.cluster.digests[amd]
    assert three[entry] == three[arm] == d.digests["arm-tool"]
    assert amd not in three and arm not in one


def test_seed_003s_image_config_is_read_and_synced(d):
    ubuntu, fail_test = ref_pair = ("docker.io/library/ubuntu:xenial", "docker.io/library/fail-test:latest")
    for node in ("node-1", "node-2"):
        held = d.cluster.node(node).images()
        assert held[ubuntu] == d.cluster.digests[d.cluster.ref("library/ubuntu:xenial")]
        assert held[fail_test] == d.cluster.digests[d.cluster.ref("kenhill/abc123:test")]
    assert not set(ref_pair) & set(d.cluster.node("node-3").images())
    excluded = d.settled_plan["excluded"]["node-3"]
    assert excluded[ubuntu] == {"kind": "n/a", "reason": "no reference for arm64: the entry has amd64, ppc64le"}
    assert excluded[fail_test]["kind"] == "n/a"


def test_the_next_run_sends_no_pull_and_asks_the_registry_only_the_tags_it_keeps_off_nodes(d):
    d.cluster.proxy.clear()
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every node already holds every image" in result.stdout
    run = d.history(started_run(result))
    assert run["results"] == []
    assert run["excluded"]["node-2"][d.cluster.ref("bcm11/arm-only:1")]["kind"] == "n/a"
    asked = [r.path for r in d.cluster.proxy.requests if "arm-only" in r.path]
    # judged once, on the first plan: what its tag names now is asked again (was it pushed again?), no more
    assert asked and set(asked) == {"/v2/bcm11/arm-only/manifests/1"}, asked


def test_a_tag_pushed_again_with_amd64_becomes_applicable(d):
    again = d.cluster.ref("bcm11/again:1")
    assert d.first_run["excluded"]["node-2"][again]["kind"] == "n/a"
    digest = push_index(d.cluster, d.workdir, "bcm11/again:1", ["linux/amd64", "linux/arm64"], generation=2)
    # its holders now hold the new index (the digest most holders hold is the one judged)
    ctr_pull(d, "node-1", "bcm11/again:1", platform="linux/arm64")
    ctr_pull(d, "node-3", "bcm11/again:1", platform="linux/arm64")
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(started_run(result))
    assert {(r["node"], r["status"]) for r in run["results"] if r["image"] == again} == {("node-2", "pulled")}
    assert again not in run["excluded"].get("node-2", {})
    assert {node: d.cluster.node(node).images()[again] for node in ("node-1", "node-2", "node-3")} == {
        "node-1": digest, "node-2": digest, "node-3": digest}


def test_a_pinned_pull_leaves_the_label_in_the_nodes_containerd(d):
    # this cluster's containerd is 1.6, which does not keep pinned images from the kubelet's
    # GC: the declared image with pin = true was pulled there unpinned
    kept = d.cluster.ref("bcm11/kept:1")
    assert cli_json(d, "status")["facts"]["node-2"]["containerd"].startswith("1.6")
    assert {(r["node"], r["status"]) for r in d.first_run["results"] if r["image"] == kept} >= {
        ("node-1", PULLED), ("node-2", PULLED)}
    for node in ("node-1", "node-2"):
        assert PINNED_LABEL not in labels(d, node)[kept]
    # the pull imagesync sends where containerd can pin: the label is in containerd's own record
    ref = d.cluster.ref("pinning/kept:1")
    settings = load_settings(d.config_path)
    route = Route((REGISTRY,), pin=True)
    outcome, _ = from_registry(Attempt(settings, settings.node("node-2"), ref, route, check=False))
    assert outcome.status == PULLED, outcome.reason
    assert PINNED_LABEL in labels(d, "node-2")[ref]
    assert d.cluster.node("node-2").images()[ref] == d.cluster.digests[ref]


def test_the_registry_client_reads_an_index_and_a_single_manifest(d):
    client = RegistryClient(load_settings(d.config_path, {}))
    multi, amd = d.cluster.ref("bcm11/multi:1"), d.cluster.ref("amd/tool:1")
    assert client.platforms(multi, d.digests["multi"]) == ["linux/amd64", "linux/arm64"]
    assert client.platforms(amd, d.cluster.digests[amd]) == ["linux/amd64"]


def test_a_registry_that_does_not_answer_does_not_hold_the_plan(d):
    late = d.cluster.ref("bcm11/late:1")
    # for no node's platform: once judged, no node pulls it, and the module's nodes stay up to date
    push_index(d.cluster, d.workdir, "bcm11/late:1", ["linux/s390x"])
    ctr_pull(d, "node-3", "bcm11/late:1", platform="linux/s390x")
    d.cluster.proxy.clear()
    d.cluster.proxy.hang(match="bcm11/late/manifests/sha256")
    try:
        began = time.monotonic()
        plan = cli_json(d, "plan")
        took = time.monotonic() - began
    finally:
        d.cluster.proxy.passthrough()
    measured("plan with a registry that does not answer", f"{took:.1f} s")
    # the plan was made while the registry never answered the question it asked
    asked = wait_for(lambda: [r for r in d.cluster.proxy.requests if "bcm11/late/manifests/sha256" in r.path],
                     10, "the proxy's record of the question it never answered")
    assert all(r.mode == "hang" and r.status is None for r in asked)
    assert late in plan["missing"]["node-2"]  # no verdict: pulled as before, asked again next time
    assert late not in plan["excluded"].get("node-2", {})
    plan = cli_json(d, "plan")
    assert plan["excluded"]["node-2"][late]["kind"] == "n/a"


def test_a_tag_pushed_again_for_more_platforms_is_judged_again_while_its_holders_keep_the_old_digest(d):
    app = d.cluster.ref("bcm11/app:1")
    old = d.cluster.registry.push_image("bcm11/app", "1")  # one manifest: amd64
    for node in ("node-1", "node-2"):
        ctr_pull(d, node, "bcm11/app:1")
    assert cli_json(d, "plan")["excluded"]["node-3"][app] == {
        "kind": "n/a", "reason": "no manifest for linux/arm64: the image has linux/amd64"}
    # pushed again as an index with arm64; the amd64 nodes keep the digest they hold
    new = push_index(d.cluster, d.workdir, "bcm11/app:1", ["linux/amd64", "linux/arm64"], generation=2)
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(started_run(result))
    assert {(r["node"], r["status"]) for r in run["results"] if r["image"] == app} == {("node-3", PULLED)}
    assert app not in run["excluded"].get("node-3", {})
    assert {node: d.cluster.node(node).images()[app] for node in ("node-1", "node-2", "node-3")} == {
        "node-1": old, "node-2": old, "node-3": new}


def test_a_run_asks_only_what_no_holder_vouches_for_and_sends_the_rest_first(d):
    vouched, slow = d.cluster.ref("bcm11/vouched:1"), d.cluster.ref("bcm11/slow:1")
    d.cluster.registry.push_image("bcm11/vouched", "1")  # one manifest: amd64
    ctr_pull(d, "node-1", "bcm11/vouched:1")
    d.cluster.proxy.clear()
    # node-1 vouches for node-2, of its platform: the plan asks the registry nothing about the image
    plan = cli_json(d, "plan", "--node", "node-2")
    assert vouched in plan["missing"]["node-2"]
    assert not [r.path for r in d.cluster.proxy.requests if "bcm11/vouched" in r.path]
    # ... while node-3, of another platform, is asked about
    assert vouched in cli_json(d, "plan", "--node", "node-3")["excluded"]["node-3"]
    assert [r.path for r in d.cluster.proxy.requests if "bcm11/vouched/manifests/sha256" in r.path]

    # a run: the question about slow's platforms hangs; the pull of vouched goes ahead of it
    push_index(d.cluster, d.workdir, "bcm11/slow:1", ["linux/amd64", "linux/arm64"])
    ctr_pull(d, "node-3", "bcm11/slow:1", platform="linux/arm64")  # no amd64 node vouches for it
    question = "bcm11/slow/manifests/sha256"
    d.cluster.proxy.clear()
    d.cluster.proxy.hang(match=question)
    with d.cluster.redis.client() as client:
        before = client.lindex(keys.HISTORY, 0)
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(d.cli, "sync", "--node", "node-2", "--wait")
            try:
                run_id = wait_for(lambda: (r := client.lindex(keys.HISTORY, 0)) != before and r, 60,
                                  "the run's record").decode()
                wait_for(lambda: client.hexists(keys.run_results(run_id), pull_key("node-2", vouched)), 60,
                         "node-2's pull of the vouched image")
                # the question was asked and is still unanswered
                assert not [r for r in d.cluster.proxy.requests if question in r.path]
            finally:
                d.cluster.proxy.passthrough()
            result = sync.result()
    assert result.returncode == 0, result.stdout + result.stderr
    asked = [r for r in d.cluster.proxy.requests if question in r.path]
    assert asked and asked[0].mode == "hang"
    run = d.history(run_id)
    # no verdict within the budget: slow is pulled, as before, into the same run
    assert {(r["node"], r["image"], r["status"]) for r in run["results"]} == {
        ("node-2", vouched, PULLED), ("node-2", slow, PULLED)}
    assert (run["status"], run["expected"]) == ("completed", 2)

