"""A run's life on the real cluster, from the audit of the suite: Redis crashing under
it, the registry refusing connections, beat ending a stuck run by itself, late pulls
of an abandoned run, what status/plan/history show, triggers racing each other, and
the log lines an operator reads.

Real redis-server, docker-registry, containerd + sshd nodes and Celery workers.
Images are checked on the nodes' containerd (``Deployment.held``, ``Node.images``),
runs in their records (``imagesync history --json``), and the log files as written.
The few waiting helpers are copied from test_faults.py (not imported), so that this
file does not depend on another module that is edited on its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import finish, measured, reported, started_run, wait_for

from imagesync import keys
from imagesync.budgets import stale_after
from imagesync.config import load_settings
from imagesync.runstores import run_store
from imagesync.sync import finalize_stale

pytestmark = pytest.mark.cluster


# -- helpers (as in test_faults.py) ----------------------------------------------------------------


def cli_env(d):
    return {**os.environ, "IMAGESYNC_CONFIG": str(d.config_path), "COLUMNS": "1000"}


def start_cli(d, *args):
    return subprocess.Popen([sys.executable, "-m", "imagesync.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(d))


def redis_get(d, key, field=None):
    with d.cluster.redis.client() as client:
        value = client.hget(key, field) if field else client.get(key)
    return value.decode() if value else None


def run_status(d, run_id):
    return redis_get(d, keys.run(run_id), "status")


def lock_holder(d):
    return redis_get(d, keys.LOCK)


def wait_for_run_end(d, run_id, timeout):
    wait_for(lambda: run_status(d, run_id) not in (None, "running"), timeout, f"end of run {run_id}")
    return d.history(run_id)


def all_runs(d):
    result = d.cli("history", "--json", "-n", "1000")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_line(text):
    """A rich table's text with its borders and wrapping undone, to search for a message."""
    for border in "│┃┏┓┗┛┡┩└┘┌┐━─╇╈┼┳┻╋":
        text = text.replace(border, " ")
    return " ".join(text.split())


