"""End to end on the real cluster: sshd + containerd nodes, a registry, Redis, Celery workers.

Every assertion on images asks the nodes' containerd directly, not imagesync.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from helpers import wait_for

from testcluster.measure import max_concurrency

pytestmark = pytest.mark.cluster


def _run_record(deployment, run_line):
    run_id = run_line.split()[1]
    return deployment.history(run_id)


def _started_run(result):
    for line in result.stdout.splitlines():
        if line.startswith("run ") and " started" in line:
            return line.split()[1]
    raise AssertionError(f"no run started:\n{result.stdout}\n{result.stderr}")


@pytest.mark.parametrize("runtime", ["crictl", "ctr"])
def test_two_nodes_end_with_the_union_of_their_prefixed_images(deploy, runtime):
    d = deploy(nodes=2, runtime=runtime)
    d.cluster.seed({
        "node-1": ["bcm11/app:1", "nvidia/pytorch:24.01-py3", "other/tool:1"],
        "node-2": ["bcm11/lib:2", "nvidia/cuda:12"],
    })
    outside = d.cluster.ref("other/tool:1")
    d.configure(runtime=runtime)
    d.start()

    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stderr + result.stdout
    one, two = d.held("node-1"), d.held("node-2")
    assert len(one) == 4
    assert one == two  # same references, same digests
    assert all(one[ref] == d.cluster.digests[ref] for ref in one)
    assert outside in d.cluster.node("node-1").images()
    assert outside not in d.cluster.node("node-2").images()

    run = d.history(_started_run(result))
    assert run["status"] == "completed"
    assert run["counts"] == {"pulled": 4}

    again = d.cli("sync", "--wait")
    assert again.returncode == 0
    assert "every node already holds every image" in again.stdout


def test_four_nodes_with_images_spread_unevenly(deploy):
    d = deploy(nodes=4)
    d.cluster.seed({
        "node-1": ["bcm11/a:1", "bcm11/b:1", "bcm11/c:1", "nvidia/d:1"],
        "node-2": ["bcm11/a:1"],
        "node-3": [],
        "node-4": ["nvidia/e:1", "nvidia/f:1"],
    })
    d.configure(max_parallel=3)
    d.start()
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stderr + result.stdout
    holdings = [d.held(f"node-{i}") for i in range(1, 5)]
    assert len(holdings[0]) == 6
    assert all(h == holdings[0] for h in holdings)
    run = d.history(_started_run(result))
    assert run["counts"] == {"pulled": 2 + 5 + 6 + 4}


def test_an_image_the_registry_lost_fails_with_its_reason_and_the_rest_completes(deploy):
    # with transfer on, node-2 would copy it from node-1 (tests/test_transfer.py): no node may serve it here
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/gone:1", "bcm11/kept:1"], "node-2": []})
    d.cluster.registry.delete_image("bcm11/gone", "1")
    d.configure(transfer=False)
    d.start()
    result = d.cli("sync", "--wait")
    assert result.returncode == 1
    gone = d.cluster.ref("bcm11/gone:1")
    assert d.cluster.ref("bcm11/kept:1") in d.held("node-2")
    assert gone not in d.held("node-2")
    run = d.history(_started_run(result))
    failed = [r for r in run["results"] if r["status"] == "failed"]
    assert [(r["node"], r["image"]) for r in failed] == [("node-2", gone)]
    assert "not found" in failed[0]["reason"]
    assert "not found" in result.stdout
    failed_log = "".join(p.read_text() for p in (d.cluster.log_dir).glob("*/failed_images.log"))
    assert f"node=node-2 image={gone} status=failed" in failed_log
    assert "not found" in failed_log
    success_log = "".join(p.read_text() for p in (d.cluster.log_dir).glob("*/success_images.log"))
    assert d.cluster.ref("bcm11/kept:1") in success_log


def test_a_node_whose_sshd_is_down_is_skipped_and_the_others_converge(deploy):
    d = deploy(nodes=3)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": ["nvidia/b:1"], "node-3": ["bcm11/only-on-3:1"]})
    d.configure()
    d.start()
    d.cluster.node("node-3").stop_sshd()
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "node-3" in result.stdout and "skipped" in result.stdout
    assert d.held("node-1") == d.held("node-2")
    # node-3's images are not wanted elsewhere while it is unreachable
    assert d.cluster.ref("bcm11/only-on-3:1") not in d.held("node-1")
    run = d.history(_started_run(result))
    assert "Cannot connect to node-3 via SSH" in run["skipped"]["node-3"]
    assert run["expected"] == 2


def test_a_hanging_registry_ends_at_time_out_and_leaves_nothing_running(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/slow:1"], "node-2": []})
    d.configure(time_out=5)
    d.start()
    d.cluster.proxy.hang()
    result = d.cli("sync", "--wait")
    assert result.returncode == 1
    run = d.history(_started_run(result))
    assert [r["status"] for r in run["results"]] == ["timed_out"]
    assert "time_out (5 s)" in run["results"][0]["reason"]
    # ended on the node, by the signal of its own timeout: no error of its own, never finished
    (pull,) = d.cluster.node("node-2").pulls()
    assert pull.outcome == "killed", pull
    assert d.cluster.node("node-2").processes(r"crictl.* pull") == []
    assert d.cluster.node("node-2").processes(r"\btimeout\b") == []


def test_max_parallel_holds_on_the_node(deploy):
    d = deploy(nodes=2)
    images = [f"bcm11/app{i}:1" for i in range(8)]
    d.cluster.seed({"node-1": images, "node-2": []})
    d.configure(max_parallel=2)
    d.start()
    d.cluster.proxy.delay(1.0)
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stderr + result.stdout
    pulls = [p for p in d.cluster.node("node-2").pulls() if p.end is not None]
    assert len(pulls) == 8
    # measured where the pulls run: the crictl processes on node-2
    assert max_concurrency((p.start, p.end) for p in pulls) == 2


def test_ten_concurrent_triggers_make_exactly_one_run(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": [f"bcm11/app{i}:1" for i in range(4)], "node-2": []})
    d.configure(max_parallel=1)
    d.start()
    # the run's pulls wait until every trigger has been answered: none comes after the run ended
    d.cluster.proxy.hold()
    env = {"IMAGESYNC_CONFIG": str(d.config_path)}
    outputs = []

    def cli():
        outputs.append(d.cli("sync"))

    def celery_call():
        import os
        outputs.append(subprocess.run(
            [sys.executable, "-m", "celery", "-A", "imagesync", "call", "imagesync.sync",
             "--kwargs", json.dumps({"trigger": "celery-call"})],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=120))

    def beat_like():
        import os
        code = ("from imagesync.celery import app; "
                "print(app.send_task('imagesync.sync', kwargs={'trigger': 'beat'}).get(timeout=120))")
        outputs.append(subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                                      capture_output=True, text=True, timeout=150))

    control_log = d.services.processes["control"].log_path
    answers = ("'status': 'already-running'", "'status': 'started'")

    def answered():
        text = control_log.read_text(errors="replace")
        return sum(text.count(answer) for answer in answers)

    threads = [threading.Thread(target=f) for f in [cli] * 4 + [celery_call] * 4 + [beat_like] * 2]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: answered() >= 10, 120, "every sync task answered")
    finally:
        d.cluster.proxy.release()
    for t in threads:
        t.join()
    cli_results = [o for o in outputs if "imagesync.cli" in " ".join(o.args)]
    assert sorted(o.returncode for o in cli_results) in ([0, 3, 3, 3], [3, 3, 3, 3])
    for o in cli_results:
        if o.returncode == 3:
            assert "already running" in o.stderr
    runs = d.history()
    assert len(runs) == 1, runs
    # every sync task answered: one started, nine said already running
    text = control_log.read_text(errors="replace")
    assert text.count(answers[0]) == 9
    assert text.count(answers[1]) == 1


def test_beat_alone_brings_a_new_image_to_every_node(deploy):
    d = deploy(nodes=3)
    d.cluster.seed({"node-1": ["bcm11/base:1"], "node-2": ["bcm11/base:1"], "node-3": ["bcm11/base:1"]})
    d.configure(schedule=10)
    d.start()
    d.services.start_beat()
    new = d.cluster.seed({"node-2": ["nvidia/new:1"]})["node-2"][0]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if all(new in d.held(n) for n in ("node-1", "node-3")):
            break
        time.sleep(1)
    else:
        pytest.fail(f"beat did not bring {new} to every node:\n{d.services.log('beat')}")
    assert any(run["trigger"] == "beat" for run in d.history())


def test_check_reports_ssh_and_runtime_per_node(deploy):
    d = deploy(nodes=3)
    d.configure()
    d.cluster.node("node-2").regenerate_host_key()
    d.cluster.node("node-3").stop_sshd()
    result = d.cli("check", env={"COLUMNS": "400"})  # one line per node
    assert result.returncode == 1
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("│")}
    assert "ok" in rows["node-1"] and "crictl ok" in rows["node-1"]
    assert "FAILED" in rows["node-2"]
    assert "does not match" in result.stdout.replace("\n", " ")
    assert "FAILED" in rows["node-3"]
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "Cannot connect to node-3 via SSH" in text
    assert "2 of 3 nodes failed the check: node-2, node-3" in result.stderr


def test_sync_node_warms_only_the_named_node(deploy):
    d = deploy(nodes=3)
    d.cluster.seed({"node-1": ["bcm11/a:1", "nvidia/b:1"], "node-2": [], "node-3": []})
    d.configure()
    d.start()
    result = d.cli("sync", "--wait", "--node", "node-3")
    assert result.returncode == 0, result.stderr + result.stdout
    assert d.held("node-3") == d.held("node-1")
    assert d.held("node-2") == {}
    unknown = d.cli("sync", "--node", "node-9")
    assert unknown.returncode == 2
    assert "no node named 'node-9'" in unknown.stderr


def test_a_node_served_by_a_worker_running_on_it_uses_the_local_transport(deploy):
    import os

    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": ["nvidia/b:1"]})
    local = d.cluster.node("node-1")
    d.configure(nodes_extra={"node-1": {"transport": "local", "endpoint": f"unix://{local.socket}"}})
    # the worker "on" node-1 finds that node's crictl on its PATH, as on a real node
    d.services.env["PATH"] = f"{local.bin_dir}:{os.environ['PATH']}"
    local.stop_sshd()  # nothing reaches node-1 over SSH: only the local transport can
    d.start()
    result = d.cli("sync", "--wait", env={"PATH": d.services.env["PATH"]})
    assert result.returncode == 0, result.stderr + result.stdout
    assert d.held("node-1") == d.held("node-2")
    assert len(d.held("node-1")) == 2


def test_a_pull_that_waited_past_its_expiry_is_reported_expired(deploy):
    import os

    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": []})
    d.configure()
    image = d.cluster.ref("bcm11/a:1")
    from imagesync.runs import RunStore

    RUN = "20261204-000000-e0e0e0"  # a run id of imagesync's grammar: another is refused unreported
    RunStore(d.cluster.redis.client(), stale_after=600, lock_ttl=600).create(
        RUN, trigger="test", pulls=[("node-2", image)], skipped={}, drift=[], refused=[], wanted=1)
    # already past its expiry when sent, while node-2's worker is not running yet
    send = ("import sys; from imagesync.tasks import send_pull; "
            f"send_pull('node-2', sys.argv[1], '{RUN}', -1)")
    subprocess.run([sys.executable, "-c", send, image], check=True, timeout=60,
                   env={**os.environ, "IMAGESYNC_CONFIG": str(d.config_path)})
    d.services.start_worker("node-2")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and d.history(RUN)["status"] == "running":
        time.sleep(0.5)
    run = d.history(RUN)
    assert run["status"] == "completed"
    assert [(r["node"], r["status"]) for r in run["results"]] == [("node-2", "expired")]
    assert image not in d.held("node-2")


@pytest.mark.parametrize("runtime", ["crictl", "ctr"])
def test_a_registry_that_demands_a_login_gets_the_configured_one_and_nothing_shows_it(deploy, runtime):
    secret = "pa55-Wörd with spaces"
    d = deploy(nodes=2, runtime=runtime, registry_login=("robot$sync", secret))
    d.cluster.seed({"node-1": ["bcm11/private:1"], "node-2": []})
    image = d.cluster.ref("bcm11/private:1")
    registry = d.cluster.registry_address
    # first without the login: the registry's refusal is permanent, not retried (nor
    # copied from node-1, which holds it: this is about the registry's answer)
    d.configure(runtime=runtime, transfer=False)
    d.start()
    refused = d.cli("sync", "--wait")
    assert refused.returncode == 1
    outcome = d.history(_started_run(refused))["results"][0]
    assert outcome["status"] == "failed" and outcome["attempts"] == 1
    assert "401" in outcome["reason"] or "unauthorized" in outcome["reason"].lower()
    d.services.stop_all()

    password_file = d.workdir / "registry-password"
    password_file.write_text(secret + "\n")
    d.configure(runtime=runtime, registries={registry: {"username": "robot$sync", "password_file": str(password_file)}})
    d.start()
    result = d.cli("sync", "--wait")
    assert result.returncode == 0, result.stderr + result.stdout
    assert image in d.held("node-2")

    shown = d.cli("config", "show").stdout + d.cli("history", "--json").stdout
    shown += d.cli("history", "--json", _started_run(result)).stdout
    logs = [p for p in d.cluster.log_dir.rglob("*.log")] + list((d.workdir / "services").glob("*.log"))
    assert logs
    for text in [shown, *(p.read_text(errors="replace") for p in logs)]:
        assert secret not in text
