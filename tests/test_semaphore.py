"""imagesync.semaphore against a real redis-server: slots, leases, and a race of processes."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import redis
from helpers import wait_for

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


def redis_ms(client) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def test_a_lease_that_runs_out_frees_its_slot(redis_client):
    assert Semaphore(redis_client, "sem", limit=2, ttl=60).acquire("alive")  # keeps the key alive
    sem = Semaphore(redis_client, "sem", limit=2, ttl=0.3)
    before = redis_ms(redis_client)
    assert sem.acquire("dead")
    after = redis_ms(redis_client)
    # the lease ends 0.3 s after it was taken, on the Redis clock
    assert before + 300 <= redis_client.zscore("sem", "dead") <= after + 300
    # the dead holder never gives it back: the slot frees itself
    wait_for(lambda: sem.holders() == ["alive"], 10, "the lease to run out")
    assert redis_ms(redis_client) >= before + 300
    assert sem.acquire("b")
    assert not sem.refresh("dead")


def test_refresh_keeps_a_lease_past_its_ttl(redis_client):
    short, long = (Semaphore(redis_client, "sem", limit=1, ttl=ttl) for ttl in (2, 60))
    assert short.acquire("a")
    first_end = redis_client.zscore("sem", "a")
    # a refresh extends the lease by the TTL from now (here a long one)
    assert long.refresh("a")
    assert redis_client.zscore("sem", "a") > first_end + 50_000
    wait_for(lambda: redis_ms(redis_client) > first_end, 10, "the first lease's end to pass")
    assert short.holders() == ["a"]  # past the end of the lease it was taken with
    assert not short.acquire("b")
    assert not short.refresh("b")
    assert short.holders() == ["a"]


def test_leases_run_on_the_redis_clock(redis_client):
    sem = Semaphore(redis_client, "sem", limit=3, ttl=60)
    before = redis_ms(redis_client)
    assert sem.acquire("a")
    after = redis_ms(redis_client)
    [(member, score)] = redis_client.zrange("sem", 0, -1, withscores=True)
    assert member == b"a"
    assert before + 60_000 <= score <= after + 60_000


def test_an_idle_semaphore_leaves_no_key_behind(redis_client):
    assert Semaphore(redis_client, "sem", limit=2, ttl=30).acquire("a")
    assert 0 < redis_client.pttl("sem") <= 30_000  # the key lives as long as its longest lease
    assert Semaphore(redis_client, "short", limit=2, ttl=0.3).acquire("a")
    assert redis_client.pttl("short") <= 300
    wait_for(lambda: not redis_client.exists("short"), 10, "the idle semaphore's key to expire")


def test_a_longer_lease_on_the_same_key_is_not_cut_short(redis_client):
    Semaphore(redis_client, "sem", limit=2, ttl=60).acquire("long")
    Semaphore(redis_client, "sem", limit=2, ttl=0.2).acquire("short")
    assert redis_client.pttl("sem") > 50_000


@pytest.mark.parametrize("limit, ttl", [(0, 10), (2, 0), (2, -1)])
def test_refuses_a_semaphore_that_could_never_be_held(redis_client, limit, ttl):
    with pytest.raises(ValueError):
        Semaphore(redis_client, "sem", limit=limit, ttl=ttl)


ENTRIES = 300


def _hammer(url: str, worker: int, limit: int, deadline: float) -> None:
    """Take and give back slots until the race saw ENTRIES entries and a full house;
    count who is inside in Redis."""
    client = redis.Redis.from_url(url)
    sem = Semaphore(client, "race", limit=limit, ttl=5)
    n = 0
    while time.time() < deadline and not (int(client.get("entries") or 0) >= ENTRIES and client.exists("full")):
        holder = f"{worker}:{n}"
        n += 1
        if not sem.acquire(holder):
            continue
        # inside: the counter goes up after the slot is taken and down before
        # it is given back, so it never exceeds the holders at any instant
        inside = client.incr("inside")
        client.rpush("inside-seen", inside)
        if inside == limit:
            client.set("full", 1)
        if n % 3 == 0:
            sem.refresh(holder)
        client.incr("entries")
        client.decr("inside")
        sem.release(holder)
    client.close()


def test_racing_processes_never_exceed_the_limit(redis_server, redis_client):
    limit, processes = 3, 8
    deadline = time.time() + 60  # only if the race never fills the slots
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_hammer, args=(redis_server.url, i, limit, deadline)) for i in range(processes)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(90)
        assert w.exitcode == 0
    seen = [int(v) for v in redis_client.lrange("inside-seen", 0, -1)]
    assert int(redis_client.get("entries")) == len(seen) >= ENTRIES
    assert max(seen) == limit  # the slots were all taken at once, and never more
    assert int(redis_client.get("inside")) == 0
    assert Semaphore(redis_client, "race", limit=limit, ttl=5).holders() == []
