"""Unit tests of imagesync.redisclient and the Redis Sentinel settings: no server needed.

The client is built but never connects (redis-py connects on the first command),
so what it would connect to is read from its connection pool.
"""

from __future__ import annotations

import pytest
from celery import Celery
from celery.backends.redis import SentinelBackend
from kombu import Connection
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, SentinelConnectionPool

from imagesync.celeryconfig import celery_settings
from imagesync.config import load_settings, mask_url
from imagesync.errors import ConfigError
from imagesync.redisclient import SENTINEL_TIMEOUT, connect, connect_url, error_line
from imagesync.redisurl import SentinelURL, celery_url, parse_sentinel_url
from testcluster.process import free_port

NODES = 'prefixes = ["bcm11"]\n[[nodes]]\nname = "k8s-worker1"\n'
THREE = "sentinel://:hunter%402@10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://sentinel-3/2"


def settings_from(tmp_path, text, **environ):
    path = tmp_path / "imagesync.toml"
    path.write_text(text + NODES)
    return load_settings(path, environ)


def problems_of(tmp_path, text, **environ):
    with pytest.raises(ConfigError) as caught:
        settings_from(tmp_path, text, **environ)
    return caught.value.problems


# -- reading a sentinel:// URL ---------------------------------------------------------------------


def test_several_sentinels_the_database_after_the_last_and_the_password_on_the_first():
    assert parse_sentinel_url(THREE) == SentinelURL(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)),
        db=2, username=None, password="hunter@2",
    )


def test_a_login_and_a_database_may_be_written_on_every_sentinel_alike():
    url = "sentinel://ops:pw@h1:1/3;sentinel://ops:pw@h2:2/3"
    assert parse_sentinel_url(url) == SentinelURL((("h1", 1), ("h2", 2)), db=3, username="ops", password="pw")
    assert parse_sentinel_url("sentinel://h1").db == 0


@pytest.mark.parametrize(("url", "problem"), [
    ("sentinel://h1:1/1;sentinel://h2:2/2", "the sentinels name different databases (1, 2): name one"),
    ("sentinel://:a@h1;sentinel://:b@h2", "the sentinels carry different logins"),
    ("sentinel://:pw@h1;redis://:pw@h2", "'redis://h2' is not a sentinel:// URL: separate sentinels with ';'"),
    ("sentinel://h1;", "an empty part is not a sentinel:// URL"),
    ("sentinel://:pw@h1:99999/0", "'sentinel://h1:99999/0': Port out of range 0-65535"),
    ("sentinel://:pw@/0", "'sentinel:///0' names no host"),
    ("sentinel://h1/x", "the database must be a number, not 'x'"),
    ("sentinel://h1/0?ssl_cert_reqs=none", "a sentinel:// URL takes no query options"),
])
def test_what_is_wrong_with_a_sentinel_url_is_said_without_its_password(url, problem):
    with pytest.raises(ValueError) as caught:
        parse_sentinel_url(url)
    assert problem in str(caught.value)
    assert "pw" not in str(caught.value)


def test_celery_reads_the_database_and_password_of_every_sentinel():
    # kombu and the result backend read them from the first sentinel's URL
    rewritten = celery_url(THREE)
    assert rewritten == ("sentinel://:hunter%402@10.0.0.1:26379/2;sentinel://:hunter%402@10.0.0.2:26380/2;"
                         "sentinel://:hunter%402@sentinel-3:26379/2")
    assert parse_sentinel_url(rewritten) == parse_sentinel_url(THREE)
    app = Celery(set_as_current=False)
    params = SentinelBackend(app=app, url=rewritten).connparams
    assert (params["db"], params["password"]) == (2, "hunter@2")
    assert [(h["host"], h["port"]) for h in params["hosts"]] == [("10.0.0.1", 26379), ("10.0.0.2", 26380),
                                                                  ("sentinel-3", 26379)]
    connection = Connection(rewritten)
    assert (connection.virtual_host, connection.password) == ("2", "hunter@2")
    # as written, both would take database 0, the first sentinel's
    assert SentinelBackend(app=app, url=THREE).connparams["db"] == 0
    assert Connection(THREE).virtual_host == "/"
    assert celery_url("redis://:pw@h:6379/1") == "redis://:pw@h:6379/1"


# -- the client --------------------------------------------------------------------------------------


def test_a_sentinel_client_asks_the_sentinels_for_the_master_with_the_callers_options():
    retry = Retry(NoBackoff(), 3)
    client = connect_url(THREE, "mymaster", health_check_interval=30, retry=retry, socket_timeout=7)
    pool = client.connection_pool
    assert isinstance(client, Redis) and isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster" and pool.is_master
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["username"]) == (2, "hunter@2", None)
    assert (kwargs["health_check_interval"], kwargs["retry"], kwargs["socket_timeout"]) == (30, retry, 7)
    sentinels = pool.sentinel_manager.sentinels
    assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in sentinels] == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)]
    # the sentinels are asked without the master's password, with the caller's timeout
    asked = sentinels[0].connection_pool.connection_kwargs
    assert asked.get("password") is None
    assert (asked["socket_timeout"], asked["socket_connect_timeout"]) == (7, SENTINEL_TIMEOUT)


