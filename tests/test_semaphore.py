"""imagesync.semaphore against a real redis-server: slots, leases, and a race of processes."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import redis

from imagesync.semaphore import Semaphore


def test_takes_up_to_the_limit_then_refuses(redis_client):
    sem = Semaphore(redis_client, "sem", limit=2, ttl=30)
    assert sem.acquire("a")
    assert sem.acquire("b")
    assert not sem.acquire("c")
    assert sorted(sem.holders()) == ["a", "b"]
    sem.release("a")
    assert sem.acquire("c")
    assert sorted(sem.holders()) == ["b", "c"]


def test_a_holder_that_holds_a_slot_takes_no_second_one(redis_client):
    sem = Semaphore(redis_client, "sem", limit=2, ttl=30)
    assert sem.acquire("a")
    assert sem.acquire("a")
    assert sem.holders() == ["a"]
    assert sem.acquire("b")
    assert not sem.acquire("c")


def test_release_of_a_holder_without_a_slot_changes_nothing(redis_client):
    sem = Semaphore(redis_client, "sem", limit=1, ttl=30)
    assert sem.acquire("a")
    sem.release("b")
    assert sem.holders() == ["a"]
    assert not sem.acquire("b")


def test_a_lease_that_runs_out_frees_its_slot(redis_client):
    sem = Semaphore(redis_client, "sem", limit=1, ttl=0.3)
    assert sem.acquire("dead")
    assert not sem.acquire("b")
    time.sleep(0.4)
    assert sem.holders() == []
    assert sem.acquire("b")
    assert not sem.refresh("dead")


def test_refresh_keeps_a_lease_past_its_ttl(redis_client):
    sem = Semaphore(redis_client, "sem", limit=1, ttl=0.4)
    assert sem.acquire("a")
    for _ in range(4):
        time.sleep(0.2)
        assert sem.refresh("a")
    assert sem.holders() == ["a"]  # 0.8 s after it was taken
    assert not sem.acquire("b")
    assert not sem.refresh("b")
    assert sem.holders() == ["a"]


def test_leases_run_on_the_redis_clock(redis_client):
    sem = Semaphore(redis_client, "sem", limit=3, ttl=60)
    seconds, micros = redis_client.time()
    assert sem.acquire("a")
    [(member, score)] = redis_client.zrange("sem", 0, -1, withscores=True)
    assert member == b"a"
    assert score / 1000 == pytest.approx(seconds + micros / 1e6 + 60, abs=1.0)


def test_an_idle_semaphore_leaves_no_key_behind(redis_client):
    sem = Semaphore(redis_client, "sem", limit=2, ttl=0.3)
    assert sem.acquire("a")
    assert 0 < redis_client.pttl("sem") <= 300
    time.sleep(0.45)
    assert not redis_client.exists("sem")


def test_a_longer_lease_on_the_same_key_is_not_cut_short(redis_client):
    Semaphore(redis_client, "sem", limit=2, ttl=60).acquire("long")
    Semaphore(redis_client, "sem", limit=2, ttl=0.2).acquire("short")
    assert redis_client.pttl("sem") > 50_000


@pytest.mark.parametrize("limit, ttl", [(0, 10), (2, 0), (2, -1)])
def test_refuses_a_semaphore_that_could_never_be_held(redis_client, limit, ttl):
    with pytest.raises(ValueError):
        Semaphore(redis_client, "sem", limit=limit, ttl=ttl)


def _hammer(url: str, worker: int, limit: int, until: float) -> None:
    """Take and give back slots as fast as possible; count who is inside in Redis."""
    client = redis.Redis.from_url(url)
    sem = Semaphore(client, "race", limit=limit, ttl=5)
    n = 0
    while time.time() < until:
        holder = f"{worker}:{n}"
        n += 1
        if not sem.acquire(holder):
            continue
        # inside: the counter goes up after the slot is taken and down before
        # it is given back, so it never exceeds the holders at any instant
        client.rpush("inside-seen", client.incr("inside"))
        if n % 3 == 0:
            sem.refresh(holder)
        client.incr("entries")
        client.decr("inside")
        sem.release(holder)
    client.close()


def test_racing_processes_never_exceed_the_limit(redis_server, redis_client):
    limit, processes = 3, 8
    until = time.time() + 2.0
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_hammer, args=(redis_server.url, i, limit, until)) for i in range(processes)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    seen = [int(v) for v in redis_client.lrange("inside-seen", 0, -1)]
    assert int(redis_client.get("entries")) == len(seen) > 50  # thousands on an idle machine
    assert max(seen) == limit  # the slots were all taken at once, and never more
    assert int(redis_client.get("inside")) == 0
    assert Semaphore(redis_client, "race", limit=limit, ttl=5).holders() == []