def table_rows(text):
    """The body rows of a rich table: first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def log_lines_of(process):
    """Everything a service process has logged so far."""
    return process.log_path.read_text(errors="replace")


def log_lines(d, name):
    return [line for path in sorted(d.cluster.log_dir.glob(f"*/{name}")) for line in path.read_text().splitlines()]


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                found.append(int(entry))
    return found


def unacked_pulls(d, queue):
    """Messages kombu holds as delivered but not acknowledged, for ``queue``."""
    with d.cluster.redis.client() as client:
        held = [json.loads(raw) for raw in client.hvals("unacked")]
    return [message for message, _exchange, routing_key in held if routing_key == queue]


def pull_keys(run):
    return [(r["node"], r["image"]) for r in run["results"]]


# == 1. Redis crashes (SIGKILL) in the middle of a run ==============================================


def test_redis_killed_mid_run_comes_back_from_its_aof_and_nothing_is_counted_twice(deploy):
    d = deploy(nodes=2)
    images = [f"bcm11/app{i}:1" for i in range(4)]
    d.cluster.seed({"node-1": images, "node-2": []})
    d.configure(time_out=10, max_parallel=2)
    d.start()
    node = d.cluster.node("node-2")
    redis_dir, port, old_pid = d.cluster.redis.workdir, d.cluster.redis.port, d.cluster.redis.pid
    d.cluster.proxy.delay(3)
    run_id = started_run(d.cli("sync"))
    wait_for(lambda: len(node.processes(r"crictl.* pull ")) >= 2, 30, "two pulls on node-2")

    # A crash, not a shutdown: no final AOF flush. The pulls end while Redis is
    # gone and their reports wait for it; the queued ones wait in the AOF.
    d.cluster.redis.kill()
    assert not alive(old_pid)
    down = time.monotonic()
    wait_for(lambda: any(p.end for p in node.pulls()), 20, "a pull ending while Redis is down")
    d.cluster.redis.start()
    measured("Redis down after SIGKILL (s)", round(time.monotonic() - down, 2))
    assert (d.cluster.redis.port, d.cluster.redis.workdir) == (port, redis_dir)
    assert d.cluster.redis.pid != old_pid
    assert list(redis_dir.glob("**/*.aof*")), "the restarted server has no AOF to come back from"

    settings_ = load_settings(d.config_path)
    run = wait_for_run_end(d, run_id, stale_after(settings_) + 30)
    expected = sorted(("node-2", ref) for ref in d.cluster.digests)
    measured("run after Redis SIGKILL", f"{run['status']} {run['counts']} in {run['finished'] - run['started']:.1f} s")
    # whatever the ending: each (node, image) that reported is counted exactly once
    with d.cluster.redis.client() as client:
        done = client.scard(keys.run_done(run_id))
    assert sum(run["counts"].values()) == len(run["results"]) == done, (run["counts"], run["results"])
    assert len(set(pull_keys(run))) == len(run["results"]) and set(pull_keys(run)) <= set(expected)
    # the README: with AOF a Redis restart loses nothing, and the run completes as usual
    assert run["status"] == "completed", run
    assert run["expected"] == 4
    assert sum(run["counts"].values()) == 4, run["counts"]  # nothing missing, nothing twice
    assert sorted(pull_keys(run)) == expected
    assert {r["status"] for r in run["results"]} <= {"pulled", "present"}, run["results"]
    assert lock_holder(d) is None
    # the pulls that ran through the crash were acknowledged once it was back:
    # none is left for the visibility timeout to hand out again later
    wait_for(lambda: not unacked_pulls(d, "node.node-2"), 15, "no unacknowledged pull left on node.node-2")
    assert d.held("node-2") == {ref: d.cluster.digests[ref] for ref in d.cluster.digests}
    again = d.cli("sync", "--wait")
    assert again.returncode == 0 and "every node already holds every image" in again.stdout, again.stdout
    # The log files copy the record: one line per (node, image) that reported, however often it ran.
    lines = [line for line in log_lines(d, "success_images.log") if f" run={run_id} " in line]
    reported = Counter(re.search(r" node=(\S+) image=(\S+) ", line).groups() for line in lines)
    assert all(n == 1 for n in reported.values()), reported


# == 2. the registry refuses connections, with nothing in between ================================


def test_a_registry_that_refuses_connections_fails_pulls_fast_after_the_retries(deploy):
    d = deploy(nodes=2)
    registry = d.cluster.registry
    # Images named by the registry's own address, not the proxy's: the nodes
    # talk to docker-registry directly, and see its port closed once it stops.
    refs = []
    for repo in ("bcm11/direct-a", "bcm11/direct-b"):
        registry.push_image(repo, "1")
        refs.append(f"{registry.address}/{repo}:1")
    for ref in refs:
        d.cluster.node("node-1").pull(ref)
    # the registry's failure itself: no copy from node-1 (tests/test_faults.py has that)
    d.configure(prefixes=[f"{registry.address}/bcm11"], time_out=45, max_parallel=2, retries=2, transfer=False)
    d.start()
    registry.stop()
    d.cluster.proxy.clear()

    began = time.monotonic()
    result = d.cli("sync", "--wait")
    took = time.monotonic() - began
    measured("registry refusing connections: sync --wait, retries=2 (s)", round(took, 1))
    assert result.returncode == 1, result.stdout + result.stderr
    run = d.history(started_run(result))
    assert run["status"] == "completed"
    assert run["counts"] == {"failed": 2}
    assert sorted(pull_keys(run)) == [("node-2", ref) for ref in refs]
    for outcome in run["results"]:
        assert outcome["attempts"] == 3, outcome  # transient: two retries, then given up
        assert "connection refused" in outcome["reason"].lower(), outcome
        assert registry.address in outcome["reason"], outcome
    # fast: three attempts and their backoff (2 s, 4 s, +-50 %) in less than one time_out (45 s)
    assert run["finished"] - run["started"] < 45, run
    assert "connection refused" in one_line(result.stdout).lower()
    assert d.cluster.proxy.requests == []  # nothing went through the proxy
    assert d.cluster.node("node-2").images() == {}
    assert d.cluster.node("node-2").processes(r"crictl.* pull") == []
    failed = [line for line in log_lines(d, "failed_images.log") if f" run={run['id']} " in line]
    assert len(failed) == 2 and all("status=failed" in line and "attempts=3" in line for line in failed), failed
    assert all("connection refused" in line.lower() for line in failed), failed


# == 3. beat's periodic check ends a stuck run ===================================================


def test_beat_alone_abandons_a_run_whose_node_worker_was_killed_and_frees_the_lock(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/a:1", "bcm11/b:1"], "node-2": []})
    d.configure(time_out=5, max_parallel=1)
    d.start()
    settings_ = load_settings(d.config_path)
    stale = stale_after(settings_)
    assert stale == 5 + 65
    node, worker = d.cluster.node("node-2"), d.services.worker("node-2")
    d.cluster.proxy.delay(30)  # the node's own timeout (5 s) ends it

    run_id = started_run(d.cli("sync"))
    wait_for(lambda: node.processes(r"crictl.* pull"), 30, "a pull on node-2")
    pool = children(worker.pid)
    os.kill(worker.pid, signal.SIGKILL)  # outright: nobody acknowledges or reports
    wait_for(lambda: not any(alive(pid) for pid in pool), 10, "node-2's pool processes gone")
    with d.cluster.redis.client() as client:
        deadline = client.zscore(keys.ACTIVE, run_id)
        assert client.llen("node.node-2") == 1  # the second pull, still queued
        now = run_store(settings_, client).now()  # the Redis clock the scores are on
    assert deadline is not None and lock_holder(d) == run_id
    # the run turns stale stale_after after its last sign of life, and not before
    assert now < deadline <= now + stale, (deadline - now)

    # A beat that checks now finds the run not yet stale, and leaves it alone.
    d.services.start_beat(due=("finalize-stale-runs",))
    control = d.services.processes["control"]
    finalized = wait_for(lambda: re.findall(r"Task imagesync\.finalize\[[^\]]+\] succeeded in [\d.]+s: (\[.*\])",
                                            log_lines_of(control)), 60, "beat's first finalize")
    assert finalized[0] == "[]", finalized
    assert run_status(d, run_id) == "running" and lock_holder(d) == run_id

    # Time passes: stale_after without a pull reporting. The next check ends the run.
    with d.cluster.redis.client() as client:
        deadline = float(client.time()[0])
        client.zadd(keys.ACTIVE, {run_id: deadline})
    d.services.stop("beat")
    d.services.start_beat(due=("finalize-stale-runs",))
    run = wait_for_run_end(d, run_id, 60)
    assert run["status"] == "abandoned", run
    assert run["reason"] == f"no pull reported for {stale} s"
    assert run["finished"] >= deadline, (run["finished"] - deadline)
    assert lock_holder(d) is None
    assert run["counts"] == {}
    # it was beat's imagesync.finalize that ended it: nothing else ran in between
    assert "Sending due task finalize-stale-runs (imagesync.finalize)" in d.services.log("beat")
    control = log_lines_of(control)
    assert re.search(r"Task imagesync\.finalize\[[^\]]+\] succeeded in [\d.]+s: \['" + re.escape(run_id) + r"'\]",
                     control), control
    assert "imagesync.sync" not in d.services.log("beat")
    assert f"run {run_id} abandoned in" in "\n".join(log_lines(d, "image-sync.log"))
    summary = one_line(d.cli("history", run_id).stdout)
    assert "node node-2: 2 pulls never reported (worker or node down?)" in summary, summary

    # node-2's worker comes back: it takes back the pull its predecessor held, and
    # both late pulls are skipped, not run, and change nothing in the ended run
    d.services.start_worker("node-2")
    wait_for(lambda: reported(d, run_id) == 2, 30, "both late pulls")
    late = d.history(run_id)
    assert late["status"] == "abandoned" and late["finished"] == run["finished"]
    for outcome in late["results"]:
        assert outcome["status"] == "skipped", outcome
        assert outcome["reason"] == "run was already abandoned when this pull started", outcome
    assert "took back 1 unacknowledged pulls of node.node-2" in d.services.log("worker-node-2")
    assert d.held("node-2") == {}
    assert lock_holder(d) is None


# == 4. a pull that outlives its run =============================================================


def test_a_queued_pull_of_an_abandoned_run_reports_skipped_when_its_worker_starts(deploy):
    d = deploy(nodes=2)
    image = d.cluster.seed({"node-1": ["bcm11/a:1"], "node-2": []})["node-1"][0]
    d.configure()
    d.start(nodes=["node-1"])  # node-2's worker is down
    run_id = started_run(d.cli("sync"))
    with d.cluster.redis.client() as client:
        assert client.llen("node.node-2") == 1

    # the stale check, as it would run once stale_after has passed without progress
    settings_ = load_settings(d.config_path)
    with d.cluster.redis.client() as client:
        later = client.zscore(keys.ACTIVE, run_id) + 1
        assert finalize_stale(settings_, client, now=later) == [run_id]
    abandoned = d.history(run_id)
    assert abandoned["status"] == "abandoned" and abandoned["results"] == []
    assert lock_holder(d) is None

    d.services.start_worker("node-2")
    wait_for(lambda: reported(d, run_id), 30, "the late pull reported")
    run = d.history(run_id)
    assert run["status"] == "abandoned" and run["finished"] == abandoned["finished"]
    [outcome] = run["results"]
    assert (outcome["node"], outcome["image"], outcome["status"]) == ("node-2", image, "skipped")
    assert outcome["reason"].startswith("run was already abandoned"), outcome
    assert run["counts"] == {"skipped": 1}
    assert image not in d.held("node-2") and d.cluster.node("node-2").pulls() == []
    failed = [line for line in log_lines(d, "failed_images.log") if f" run={run_id} " in line]
    assert len(failed) == 1 and "status=skipped" in failed[0] and "run was already abandoned" in failed[0]
    # the late report writes no summary of its own (the abandoning call, in this
    # process, wrote the run's only one)
    assert not [line for line in log_lines(d, "image-sync.log")
                if re.search(rf"run {run_id} \w+ in [\d.]+ s:", line)]

    result = d.cli("sync", "--wait")  # the next run pulls it
    assert result.returncode == 0, result.stdout + result.stderr
    assert d.history(started_run(result))["counts"] == {"pulled": 1}
    assert image in d.held("node-2")


# == 5. status, plan, tag drift, declared and pinned images ======================================


def test_status_plan_and_history_show_drift_and_declared_pinned_images_settle(deploy):
    d = deploy(nodes=2)
    one, two = d.cluster.node("node-1"), d.cluster.node("node-2")
    a = d.cluster.seed({"node-1": ["bcm11/a:1"]})["node-1"][0]
    # tag drift: the same tag pushed twice with different content, each node pulled it in between
    drift = d.cluster.seed({"node-1": ["bcm11/drift:1"]})["node-1"][0]
    first = d.cluster.digests[drift]
    d.cluster.push("bcm11/drift", "1", variant="rebuilt")
    second = d.cluster.digests[drift]
    assert first != second
    two.pull(drift)
    # declared images, on no node yet: by tag, by digest, by tag and digest
    declared = d.cluster.push("bcm11/declared", "1")
    pinned_repo = d.cluster.push("nvidia/pinned", "1").rsplit(":", 1)[0]
    pinned = f"{pinned_repo}@{d.cluster.digests[pinned_repo + ':1']}"
    both_ref = d.cluster.push("nvidia/both", "2")
    both = f"{both_ref}@{d.cluster.digests[both_ref]}"
    # refresh off: drift is reported here, not fixed (with refresh, a moved tag is pulled again)
    d.configure(images=[declared, pinned, both], refresh=False)
    digests = {node.name: node.images() for node in (one, two)}
    assert digests["node-1"][drift] == first and digests["node-2"][drift] == second

    status = json.loads(d.cli("status", "--json").stdout)
    assert status["nodes"] == ["node-1", "node-2"] and status["skipped"] == {}
    assert status["holdings"]["node-1"] == {a: d.cluster.digests[a], drift: first}
    assert status["holdings"]["node-2"] == {drift: second}
    assert status["drift"] == [{"reference": drift, "digests": {"node-1": first, "node-2": second}}]

    shown = d.cli("status", env={"COLUMNS": "1000"})
    assert shown.returncode == 0, shown.stderr
    rows = table_rows(shown.stdout)
    short = {ref: digest.split(":")[1][:8] for ref, digest in d.cluster.digests.items()}
    assert rows[a] == [short[a], "missing"]
    assert rows[drift] == [first.split(":")[1][:8], second.split(":")[1][:8]]
    assert rows[declared] == rows[pinned] == rows[both] == ["missing", "missing"]
    assert f"tag drift: {drift}: node-1 {first[:19]}, node-2 {second[:19]}" in shown.stderr

    plan = d.cli("plan", "--json")
    plan = json.loads(plan.stdout)
    # in pull order: declared images first (imagesync.room), so compared as sets
    assert {node: sorted(images) for node, images in plan["missing"].items()} == {
        "node-1": sorted([declared, pinned, both]), "node-2": sorted([a, declared, pinned, both])}
    assert plan["drift"] == status["drift"]
    text = d.cli("plan", env={"COLUMNS": "1000"})
    assert f"tag drift: {drift}: node-1 {first[:19]}, node-2 {second[:19]}" in text.stderr
    assert "plan: 7 pulls" in text.stdout

    d.start()
    result = d.cli("sync", "--wait", env={"COLUMNS": "1000"})
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(started_run(result))
    assert run["status"] == "completed" and run["counts"] == {"pulled": 7}, run
    assert run["drift"] == status["drift"]
    drift_line = f"tag drift on {drift}: node-1={first[:19]}, node-2={second[:19]}"
    assert drift_line in result.stdout
    assert drift_line in d.cli("history", run["id"], env={"COLUMNS": "1000"}).stdout
    for node in (one, two):
        held = node.images()
        assert held[declared] == d.cluster.digests[declared], held
        assert pinned in held, held
        assert f"{both_ref.rsplit(':', 1)[0]}@{d.cluster.digests[both_ref]}" in held, held
    # drift is reported, not "fixed": each node keeps what its tag points at
    assert one.images()[drift] == first and two.images()[drift] == second

    # settled: nothing missing, and the next sync has nothing to do
    again = json.loads(d.cli("plan", "--json").stdout)
    assert again["missing"] == {}, again["missing"]
    second_sync = d.cli("sync", "--wait")
    assert second_sync.returncode == 0, second_sync.stdout + second_sync.stderr
    assert "every node already holds every image" in second_sync.stdout

    # ...and status agrees with plan: no node lacks any image
    rows = table_rows(d.cli("status", env={"COLUMNS": "1000"}).stdout)
    assert rows[pinned] == [short[pinned_repo + ":1"]] * 2
    # containerd keeps a pull of repo:tag@digest as repo@digest: status, like plan,
    # finds a pinned reference by (repository, digest)
    lacking = {image for image, cells in rows.items() if "missing" in cells}
    assert not lacking, rows


# == 6. triggers racing each other and the runs they start ======================================

_STORM = """
import json, os, sys, time
from imagesync.celery import app
stop = sys.argv[1]
while not os.path.exists(stop):
    sent = [app.send_task("imagesync.sync", kwargs={"trigger": "storm"}, queue="imagesync") for _ in range(4)]
    for result in sent:
        print(json.dumps(result.get(timeout=120)), flush=True)
    time.sleep(0.2)  # bursts of four, not a flood: the control worker has two processes
