"""The single-run lock and run records, on a real redis-server."""

from multiprocessing import Pool

import pytest
import redis as redis_py
from helpers import wait_for

from imagesync.lock import RunLock
from imagesync.outcomes import Outcome
from imagesync.runs import ABANDONED, COMPLETED, RUNNING, RunStore, summary_lines

# a real redis-server: not for `make unit`
pytestmark = pytest.mark.cluster


def test_only_one_run_takes_the_lock(redis_client):
    lock = RunLock(redis_client, ttl=30)
    assert lock.acquire("run-a")
    assert not lock.acquire("run-b")
    assert lock.holder() == "run-a"


def _try_lock(args):
    url, run_id = args
    return RunLock(redis_py.Redis.from_url(url), ttl=30).acquire(run_id)


def test_ten_processes_race_for_the_lock_and_one_wins(redis_server, redis_client):
    with Pool(10) as pool:
        won = pool.map(_try_lock, [(redis_server.url, f"run-{i}") for i in range(10)])
    assert won.count(True) == 1


def test_release_is_compare_and_delete(redis_client):
    lock = RunLock(redis_client, ttl=30)
    lock.acquire("run-a")
    assert not lock.release("run-b")
    assert lock.holder() == "run-a"
    assert lock.release("run-a")
    assert lock.holder() is None


def test_lock_expires_on_its_own_and_renewal_extends_it(redis_client):
    lock = RunLock(redis_client, ttl=60)
    assert lock.acquire("run-a")
    assert 0 < redis_client.pttl(lock.key) <= 60_000
    redis_client.expire(lock.key, 5)  # as if 55 s had passed since
    assert lock.renew("run-a")
    assert redis_client.pttl(lock.key) > 5_000  # its whole TTL again, from now
    assert not lock.renew("run-b")
    assert lock.holder() == "run-a"
    # nobody releases it: it expires on its own
    short = RunLock(redis_client, ttl=1)
    assert short.renew("run-a")
    assert redis_client.pttl(lock.key) <= 1_000
    wait_for(lambda: lock.holder() is None, 10, "the lock to expire")
    assert RunLock(redis_client, ttl=1).acquire("run-c")


def _store(redis_client, stale_after=60):
    return RunStore(redis_client, stale_after=stale_after, lock_ttl=60, history=3)


def test_the_last_pull_completes_the_run_and_releases_its_lock(redis_client):
    store = _store(redis_client)
    lock = RunLock(redis_client, ttl=60)
    lock.acquire("r1")
    pulls = [("w1", "nvcr.io/nvidia/a:1"), ("w2", "nvcr.io/nvidia/b:1")]
    store.create("r1", trigger="test", pulls=pulls, skipped={"w3": "down"}, drift=[], refused=[], wanted=2)
    assert store.record("r1", Outcome("w1", "nvcr.io/nvidia/a:1", "pulled", 1.0)) == 1
    # a redelivered pull reports again: counted once
    assert store.record("r1", Outcome("w1", "nvcr.io/nvidia/a:1", "present", 0.1)) == 0
    assert store.status("r1") == RUNNING
    assert lock.holder() == "r1"
    assert store.record("r1", Outcome("w2", "nvcr.io/nvidia/b:1", "failed", 0.2, "not found")) == 2
    run = store.get("r1")
    assert run.status == COMPLETED
    assert run.counts == {"pulled": 1, "failed": 1}
    assert run.done == 2 and run.failures == 1
    assert lock.holder() is None
    lines = summary_lines(run)
    assert "completed" in lines[0]
    assert any("w3 skipped: down" in line for line in lines)
    assert any("not found" in line for line in lines)


def test_an_open_run_waits_for_the_pulls_added_to_it_before_it_completes(redis_client):
    """A run whose moved tags are asked about after its first pulls is recorded open: every
    pull it expects so far reporting does not complete it; the pulls added later do."""
    store = _store(redis_client)
    lock = RunLock(redis_client, ttl=60)
    lock.acquire("r1")
    store.create("r1", trigger="test", pulls=[("w1", "nvcr.io/nvidia/a:1")], skipped={}, drift=[], refused=[],
                 wanted=2, more=True)
    assert store.record("r1", Outcome("w1", "nvcr.io/nvidia/a:1", "pulled", 1.0)) == 1
    assert store.status("r1") == RUNNING and lock.holder() == "r1"
    # the answers: one moved tag on two nodes
    moved = [("w1", "nvcr.io/nvidia/b:1"), ("w2", "nvcr.io/nvidia/b:1")]
    assert store.add("r1", moved, nodes={"w1": {"held": 2, "missing": 1}}) == 1
    # a re-run of the same call (a lost reply) adds nothing
    assert store.add("r1", moved) == 1
    run = store.get("r1")
    assert run.expected == 3 and run.expected_per_node == {"w1": 2, "w2": 1}
    assert store.record("r1", Outcome("w1", "nvcr.io/nvidia/b:1", "updated", 1.0)) == 1
    assert store.record("r1", Outcome("w2", "nvcr.io/nvidia/b:1", "updated", 1.0)) == 2
    assert store.status("r1") == COMPLETED and lock.holder() is None


