"""The single-run lock and run records, on a real redis-server."""

import time
from multiprocessing import Pool

import pytest
import redis as redis_py

from imagesync.lock import RunLock
from imagesync.runs import ABANDONED, COMPLETED, RUNNING, Outcome, RunStore, summary_lines

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
    lock = RunLock(redis_client, ttl=1)
    lock.acquire("run-a")
    time.sleep(0.6)
    assert lock.renew("run-a")
    time.sleep(0.6)
    assert lock.holder() == "run-a"
    assert not lock.renew("run-b")
    time.sleep(1.2)
    assert lock.holder() is None
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


def test_stale_runs_are_abandoned_with_their_lock_released(redis_client):
    store = _store(redis_client, stale_after=1)
    lock = RunLock(redis_client, ttl=60)
    lock.acquire("r1")
    store.create("r1", trigger="test", pulls=[("w1", "a"), ("w2", "b")], skipped={}, drift=[], refused=[], wanted=1)
    store.record("r1", Outcome("w1", "a", "pulled"))
    assert store.stale() == []
    time.sleep(1.2)
    assert store.stale() == ["r1"]
    assert store.abandon("r1", "no progress")
    assert not store.abandon("r1", "again")
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
    store = _two_pull_run(redis_client, stale_after=1)
    # found stale, but a pull reports before the abandon: the run lives on
    time.sleep(1.1)
    assert store.stale() == ["r1"]
    store.record("r1", Outcome("w1", "a", "pulled"))
    assert not store.abandon("r1", "no progress")
    assert store.status("r1") == RUNNING
    # the same call re-run (same token) answers 1 again
    time.sleep(1.1)
    args = ["r1", "", "no progress", "token-1", ""]
    keys = ["imagesync:run:r1", "imagesync:active", "imagesync:lock"]
    assert store._abandon(keys=keys, args=args) == 1
    assert store._abandon(keys=keys, args=args) == 1
    assert store._abandon(keys=keys, args=["r1", "", "again", "token-2", ""]) == 0
    assert store.status("r1") == ABANDONED


def test_a_retry_counts_as_progress_and_keeps_the_lock(redis_client):
    store = _two_pull_run(redis_client, stale_after=2)
    lock = RunLock(redis_client, ttl=2)
    for _ in range(3):
        time.sleep(0.8)
        assert store.touch("r1")
    assert store.stale() == []
    assert lock.holder() == "r1" and redis_client.ttl(lock.key) > 1
    store.abandon("r1", "test", force=True)
    assert not store.touch("r1")


def test_staleness_runs_on_redis_clock_not_the_hosts(redis_client):
    store = _two_pull_run(redis_client, stale_after=60)
    seconds, _ = redis_client.time()
    score = redis_client.zscore("imagesync:active", "r1")
    assert abs(score - (seconds + 60)) < 2
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

    monkeypatch.setattr(sync, "plan_now", inventory_fails)
    monkeypatch.setattr(RunStore, "abandon", abandon_fails)
    with pytest.raises(redis_py.exceptions.ConnectionError):
        sync.start_run(settings, redis_client, lambda *args: None)
    assert RunLock(redis_client, ttl=60).holder() is None
