"""One pull onto one node: when it asks first, and what it costs on the node.

The pull path is measured against a real sshd + containerd node, through both
runtimes; every SSH command a pull sends is counted by wrapping the real
transport.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from imagesync import pulls
from imagesync.config import load_settings
from imagesync.outcomes import PRESENT, PULLED
from testcluster.cluster import Cluster, toml_dumps


def test_a_fresh_first_delivery_trusts_the_plan():
    assert not pulls.needs_check(0, False, run_started=1000.0, now=1000.0 + pulls.FRESH_PLAN - 1)


@pytest.mark.parametrize("retries, redelivered, started, now", [
    (1, False, 1000.0, 1001.0),                      # a retry
    (0, True, 1000.0, 1001.0),                       # redelivered after a worker died
    (0, False, 1000.0, 1000.0 + pulls.FRESH_PLAN + 1),  # waited long in its queue
    (0, False, None, 1000.0),                        # its run is unknown
])
def test_a_pull_that_may_be_stale_asks_first(retries, redelivered, started, now):
    assert pulls.needs_check(retries, redelivered, run_started=started, now=now)


def countdowns(tmp_path) -> dict[str, list[float]]:
    """The countdowns a pull task chooses for its retries 0 to 11, with the jitter at its low and
    at its high end. In a process of its own: importing the tasks reads a configuration."""
    config = tmp_path / "imagesync.toml"
    config.write_text(toml_dumps({"prefixes": ["registry.test"], "redis_url": "redis://127.0.0.1:1/0",
                                  "log_dir": str(tmp_path / "logs"), "nodes": [{"name": "n1", "transport": "local"}]}))
    code = ("import json, random\n"
            "from imagesync.tasks import backoff\n"
            "found = {}\n"
            "for end, name in enumerate(('low', 'high')):\n"
            "    random.uniform = lambda low, high, end=end: (low, high)[end]\n"
            "    found[name] = [backoff(retries) for retries in range(12)]\n"
            "print(json.dumps(found))")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "IMAGESYNC_CONFIG": str(config)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_retries_back_off_from_about_2_s_doubling_and_never_wait_more_than_60_s(tmp_path):
    found = countdowns(tmp_path)
    lowest, highest = found["low"], found["high"]
    assert lowest[:4] == [1, 2, 4, 8] and highest[:4] == [3, 6, 12, 24]  # about 2, 4, 8, 16 s
    assert all(a <= b for a, b in zip(lowest, lowest[1:], strict=False))
    assert max(highest) == 60 and highest[-1] == 60  # the cap holds, jitter included
    assert lowest[-1] >= 30


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("pulls"), nodes=1) as cluster:
        yield cluster


class _Counting:
    """The real transport, counting the commands sent through it."""

    def __init__(self, real):
        self.real, self.commands = real, []

    def run(self, command, timeout, tail=None):
        self.commands.append(command)
        return self.real.run(command, timeout, tail)


@pytest.mark.cluster
@pytest.mark.parametrize("runtime", ["crictl", "ctr"])
def test_every_pull_is_one_command_on_the_node(one_node, tmp_path, monkeypatch, runtime):
    node = one_node.nodes[0]
    extra = {node.name: {"hosts_dir": str(node.workdir / "certs.d")}} if runtime == "ctr" else {}
    settings = load_settings(one_node.write_config(tmp_path / "imagesync.toml", runtime=runtime,
                                                   nodes_extra=extra))
    counting: dict[str, _Counting] = {}
    real_transport_for = pulls.transport_for

    def transport_for(settings, node):
        return counting.setdefault(node.name, _Counting(real_transport_for(settings, node)))

    monkeypatch.setattr(pulls, "transport_for", transport_for)
    fresh, other = one_node.push(f"bcm11/one-{runtime}", "1"), one_node.push(f"bcm11/two-{runtime}", "1")
    target = settings.node(node.name)

    # first delivery: the pull alone
    outcome, _ = pulls.pull_image(settings, target, fresh, check=False)
    assert outcome.status == PULLED, outcome.reason
    assert node.images()[fresh] == one_node.digests[fresh]
    # the same image again, checked (a redelivery): present, nothing pulled
    outcome, _ = pulls.pull_image(settings, target, fresh, check=True)
    assert outcome.status == PRESENT, outcome.reason
    # checked, and missing: asked and pulled in the same command
    outcome, _ = pulls.pull_image(settings, target, other, check=True)
    assert outcome.status == PULLED, outcome.reason
    assert node.images()[other] == one_node.digests[other]

    commands = counting[node.name].commands
    assert len(commands) == 3  # one SSH round trip per pull, checked or not
    assert all(command.startswith("timeout ") for command in commands)  # one time budget covers each
    assert not node.processes("crictl|ctr")  # nothing left running on the node


@pytest.mark.cluster
@pytest.mark.parametrize("runtime", ["crictl", "ctr"])
def test_a_moved_tag_is_pulled_again_though_its_name_is_held_and_then_found_present(one_node, tmp_path, runtime):
    from imagesync.attempt import Attempt
    from imagesync.outcomes import UPDATED
    from imagesync.planning.plan import Route

    node = one_node.nodes[0]
    extra = {node.name: {"hosts_dir": str(node.workdir / "certs.d")}} if runtime == "ctr" else {}
    settings = load_settings(one_node.write_config(tmp_path / "imagesync.toml", runtime=runtime,
                                                   nodes_extra=extra))
    target = settings.node(node.name)
    image = one_node.push(f"bcm11/moved-{runtime}", "latest")
    old = one_node.digests[image]
    assert pulls.pull_image(settings, target, image, check=False)[0].status == PULLED
    new = one_node.registry.push_image(f"bcm11/moved-{runtime}", "latest", size=2048)
    assert new != old and node.images()[image] == old
    route = Route(digest=new, replaces=old)

    # checked (a retry or redelivery): the node holds the name, under the old digest, which is not present
    outcome, _ = pulls.get_image(Attempt(settings, target, image, route, check=True))
    assert (outcome.status, outcome.replaced, outcome.digest) == (UPDATED, old, new), outcome.reason
    assert node.images()[image] == new
    assert "updated (sha256:" in outcome.describe() and f"-> {new[:19]})" in outcome.describe()
    # checked again: held under the new digest, present
    outcome, _ = pulls.get_image(Attempt(settings, target, image, route, check=True))
    assert outcome.status == PRESENT, outcome.reason
