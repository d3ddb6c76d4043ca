"""Shared fixtures: a private redis-server (never the system one) and the real test cluster."""

from __future__ import annotations

import pytest

from imagesync.cluster.redis import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()