def test_an_open_run_whose_pulls_all_reported_completes_when_nothing_is_added(redis_client):
    store = _store(redis_client)
    lock = RunLock(redis_client, ttl=60)
    lock.acquire("r2")
    store.create("r2", trigger="test", pulls=[("w1", "nvcr.io/nvidia/a:1")], skipped={}, drift=[], refused=[],
                 wanted=1, more=True)
    assert store.record("r2", Outcome("w1", "nvcr.io/nvidia/a:1", "pulled", 1.0)) == 1
    assert store.exclude("r2", {}) == 1  # a platform verdict meanwhile: still open
    assert store.status("r2") == RUNNING
    assert store.add("r2", []) == 2
    assert store.status("r2") == COMPLETED and lock.holder() is None
    # a run that ended takes no pulls
    assert store.add("r2", [("w1", "nvcr.io/nvidia/c:1")]) == 0


def test_stale_runs_are_abandoned_with_their_lock_released(redis_client):
    store = _store(redis_client, stale_after=60)
    lock = RunLock(redis_client, ttl=60)
    lock.acquire("r1")
    store.create("r1", trigger="test", pulls=[("w1", "a"), ("w2", "b")], skipped={}, drift=[], refused=[], wanted=1)
    store.record("r1", Outcome("w1", "a", "pulled"))
    reported = store.now()  # the last progress was before this instant
    assert store.stale() == []
    assert store.stale(now=reported + 59) == []
    # the clock moved on past stale_after without progress (no waiting)
    later = reported + 61
    assert store.stale(now=later) == ["r1"]
    assert store.abandon("r1", "no progress", now=later)
    assert not store.abandon("r1", "again", now=later)
    run = store.get("r1")
    assert run.status == ABANDONED
    assert run.unreported() == {"w2": 1}
    assert lock.holder() is None
    # a late report is kept but does not reopen the run
    assert store.record("r1", Outcome("w2", "b", "pulled")) == 3
    assert store.get("r1").status == ABANDONED


def test_history_is_bounded(redis_client):
    store = _store(redis_client)
    for i in range(5):
        store.create(f"r{i}", trigger="test", pulls=[], skipped={}, drift=[], refused=[], wanted=0)
    assert [run.id for run in store.recent(10)] == ["r4", "r3", "r2"]
    assert not redis_client.exists("imagesync:run:r0")


def test_unknown_run_is_reported_not_created(redis_client):
    assert _store(redis_client).record("nope", Outcome("w1", "a", "pulled")) == -1
    assert not redis_client.exists("imagesync:run:nope")


def _two_pull_run(redis_client, stale_after=60):
    store = _store(redis_client, stale_after=stale_after)
    RunLock(redis_client, ttl=60).acquire("r1")
    store.create("r1", trigger="test", pulls=[("w1", "a"), ("w2", "b")], skipped={}, drift=[], refused=[], wanted=2)
    return store


def test_a_record_run_twice_with_the_same_report_answers_the_same(redis_client):
    # redis-py runs a script again when its reply was lost: the re-run must not
    # turn "you completed the run" into "duplicate", or no one writes the summary
    store = _two_pull_run(redis_client)
    first, last = Outcome("w1", "a", "pulled"), Outcome("w2", "b", "pulled")
    assert store.record("r1", first) == 1
    assert store.record("r1", first) == 1
    assert store.record("r1", last) == 2
    assert store.record("r1", last) == 2
    # a second delivery of a pull is a different report: a duplicate
    assert store.record("r1", Outcome("w2", "b", "present")) == 0
    assert store.get("r1").counts == {"pulled": 2}


def test_an_abandon_run_twice_answers_the_same_and_a_run_that_reported_is_not_abandoned(redis_client):
    store = _two_pull_run(redis_client, stale_after=60)
    # found stale (at an instant stale_after past the run's start), but a pull
    # reports after that instant and before the abandon: the run lives on
    found = store.now() + 60
    assert store.stale(now=found) == ["r1"]
    store.record("r1", Outcome("w1", "a", "pulled"))
    assert not store.abandon("r1", "no progress", now=found)
    assert store.status("r1") == RUNNING
    # the same call re-run (same token) answers 1 again
    args = ["r1", repr(store.now() + 120), "no progress", "token-1", ""]
    keys = ["imagesync:run:r1", "imagesync:active", "imagesync:lock"]
    assert store._abandon(keys=keys, args=args) == 1
    assert store._abandon(keys=keys, args=args) == 1
    assert store._abandon(keys=keys, args=["r1", args[1], "again", "token-2", ""]) == 0
    assert store.status("r1") == ABANDONED


