"""The pieces of copies between agents that need no cluster: the fleet's token, the
holder's address as registered, the hosts.toml a target's containerd reads."""

from __future__ import annotations

import tomllib

import fakeredis

from imagesync import keys
from imagesync.peerpull import hosts_toml, peer_of
from imagesync.peerserve import fleet_token


def test_every_agent_reads_the_one_token_the_first_made():
    redis = fakeredis.FakeRedis()
    first = fleet_token(redis)
    assert len(first) == 64 and fleet_token(redis) == first
    redis.delete(keys.PEER_TOKEN)  # how an operator changes it
    assert fleet_token(redis) not in ("", first)


def test_a_registered_address_goes_into_a_url_only_if_it_is_host_and_port():
    redis = fakeredis.FakeRedis()
    for address, kept in [("10.0.0.7:5071", True), ("[fd00::7]:5071", True), ("node-7.cluster:5071", True),
                          ("10.0.0.7", False), ('x"]\nserver = "http://evil:1', False), ("a b:1", False)]:
        redis.hset(keys.agent("n"), "peer", address)
        assert peer_of(redis, "n") == (address if kept else ""), address
    assert peer_of(redis, "unknown") == ""


def test_the_holder_is_the_only_host_and_the_token_goes_with_every_request():
    config = tomllib.loads(hosts_toml("10.0.0.7:5071", "t0ken"))
    url = "http://10.0.0.7:5071"
    # the server too: a failing holder never hands over to the registry behind the copy's back
    assert config["server"] == url and list(config["host"]) == [url]
    assert config["host"][url]["capabilities"] == ["pull", "resolve"]
    assert config["host"][url]["header"] == config["header"] == {"Authorization": "Bearer t0ken"}