def test_a_plain_url_makes_a_plain_client_and_sentinel_needs_a_master_name():
    client = connect_url("redis://:pw@127.0.0.1:6390/4", socket_timeout=3, health_check_interval=30)
    kwargs = client.connection_pool.connection_kwargs
    assert not isinstance(client.connection_pool, SentinelConnectionPool)
    assert (kwargs["port"], kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (6390, 4, "pw", 3)
    with pytest.raises(ValueError, match="redis_master_name"):
        connect_url(THREE)


def test_no_master_is_said_on_one_line():
    # nothing listens on these loopback ports: every sentinel refuses at once
    url = ";".join(f"sentinel://:pw@127.0.0.1:{free_port()}" for _ in range(2)) + "/0"
    with pytest.raises(MasterNotFoundError) as caught:
        connect_url(url, "mymaster", socket_timeout=1).ping()
    assert error_line(caught.value) == (
        "No master found for 'mymaster': no sentinel answered, or none names a master that is up")
    assert error_line(ValueError("other")) == "other"


def test_connect_uses_the_settings(tmp_path):
    settings = settings_from(tmp_path, f'redis_url = "{THREE}"\nredis_master_name = "mymaster"\n')
    pool = connect(settings, socket_timeout=5).connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    plain = settings_from(tmp_path, 'redis_url = "redis://127.0.0.1:6390/1"\n')
    assert connect(plain).connection_pool.connection_kwargs["port"] == 6390


# -- the settings --------------------------------------------------------------------------------------


def test_a_sentinel_url_without_a_master_name_is_one_problem(tmp_path):
    assert problems_of(tmp_path, f'redis_url = "{THREE}"\n') == [
        "redis_master_name: not set: a sentinel:// redis_url needs the name the sentinels know the master by "
        "(NAME in their 'sentinel monitor NAME HOST PORT QUORUM' line)"
    ]


def test_a_master_name_without_sentinels_is_one_problem(tmp_path):
    assert problems_of(tmp_path, "", IMAGESYNC_REDIS_MASTER_NAME="mymaster") == [
        "IMAGESYNC_REDIS_MASTER_NAME: 'mymaster' is set but redis_url is not a sentinel:// URL: "
        "remove redis_master_name, or list the sentinels in redis_url"
    ]


def test_a_broken_sentinel_url_is_one_problem_with_its_passwords_masked(tmp_path):
    found = problems_of(tmp_path, 'redis_url = "sentinel://:s3cret@h1:1/1;sentinel://:s3cret@h2:2/2"\n'
                                  'redis_master_name = "m"\n')
    assert found == ["redis_url: 'sentinel://:****@h1:1/1;sentinel://:****@h2:2/2': the sentinels name different "
                     "databases (1, 2): name one: fix the URL"]


def test_the_master_name_from_the_environment_and_every_password_masked_when_shown(tmp_path):
    settings = settings_from(tmp_path, f'redis_url = "{THREE}"\n', IMAGESYNC_REDIS_MASTER_NAME="mymaster")
    rows = {key: (value, source) for key, value, source in settings.describe()}
    assert rows["redis_master_name"] == ("mymaster", "env IMAGESYNC_REDIS_MASTER_NAME")
    assert rows["redis_url"][0] == "sentinel://:****@10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://sentinel-3/2"
    assert "hunter" not in repr(settings) + repr(settings.describe())
    assert mask_url("sentinel://u:a@h1;sentinel://u:b@h2/0") == "sentinel://u:****@h1;sentinel://u:****@h2/0"


def test_celery_gets_the_sentinels_and_the_master_name_for_the_broker_and_the_results(tmp_path):
    conf = celery_settings(settings_from(tmp_path, f'redis_url = "{THREE}"\nredis_master_name = "mymaster"\n'))
    assert conf["broker_url"] == conf["result_backend"] == celery_url(THREE)
    assert conf["broker_transport_options"]["master_name"] == "mymaster"
    assert conf["result_backend_transport_options"]["master_name"] == "mymaster"
    assert conf["broker_transport_options"]["visibility_timeout"] == conf["visibility_timeout"]
    plain = celery_settings(settings_from(tmp_path, ""))
    assert "master_name" not in plain["broker_transport_options"]
    assert plain["broker_url"] == "redis://127.0.0.1:6379/0"


def test_a_client_of_many_threads_makes_them_wait_for_a_connection_rather_than_fail(redis_server, monkeypatch):
    # a worker whose pool is threads: more commands at once than redis-py's pool lets through (100)
    from concurrent.futures import ThreadPoolExecutor

    from imagesync import redisclient

    monkeypatch.setattr(redisclient, "THREAD_POOL_SIZE", 4)
    client = connect_url(redis_server.url, threads=True, retry=Retry(NoBackoff(), 3))
    before = len(client.client_list())
    with ThreadPoolExecutor(150) as pool:  # each command holds its connection 0.2 s
        answers = list(pool.map(lambda i: client.blpop([f"empty-{i}"], timeout=0.2), range(150)))
    assert answers == [None] * 150
    assert len(client.client_list()) - before <= 4
    # a client of one process (prefork) keeps redis-py's own pool
    assert not isinstance(connect_url(redis_server.url).connection_pool, redisclient.BlockingConnectionPool)
    client.close()