"""


def test_concurrent_triggers_never_make_two_runs_overlap(deploy, tmp_path):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": [f"bcm11/app{i}:1" for i in range(3)], "node-2": []})
    d.configure(max_parallel=1)
    d.start()
    node = d.cluster.node("node-2")
    d.cluster.proxy.delay(1.0)
    stop = tmp_path / "stop-storm"
    storm_out, storm_err = tmp_path / "storm.out", tmp_path / "storm.err"
    with storm_out.open("w") as out, storm_err.open("w") as err:
        storm = subprocess.Popen([sys.executable, "-c", _STORM, str(stop)], env=cli_env(d), stdout=out, stderr=err)
    clis = [start_cli(d, "sync") for _ in range(3)]
    try:
        first = wait_for(lambda: lock_holder(d), 60, "a run taking the lock")
        wait_for(lambda: run_status(d, first) == "running", 60, "the first run recorded")
        # a new image, after the first run's inventory: a later run must bring it
        late = d.cluster.seed({"node-1": ["bcm11/late:1"]})["node-1"][0]
        wait_for(lambda: any(p.end for p in node.pulls()), 30, "a pull of the first run done")
        clis += [start_cli(d, "sync") for _ in range(3)]  # more triggers, close to its end
        wait_for(lambda: late in d.held("node-2"), 90, "a later run pulling the new image")
    finally:
        stop.touch()
    assert storm.wait(150) == 0, storm_err.read_text()
    answers = [json.loads(line) for line in storm_out.read_text().splitlines()]
    results = [finish(process) for process in clis]
    wait_for(lambda: all(r["status"] != "running" for r in all_runs(d)), 60, "every run ended")

    runs = sorted(all_runs(d), key=lambda r: r["started"])
    pairs = list(zip(runs, runs[1:], strict=False))
    for earlier, later in pairs:
        assert later["started"] >= earlier["finished"], f"runs overlap:\n{earlier}\n{later}"
    measured("gaps between consecutive runs (s)",
             [round(later["started"] - earlier["finished"], 2) for earlier, later in pairs])
    assert lock_holder(d) is None
    # every trigger answered; each that did not find a run in progress made exactly one run
    for result in results:
        assert result.returncode in (0, 3), result.stdout + result.stderr
        if result.returncode == 3:
            assert "already running" in result.stderr
    made = [a["run"] for a in answers if a["status"] != "already-running"]
    made += [started_run(r) for r in results if r.returncode == 0]
    assert sorted(made) == sorted(r["id"] for r in runs)
    refused = sum(a["status"] == "already-running" for a in answers) + sum(r.returncode == 3 for r in results)
    with_pulls = [r for r in runs if r["expected"]]
    measured("triggers / runs / runs with pulls / refused as already running",
             f"{len(answers) + len(results)} / {len(runs)} / {len(with_pulls)} / {refused}")
    assert refused >= 1 and len(with_pulls) >= 2
    assert all(r["status"] == "completed" for r in runs)
    assert sum(r["expected"] for r in runs) == sum(sum(r["counts"].values()) for r in runs) == 4
    assert len(d.held("node-2")) == 4


# == 7. the log lines ==========================================================================

_PULL_LINE = re.compile(
    r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d run=\S+ node=\S+ image=\S+ status=\S+ duration=[\d.]+s attempts=\d+'
    r'( source=\S+)?( reason=".*")?$')


def test_pull_log_lines_have_the_documented_shape_and_the_run_one_summary(deploy):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/kept:1", "bcm11/gone:1"], "node-2": []})
    d.cluster.registry.delete_image("bcm11/gone", "1")
    kept, gone = d.cluster.ref("bcm11/kept:1"), d.cluster.ref("bcm11/gone:1")
    d.configure(transfer=False)  # a failed line: no copy of the lost image from node-1
    d.start()
    first_day = time.strftime("%Y-%m-%d")
    result = d.cli("sync", "--wait")
    last_day = time.strftime("%Y-%m-%d")  # the same day, unless the run went past midnight
    assert result.returncode == 1, result.stdout + result.stderr
    run_id = started_run(result)
    assert d.history(run_id)["counts"] == {"pulled": 1, "failed": 1}

    success, failed = log_lines(d, "success_images.log"), log_lines(d, "failed_images.log")
    assert len(success) == 1 and len(failed) == 1, (success, failed)
    for line in success + failed:
        assert _PULL_LINE.match(line), line
    # each line in the folder of the day it was written, a day of the run
    for path in [*d.cluster.log_dir.glob("*/success_images.log"), *d.cluster.log_dir.glob("*/failed_images.log")]:
        assert first_day <= path.parent.name <= last_day, path
        assert all(line.startswith(path.parent.name) for line in path.read_text().splitlines()), path
    assert f" run={run_id} node=node-2 image={kept} status=pulled " in success[0]
    assert " reason=" not in success[0]
    assert f" run={run_id} node=node-2 image={gone} status=failed " in failed[0]
    assert re.search(r' attempts=1 reason="[^"]*not found[^"]*"$', failed[0]), failed[0]

    main = log_lines(d, "image-sync.log")
    summaries = [line for line in main if f"run {run_id} completed in " in line]
    assert len(summaries) == 1, summaries
    assert "2 pulls planned; 1 pulled, 1 failed" in summaries[0], summaries[0]
