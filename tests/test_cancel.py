"""Cancelling a run: the record and its Lua script, the run lifecycle, the CLI, and the real cluster.

All of it needs a real redis-server (the Lua scripts run there), so all of it
is ``cluster``; the last two tests deploy the whole test cluster.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from helpers import finish, start_cli, wait_for
from rich.console import Console

from imagesync import keys
from imagesync.celeryconfig import NODE_QUEUE_PREFIX
from imagesync.cli import main
from imagesync.cli.runs import operator
from imagesync.config import Settings
from imagesync.lock import RunLock
from imagesync.outcomes import Outcome
from imagesync.planning.planner import make_plan
from imagesync.runs import CANCELLED, RUNNING, RunCancelled, RunStore, summary_lines
from imagesync.sync import cancel_run, start_run
from testcluster.cluster import toml_dumps

pytestmark = pytest.mark.cluster


def _store(redis_client):
    return RunStore(redis_client, stale_after=60, lock_ttl=60, history=50)


def _running(redis_client, run_id="r1", pulls=(("w1", "a"), ("w1", "b"), ("w2", "c"), ("w2", "d"))):
    store = _store(redis_client)
    assert RunLock(redis_client, ttl=60).acquire(run_id)
    store.create(run_id, trigger="test", pulls=list(pulls), skipped={}, drift=[], refused=[], wanted=2)
    return store


# -- the record -------------------------------------------------------------------------------


def test_cancel_marks_the_run_releases_its_lock_and_leaves_the_stale_check(redis_client):
    store = _running(redis_client)
    store.record("r1", Outcome("w1", "a", "pulled"))
    assert store.cancel("r1", "ops@head", "wrong images") == 1
    run = store.get("r1")
    assert run.status == CANCELLED
    assert (run.cancelled_by, run.reason) == ("ops@head", "wrong images")
    assert run.finished is not None
    assert RunLock(redis_client, ttl=60).holder() is None
    # never abandoned later: it is no longer watched for progress
    assert store.stale(now=time.time() + 10_000) == []
    assert not store.abandon("r1", "stale", force=True)
    assert store.status("r1") == CANCELLED


def test_a_rerun_of_the_same_cancel_answers_the_same_and_a_second_cancel_does_nothing(redis_client):
    store = _running(redis_client)
    args = ["r1", "", "ops@head", "first", "token-1"]
    run_keys = [keys.run("r1"), keys.ACTIVE, keys.LOCK, keys.HISTORY]
    assert store._cancel(keys=run_keys, args=args) == 1
    finished = store.get("r1").finished
    # redis-py re-runs a script whose reply was lost with the same arguments
    assert store._cancel(keys=run_keys, args=args) == 1
    assert store.get("r1").finished == finished
    assert store.cancel("r1", "someone@else", "second") == 0
    run = store.get("r1")
    assert (run.cancelled_by, run.reason, run.finished) == ("ops@head", "first", finished)


def test_late_reports_are_counted_and_the_run_stays_cancelled(redis_client):
    store = _running(redis_client)
    store.record("r1", Outcome("w1", "a", "pulled"))
    store.cancel("r1", "ops@head")
    # a pull that was running finishes; the queued ones find the run cancelled
    assert store.record("r1", Outcome("w1", "b", "pulled")) == 3
    assert store.record("r1", Outcome("w2", "c", "skipped", reason="run was already cancelled")) == 3
    assert store.record("r1", Outcome("w2", "c", "skipped", reason="run was already cancelled")) == 0
    assert store.record("r1", Outcome("w2", "d", "skipped", reason="run was already cancelled")) == 3
    run = store.get("r1")
    assert run.status == CANCELLED
    assert run.counts == {"pulled": 2, "skipped": 2}
    assert run.unreported() == {}
    # a run whose every pull has reported is still not "completed"
    assert RunLock(redis_client, ttl=60).acquire("r2")
    assert store.record("r1", Outcome("w1", "a", "pulled")) == 0
    assert RunLock(redis_client, ttl=60).holder() == "r2"


def test_only_a_running_run_is_cancelled_and_another_runs_lock_is_kept(redis_client):
    store = _store(redis_client)
    store.create("done", trigger="test", pulls=[], skipped={}, drift=[], refused=[], wanted=0)
    assert store.cancel("done", "ops@head") == 0
    assert store.status("done") == "completed"
    assert store.cancel("nope", "ops@head") == -1
    assert not redis_client.exists(keys.run("nope"))
    # a running run whose lock someone else holds now (it had expired)
    store.create("old", trigger="test", pulls=[("w1", "a")], skipped={}, drift=[], refused=[], wanted=1)
    RunLock(redis_client, ttl=60).acquire("new")
    assert store.cancel("old", "ops@head") == 1
    assert RunLock(redis_client, ttl=60).holder() == "new"


def test_a_run_still_listing_images_is_cancelled_before_it_has_a_record(redis_client):
    store = _store(redis_client)
    RunLock(redis_client, ttl=60).acquire("r1")
    assert store.cancel("r1", "ops@head", "not now") == 1
    assert RunLock(redis_client, ttl=60).holder() is None
    assert [run.id for run in store.recent()] == ["r1"]
    # the run, done listing, must not turn it back into a running one
    with pytest.raises(RunCancelled):
        store.create("r1", trigger="beat", pulls=[("w1", "a")], skipped={}, drift=[], refused=[], wanted=1)
    run = store.get("r1")
    assert (run.status, run.trigger, run.expected, run.cancelled_by) == (CANCELLED, "beat", 0, "ops@head")
    assert not redis_client.exists(keys.run_done("r1"))
    assert redis_client.zscore(keys.ACTIVE, "r1") is None
    assert "r1 cancelled" in summary_lines(run)[0]


def test_the_summary_says_cancelled_by_whom_and_why_and_what_never_ran(redis_client):
    store = _running(redis_client)
    store.record("r1", Outcome("w1", "a", "pulled"))
    store.cancel("r1", "ops@head", "maintenance")
    lines = summary_lines(store.get("r1"))
    assert re.fullmatch(r"run r1 cancelled in [0-9.]+ s: 4 pulls planned; 1 pulled \(cancelled by ops@head: "
                        r"maintenance\)", lines[0])
    assert "run r1: node w2: 2 pulls not reported yet (the run was cancelled: queued pulls are skipped, " \
           "running ones finish)" in lines
    for image in "bcd":
        store.record("r1", Outcome("w1" if image == "b" else "w2", image, "skipped", reason="run was cancelled"))
    lines = summary_lines(store.get("r1"))
    assert "run r1: node w1: 1 pulls skipped: the run was cancelled before they started" in lines
    assert "run r1: node w2: 2 pulls skipped: the run was cancelled before they started" in lines
    assert not any("never reported" in line or "not reported" in line for line in lines)
    assert not any(": c skipped" in line for line in lines)  # no line per skipped image


# -- the run lifecycle ------------------------------------------------------------------------


def _settings(redis_url, tmp_path, nodes=("w1", "w2")):
    return Settings(nodes=[{"name": n, "transport": "local"} for n in nodes], images=[], prefixes=["registry.test"],
                    redis_url=redis_url, log_dir=tmp_path / "logs")


def _plan(count):
    images = [f"registry.test/app{i}:1" for i in range(count)]
    return make_plan({"w1": [], "w2": []}, [], declared=images)


def test_a_run_cancelled_during_its_fan_out_stops_sending(redis_server, redis_client, tmp_path):
    settings = _settings(redis_server.url, tmp_path)
    sent = []

    def send(node, image, run_id, expires, route):
        sent.append(image)
        if len(sent) == 3:
            cancel_run(settings, redis_client, run_id, "ops@head")

    with mock.patch("imagesync.sync.survey", lambda *_: None), \
            mock.patch("imagesync.sync.plan_from", lambda *_, **__: _plan(10)), \
            mock.patch("imagesync.sending.RENEW_EVERY", 2):
        started = start_run(settings, redis_client, send, trigger="cli")
    assert started.status == "cancelled"
    assert "sends no more pulls" in started.message
    assert len(sent) == 4  # the lock is renewed every 2 pulls: the cancel is seen at the next renewal
    assert _store(redis_client).status(started.run_id) == CANCELLED
    # a new run starts at once
    with mock.patch("imagesync.sync.survey", lambda *_: None), \
            mock.patch("imagesync.sync.plan_from", lambda *_, **__: _plan(1)):
        again = start_run(settings, redis_client, lambda *pull: None, trigger="cli")
    assert again.status == "started"
    assert _store(redis_client).status(again.run_id) == RUNNING


# -- the command ------------------------------------------------------------------------------


def _cli(config, *argv):
    """``imagesync ARGV`` in this process: exit code, stdout, stderr (tables 200 columns wide)."""
    out, err = io.StringIO(), io.StringIO()
    wide = Console(file=out, width=200, highlight=False)
    root = logging.getLogger()  # the command sets up logging as a process of its own would
    with mock.patch.dict(os.environ, {"IMAGESYNC_CONFIG": str(config)}), mock.patch("imagesync.cli.common.out", wide), \
            mock.patch.object(root, "handlers", list(root.handlers)), mock.patch.object(root, "level", root.level), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def config(redis_server, redis_client, tmp_path):
    path = tmp_path / "imagesync.toml"
    path.write_text(toml_dumps({"prefixes": ["registry.test"], "redis_url": redis_server.url,
                                "log_dir": str(tmp_path / "logs"),
                                "nodes": [{"name": "w1", "transport": "local"}, {"name": "w2", "transport": "local"}]}))
    return path


def test_cancel_without_a_run_in_progress_says_so_in_one_line(config):
    code, out, err = _cli(config, "cancel")
    assert code == 1
    assert err == "imagesync: nothing to cancel: no run is in progress (see 'imagesync history')\n"
    assert out == ""
    code, _, err = _cli(config, "cancel", "20990101-000000-abcdef")
    assert code == 1
    assert err.splitlines() == ["imagesync: nothing to cancel: no run 20990101-000000-abcdef in the history "
                                "(see 'imagesync history')"]


def test_cancel_stops_the_run_in_progress_and_says_who_and_why(config, redis_client, tmp_path):
    store = _running(redis_client, "20261122-024001-7227f5")
    store.record("20261122-024001-7227f5", Outcome("w1", "a", "pulled"))
    code, out, err = _cli(config, "cancel", "--reason", "  registry  maintenance ")
    assert code == 0, err
    assert err == ""
    who = operator()
    assert re.match(r"run 20261122-024001-7227f5 cancelled in [0-9.]+ s: 4 pulls planned; 1 pulled "
                    rf"\(cancelled by {re.escape(who)}: registry maintenance\)", out)
    assert "the lock is released" in out
    assert RunLock(redis_client, ttl=60).holder() is None
    # the summary is in the day's log, as a worker writes it
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*/image-sync.log"))
    assert "run 20261122-024001-7227f5 cancelled in" in log and who in log
    # a second time: nothing running, and the run named: not running
    assert _cli(config, "cancel")[0] == 1
    code, _, err = _cli(config, "cancel", "20261122-024001-7227f5")
    assert code == 1
    assert err == "imagesync: nothing to cancel: run 20261122-024001-7227f5 is not running (it is cancelled)\n"
    # history shows it, with its counts
    code, out, _ = _cli(config, "history")
    assert code == 0
    row = next(line for line in out.splitlines() if "20261122-024001-7227f5" in line)
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells[2:7] == ["cancelled", "4", "1", "0", "0"]
    code, out, _ = _cli(config, "history", "--json", "20261122-024001-7227f5")
    assert '"status": "cancelled"' in out and f'"cancelled_by": "{who}"' in out


def test_version_names_imagesync_and_the_libraries_a_bug_report_needs(config, capsys):
    import celery
    import kombu
    import paramiko
    import redis

    from imagesync import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    line = capsys.readouterr().out
    assert line == (f"imagesync {__version__} (celery {celery.__version__}, kombu {kombu.__version__}, "
                    f"redis-py {redis.__version__}, paramiko {paramiko.__version__}; "
                    f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))})\n")
    # check prints the same line first, even before it reads the configuration
    config.write_text(config.read_text().replace('prefixes = ["registry.test"]', 'prefixes = "x y"'))
    code, out, err = _cli(config, "check")
    assert code == 2
    assert out.splitlines()[0] == line.strip()
    assert err.startswith("imagesync: prefixes")


# -- on the real cluster ----------------------------------------------------------------------


def _started(result):
    for line in result.stdout.splitlines():
        if line.startswith("run ") and " started" in line:
            return line.split()[1]
    raise AssertionError(f"no run started:\n{result.stdout}\n{result.stderr}")


def test_a_cancelled_run_starts_no_more_pulls_and_frees_the_lock_at_once(deploy):
    d = deploy(nodes=2)
    per_node = 6  # each node pulls the other's images: per node, max_parallel running at the cancel, 4 queued
    d.cluster.seed({"node-1": [f"bcm11/one{i}:1" for i in range(per_node)],
                    "node-2": [f"nvidia/two{i}:1" for i in range(per_node)]})
    d.configure(max_parallel=2)
    d.start()
    d.cluster.proxy.hold()  # every pull stays under way until released
    waiting = start_cli(d, "sync", "--wait")
    with d.cluster.redis.client() as client:
        store = RunStore(client, stale_after=600, lock_ttl=600)
        run_id = wait_for(lambda: client.get(keys.LOCK), 60, "the run's lock").decode()
        # cancelled with every node's slots running a pull, and the other pulls queued
        wait_for(lambda: all(sum(p.end is None for p in d.cluster.node(n).pulls()) == 2 for n in ("node-1", "node-2")),
                 60, "two pulls running on each node")
        before = time.time()
        cancel = d.cli("cancel", "--reason", "test")
        cancelled_at = time.time()
        assert cancel.returncode == 0, cancel.stderr + cancel.stdout
        assert cancel.stdout.startswith(f"run {run_id} cancelled in ")
        assert client.get(keys.LOCK) is None
        at_cancel = store.get(run_id, with_results=False)
        # what the nodes themselves had run, read after the cancel returned
        seen = {n: d.cluster.node(n).pulls() for n in ("node-1", "node-2")}
        running = [p for pulls in seen.values() for p in pulls if p.end is None]
        print(f"measured: cancel took {cancelled_at - before:.2f} s; at the cancel: {at_cancel.counts}, "
              f"{len(running)} pulls running on the nodes")
        assert at_cancel.status == CANCELLED and at_cancel.cancelled_by.endswith("@" + os.uname().nodename)
        # the CLI that followed the run sees it end cancelled, and says so with exit 1
        followed = finish(waiting)
        assert followed.returncode == 1, followed.stdout + followed.stderr
        assert f"run {run_id} started: {2 * per_node} pulls" in followed.stdout
        assert f"run {run_id} cancelled in " in followed.stdout

        # a new run starts at once, on node-1 only: node-2 stays a clean witness
        d.cluster.proxy.release()
        again = d.cli("sync", "--node", "node-1")
        assert again.returncode == 0, again.stderr + again.stdout
        second = _started(again)

        # every pull of the cancelled run reports: the running ones late, the queued ones skipped
        wait_for(lambda: store.get(run_id, with_results=False).done == 2 * per_node, 60,
                 "every pull of the cancelled run")
        wait_for(lambda: store.status(second) != RUNNING, 120, "the end of the second run")
        run = d.history(run_id)
        assert run["status"] == "cancelled" and run["reason"] == "test"
        assert set(run["counts"]) <= {"pulled", "skipped"}
        assert run["counts"]["skipped"] >= 1
        assert sum(run["counts"].values()) == 2 * per_node
        # the pulls running at the cancel finished and were counted into the cancelled run
        assert run["counts"]["pulled"] >= at_cancel.counts.get("pulled", 0) + len(running) > 0
        for outcome in run["results"]:
            if outcome["status"] == "skipped":
                assert outcome["reason"] == "run was already cancelled when this pull started"

        # the nodes' own record: a pull ran on a node only for a pull that was not skipped...
        pulled = {node: sum(1 for r in run["results"] if r["node"] == node and r["status"] == "pulled")
                  for node in ("node-1", "node-2")}
        node2 = d.cluster.node("node-2").pulls()
        print(f"measured: cancelled run: {run['counts']}; node-2's pulls started at "
              f"{', '.join(f'{p.start - cancelled_at:+.1f}' for p in node2)} s from the cancel's return")
        assert len(node2) == pulled["node-2"]
        # ... and no further pull started after the cancel. A pull task that found
        # the run running just before the cancel may still be on its way to the
        # node (SSH); it holds one of the node's max_parallel slots, so at most the
        # slots not running a pull at the cancel can start one afterwards.
        late_starts = len(node2) - len(seen["node-2"])
        print(f"measured: node-2 at the cancel: {len(seen['node-2'])} pulls started, "
              f"{sum(p.end is None for p in seen['node-2'])} running; {late_starts} started afterwards")
        assert late_starts <= 2 - sum(p.end is None for p in seen["node-2"])
        assert all(p.end is not None and p.outcome == "ok" for p in node2)
        second_run = d.history(second)
        node1 = d.cluster.node("node-1").pulls()
        assert len(node1) == pulled["node-1"] + second_run["counts"].get("pulled", 0)
        assert second_run["status"] == "completed" and set(second_run["counts"]) <= {"pulled", "present"}

    # history lists both: the cancelled one with its counts
    listing = d.cli("history", env={"COLUMNS": "200"})
    row = next(line for line in listing.stdout.splitlines() if run_id in line)
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells[2:7] == ["cancelled", str(2 * per_node), str(run["counts"]["pulled"]), "0",
                          str(run["counts"]["skipped"])]
    shown = d.cli("history", run_id, env={"COLUMNS": "200"}).stdout
    assert f"run {run_id} cancelled in" in shown and "(cancelled by " in shown and ": test)" in shown
    assert "pulls skipped: the run was cancelled before they started" in shown


def hang_listing(node, flag):
    """Put a wrapper in front of ``node``'s crictl: ``crictl images`` touches ``flag``.listing,
    then waits while ``flag`` exists. Everything else goes to the real crictl."""
    real = node.bin_dir / "crictl.real"
    if not real.exists():
        (node.bin_dir / "crictl").rename(real)
    wrapper = node.bin_dir / "crictl"
    wrapper.write_text(f"""#!{sys.executable}