def test_a_retry_counts_as_progress_and_keeps_the_lock(redis_client):
    store = _two_pull_run(redis_client, stale_after=60)
    lock = RunLock(redis_client, ttl=60)
    start = store.now()
    redis_client.expire(lock.key, 5)  # the lock's TTL ran down since the run's last progress
    # retries 50 s and 100 s into a run that has been silent otherwise
    assert store.touch("r1", now=start + 50)
    assert store.stale(now=start + 61) == []  # stale from its start, not since the retry
    assert store.touch("r1", now=start + 100)
    assert store.stale(now=start + 159) == []
    assert store.stale(now=start + 161) == ["r1"]
    assert lock.holder() == "r1" and redis_client.ttl(lock.key) > 5  # renewed to lock_ttl
    store.abandon("r1", "test", force=True)
    assert not store.touch("r1")


def test_staleness_runs_on_redis_clock_not_the_hosts(redis_client):
    before = _store(redis_client).now()
    store = _two_pull_run(redis_client, stale_after=60)
    after = store.now()
    score = redis_client.zscore("imagesync:active", "r1")
    assert before + 60 <= score <= after + 60
    # a host clock an hour ahead changes nothing when no time is passed in
    assert store.stale() == []
    assert not store.abandon("r1", "host clock ahead")


def test_an_outcome_is_recorded_even_when_the_log_files_cannot_be_written(redis_client, redis_server, tmp_path, caplog):
    from imagesync.config import load_settings
    from imagesync.sync import finish_pull

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    config = tmp_path / "imagesync.toml"
    config.write_text(f'redis_url = "{redis_server.url}"\nlog_dir = "{blocked}"\n'
                      'prefixes = ["bcm11"]\n[[nodes]]\nname = "w1"\n[[nodes]]\nname = "w2"\n')
    settings = load_settings(config)
    store = _two_pull_run(redis_client)
    assert finish_pull(settings, redis_client, "r1", Outcome("w1", "a", "pulled")) == 1
    assert finish_pull(settings, redis_client, "r1", Outcome("w2", "b", "failed", reason="x")) == 2
    assert store.get("r1").status == COMPLETED
    errors = [r for r in caplog.records if r.getMessage().startswith("log_dir: cannot write")]
    assert len(errors) == 1  # said once, loudly


def test_a_start_that_fails_releases_the_lock_even_when_recording_the_failure_fails(
        redis_client, redis_server, tmp_path, monkeypatch):
    from imagesync import sync
    from imagesync.config import load_settings

    config = tmp_path / "imagesync.toml"
    config.write_text(f'redis_url = "{redis_server.url}"\nlog_dir = "{tmp_path}"\n'
                      'prefixes = ["bcm11"]\n[[nodes]]\nname = "w1"\n')
    settings = load_settings(config)

    def inventory_fails(*_args, **_kwargs):
        raise RuntimeError("inventory blew up")

    def abandon_fails(*_args, **_kwargs):
        raise redis_py.exceptions.ConnectionError("Redis went away")

    monkeypatch.setattr(sync, "survey", inventory_fails)
    monkeypatch.setattr(RunStore, "abandon", abandon_fails)
    with pytest.raises(redis_py.exceptions.ConnectionError):
        sync.start_run(settings, redis_client, lambda *args: None)
    assert RunLock(redis_client, ttl=60).holder() is None


def test_a_new_trigger_ends_a_stale_run_and_starts_its_own(redis_client, redis_server, tmp_path, monkeypatch, caplog):
    # README: a stuck run is marked abandoned by the stale-run check, "also every
    # new trigger": the trigger does not wait for the next beat to find the lock free
    from imagesync import sync
    from imagesync.config import load_settings
    from imagesync.planning.planner import make_plan

    config = tmp_path / "imagesync.toml"
    config.write_text(f'redis_url = "{redis_server.url}"\nlog_dir = "{tmp_path}"\n'
                      'prefixes = ["bcm11"]\n[[nodes]]\nname = "w1"\n')
    settings = load_settings(config)
    store = sync.run_store(settings, redis_client)
    assert sync.run_lock(settings, redis_client).acquire("stuck")
    # its last progress lies stale_after (and a second) in the past, on the Redis clock
    store.create("stuck", trigger="schedule", pulls=[("w1", "bcm11/a:1")], skipped={}, drift=[], refused=[],
                 wanted=1, now=store.now() - store.stale_after - 1)
    assert store.stale() == ["stuck"]
    monkeypatch.setattr(sync, "survey", lambda *_args, **_kwargs: None)
    monkeypatch.setattr(sync, "plan_from", lambda *_args, **_kwargs: make_plan({"w1": []}, settings.prefixes))

    caplog.set_level("INFO", logger="imagesync")
    started = sync.start_run(settings, redis_client, lambda *args: None, trigger="manual")
    assert started.run_id not in (None, "stuck")
    stuck = store.get("stuck")
    assert stuck.status == ABANDONED and stuck.reason == f"no pull reported for {store.stale_after} s"
    assert stuck.unreported() == {"w1": 1}
    assert store.get(started.run_id).trigger == "manual"
    assert store.get(started.run_id).status == COMPLETED  # every node already held every image
    assert RunLock(redis_client, ttl=60).holder() is None
    # the stuck run's summary was written
    assert any(r.getMessage().startswith("run stuck abandoned") for r in caplog.records), caplog.text
