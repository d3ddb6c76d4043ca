"""The single-run lock and run records, on a real redis-server."""

import time
from multiprocessing import Pool

import redis as redis_py

from imagesync.lock import RunLock
from imagesync.runs import ABANDONED, COMPLETED, RUNNING, Outcome, RunStore, summary_lines


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