import os, sys, time
args, real, flag = sys.argv[1:], {str(real)!r}, {str(flag)!r}
if "images" in args:
    open(flag + ".listing", "w").close()
    while os.path.exists(flag):
        time.sleep(0.1)
os.execv(real, [real, *args])
""")
    wrapper.chmod(0o755)


def queued(client) -> dict[str, int]:
    """Messages waiting in each node's queue (a Redis list per queue and priority)."""
    names = [name.decode() for name in client.scan_iter(match=f"{NODE_QUEUE_PREFIX}*")]
    return {name: client.llen(name) for name in names if client.type(name) == b"list"}


def test_a_run_cancelled_while_it_lists_images_sends_nothing_and_sync_wait_exits_1(deploy, tmp_path):
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/listed:1", "nvidia/listed:1"]})
    d.configure()
    # no node worker: a pull the run sent would wait in its node's queue, for all to see
    d.start(nodes=[])
    flag = tmp_path / "hang"
    flag.touch()
    hang_listing(d.cluster.node("node-1"), flag)
    held_before = {n: d.cluster.node(n).images() for n in ("node-1", "node-2")}
    d.cluster.proxy.clear()

    sync = start_cli(d, "sync", "--wait")
    try:
        wait_for(lambda: Path(f"{flag}.listing").exists(), 60, "the run listing node-1's images")
        with d.cluster.redis.client() as client:
            run_id = client.get(keys.LOCK).decode()
            assert not client.exists(keys.run(run_id))  # still listing: no record yet
        cancel = d.cli("cancel", "--reason", "not now")
        assert cancel.returncode == 0, cancel.stderr + cancel.stdout
        assert cancel.stdout.startswith(f"run {run_id} cancelled in ")
    finally:
        flag.unlink()
    result = finish(sync)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"run {run_id} was cancelled while it listed images; no pull was sent" in result.stderr
    run = d.history(run_id)
    assert (run["status"], run["trigger"], run["reason"], run["expected"]) == ("cancelled", "cli", "not now", 0)
    assert run["results"] == []
    with d.cluster.redis.client() as client:
        assert client.get(keys.LOCK) is None
        assert sum(queued(client).values()) == 0, queued(client)
    # the planned pulls were onto node-2; neither node pulled anything, and no layer left the registry
    assert {n: d.cluster.node(n).images() for n in ("node-1", "node-2")} == held_before
    assert d.cluster.node("node-2").pulls() == []
    assert [r.path for r in d.cluster.proxy.requests if r.is_layer_get] == []
