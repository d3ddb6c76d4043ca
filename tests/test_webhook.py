"""``imagesync webhook``: registry push notifications start a run of the pushed image.

The payload readers and the coalescing loop on a real Redis; the receiver as a
process (secret, 401, 400); and on the real cluster, a docker-registry whose
``notifications`` endpoint is the receiver: a push reaches every node's
containerd with no manual trigger.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from imagesync import keys
from imagesync.lock import RunLock
from imagesync.pending import Pending
from imagesync.sync import images_trigger
from imagesync.webhook import QUIET, RETRY_BASE, BadPayload, Receiver, authorized, judge, pushed_names
from testcluster.process import free_port, port_open
from testcluster.registry import Registry

SECRET = "s3cret push token"
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX = "application/vnd.oci.image.index.v1+json"

#: Harbor's documented PUSH_ARTIFACT example (goharbor.io, "Configure Webhook Notifications")
HARBOR_EXAMPLE = {
    "type": "PUSH_ARTIFACT",
    "occur_at": 1586922308,
    "operator": "admin",
    "event_data": {
        "resources": [{
            "digest": "sha256:8a9e9863dbb6e10edb5adfe917c00da84e1700fa76e7ed02476aa6e6fb8ee0d8",
            "tag": "latest",
            "resource_url": "hub.harbor.com/test-webhook/debian:latest",
        }],
        "repository": {
            "date_created": 1586922308,
            "name": "debian",
            "namespace": "test-webhook",
            "repo_full_name": "test-webhook/debian",
            "repo_type": "private",
        },
    },
}


def event(repo, tag=None, action="push", media_type=MANIFEST, host="registry.test:5000", digest="sha256:" + "a" * 64):
    target = {"mediaType": media_type, "repository": repo, "digest": digest, "size": 1,
              "url": f"http://{host}/v2/{repo}/manifests/{digest}"}
    if tag is not None:
        target["tag"] = tag
    return {"id": "x", "action": action, "target": target, "request": {"host": host, "method": "PUT"}}


def envelope(*events):
    return {"events": list(events)}


def harbor(resource_url, tag="latest"):
    payload = copy.deepcopy(HARBOR_EXAMPLE)
    payload["event_data"]["resources"][0].update(resource_url=resource_url, tag=tag)
    return payload


# --- payloads ------------------------------------------------------------------------


def test_a_distribution_envelope_yields_each_tag_pushed_once():
    names, ignored = pushed_names(envelope(
        event("bcm11/app", media_type="application/octet-stream"),  # a blob
        event("bcm11/app", media_type="application/vnd.docker.image.rootfs.diff.tar.gzip"),
        event("bcm11/app", tag="1", media_type=INDEX),  # the index, by tag
        event("bcm11/app", media_type=MANIFEST),  # its manifests, by digest only
        event("bcm11/app", media_type=MANIFEST),
        event("bcm11/app", tag="1", media_type=INDEX),  # sent twice by a retrying registry
        event("bcm11/app", tag="1", action="pull"),
        event("bcm11/other", tag="2"),
    ))
    assert names == ["registry.test:5000/bcm11/app:1", "registry.test:5000/bcm11/other:2"]
    assert ignored == 5


def test_harbors_documented_example_yields_its_resource():
    assert pushed_names(HARBOR_EXAMPLE) == (["hub.harbor.com/test-webhook/debian:latest"], 0)
    on_a_port = harbor("harbor.local:8443/proj/app:v1", tag="v1")
    assert pushed_names(on_a_port) == (["harbor.local:8443/proj/app:v1"], 0)
    assert pushed_names({**HARBOR_EXAMPLE, "type": "DELETE_ARTIFACT"}) == ([], 1)


@pytest.mark.parametrize("payload", [[], "x", 3, {}, {"events": [1]}, {"type": "PUSH_ARTIFACT"},
                                     {"type": "PUSH_ARTIFACT", "event_data": {"resources": 1}}])
def test_anything_else_is_a_bad_payload(payload):
    with pytest.raises(BadPayload):
        pushed_names(payload)


def test_names_are_normalized_and_judged_like_every_other():
    pushed = judge(["registry.test:5000/bcm11/app:1", "registry.test:5000/bcm11/app:1", "registry.test:5000/x/y:1",
                    "registry.test:5000/BCM11/app:1", "docker.io/library/busybox:1.36"],
                   ["registry.test:5000/bcm11"], ["busybox:1.36"])
    assert pushed.kept == ["registry.test:5000/bcm11/app:1", "docker.io/library/busybox:1.36"]
    assert pushed.outside == ["registry.test:5000/x/y:1"]
    assert [name for name, _ in pushed.refused] == ["registry.test:5000/BCM11/app:1"]


def test_the_secret_bare_or_as_a_bearer_token():
    assert authorized(SECRET, SECRET)
    assert authorized(f"Bearer {SECRET}", SECRET)
    assert authorized(f"bearer {SECRET}", SECRET)
    assert not authorized(None, SECRET)
    assert not authorized("", SECRET)
    assert not authorized("s3cret", SECRET)
    assert not authorized(f"Basic {SECRET}", SECRET)
    assert not authorized("sécret", SECRET)


# --- the pending set and the loop --------------------------------------------------


class _Settings:
    prefixes = ["registry.test:5000/bcm11"]
    images: list[str] = []

    def declared_images(self) -> list[str]:
        return self.images


def test_a_burst_is_one_run_and_a_held_lock_defers_it(redis_client):
    sent = []
    receiver = Receiver(_Settings(), redis_client, SECRET, send=lambda images: sent.append(images) or len(sent))
    body = json.dumps(envelope(event("bcm11/a", tag="1"), event("bcm11/b", tag="1"))).encode()
    receiver.receive(body)
    receiver.receive(json.dumps(envelope(event("bcm11/a", tag="1"))).encode())
    now = receiver.last_push
    assert receiver.tick(now + QUIET / 2) is None  # still in the burst
    lock = RunLock(redis_client, ttl=60)
    assert lock.acquire("20260101-000000-aaaaaa")
    assert receiver.tick(now + QUIET + 0.1) is None  # a run is in progress: wait for it
    lock.release("20260101-000000-aaaaaa")
    assert receiver.tick(now + QUIET + 0.6) == "1"
    assert sent == [["registry.test:5000/bcm11/a:1", "registry.test:5000/bcm11/b:1"]]
    # the set empties only when a run has sent their pulls (settle)
    pending = Pending(redis_client)
    taken = pending.take(sent[0])
    assert list(taken) == sent[0]
    assert pending.settle(taken) == 2 and pending.take(sent[0]) == {}
    assert receiver.tick(now + QUIET + 1.2) is None
    assert images_trigger("webhook", ["r/a:1"]) == "webhook: r/a:1"
    assert images_trigger("webhook", ["a", "b", "c", "d", "e"]) == "webhook: a, b, c and 2 more"


def test_pushed_images_stay_pending_until_a_run_sends_their_pulls(redis_client):
    sent = []
    receiver = Receiver(_Settings(), redis_client, SECRET, send=lambda images: sent.append(images) or len(sent))
    app, lib = "registry.test:5000/bcm11/app:1", "registry.test:5000/bcm11/lib:1"
    receiver.receive(json.dumps(envelope(event("bcm11/app", tag="1"), event("bcm11/lib", tag="1"))).encode())
    now = receiver.last_push + QUIET
    assert receiver.tick(now) == "1"
    # the run fails before sending any pull: nothing settled, both stay pending;
    # the next run waits out a back-off rather than loop
    assert receiver.tick(now + 0.5) is None
    assert receiver.retry_at == pytest.approx(now + 0.5 + RETRY_BASE)
    assert receiver.tick(now + 0.5 + RETRY_BASE - 0.1) is None
    assert receiver.tick(now + 0.5 + RETRY_BASE) == "2" and sent[1] == [app, lib]
    # this run takes both; app is pushed again (a new digest, perhaps) before its pulls are sent
    pending = Pending(redis_client)
    taken = pending.take(sent[1])
    receiver.receive(json.dumps(envelope(event("bcm11/app", tag="1"))).encode())
    assert pending.settle(taken) == 1
    assert pending.images() == [app]  # the second push of app waits for its own run
    # the run before was no failure, and a new push is worth a run at once: no back-off
    assert receiver.tick(receiver.last_push + QUIET) == "3" and sent[2] == [app]
    assert receiver.failures == 0


# --- the process ----------------------------------------------------------------------


def post(port, payload, secret=SECRET, raw=None, path="/"):
    body = raw if raw is not None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["Authorization"] = secret
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.read()
        except OSError:  # answered, then closed before reading the whole request
            return exc.code, b""
    except OSError as exc:  # closed before the request was all sent
        return None, str(exc)


def write_config(path, redis_url, port, **extra):
    lines = ['prefixes = ["registry.test:5000/bcm11"]', f'redis_url = "{redis_url}"',
             f'log_dir = "{path.parent / "logs"}"', f"webhook_port = {port}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + '\n\n[[nodes]]\nname = "a"\ntransport = "local"\n')
    return path


def webhook(config, *args):
    import os

    return subprocess.Popen([sys.executable, "-m", "imagesync.cli", "-c", str(config), "webhook", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("IMAGESYNC_")})


def test_without_a_secret_it_says_so_in_one_line_and_exits_2(tmp_path, redis_server):
    config = write_config(tmp_path / "imagesync.toml", redis_server.url, free_port())
    process = webhook(config)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip().count("\n") == 0 and "no webhook secret" in err and "webhook_secret_file" in err


def test_the_receiver_refuses_and_keeps_serving(tmp_path, redis_server, redis_client):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    port = free_port()
    config = write_config(tmp_path / "imagesync.toml", redis_server.url, port, webhook_secret_file=str(secret_file))
    shown = subprocess.run([sys.executable, "-m", "imagesync.cli", "-c", str(config), "config", "show"],
                           capture_output=True, text=True, timeout=60)
    assert "webhook_secret_file" in shown.stdout and SECRET not in shown.stdout
    process = webhook(config)
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        good = envelope(event("bcm11/app", tag="1"))
        assert post(port, good, secret=None)[0] == 401
        assert post(port, good, secret="wrong")[0] == 401
        assert post(port, None, raw=b"{not json")[0] == 400
        assert post(port, None, raw=b"\xff\xfe")[0] == 400
        assert post(port, {"events": "no"})[0] == 400
        assert post(port, None, raw=b" " * (2 << 20))[0] in (400, None)  # refused before it is all read
        status, answer = post(port, good, secret=f"Bearer {SECRET}", path="/notify")
        assert status == 202, answer
        assert answer["accepted"] == ["registry.test:5000/bcm11/app:1"]
        assert redis_client.smembers(keys.WEBHOOK_PENDING) == {b"registry.test:5000/bcm11/app:1"}
        status, answer = post(port, envelope(event("other/app", tag="1"), event("bcm11/App", tag="1")))
        assert (status, answer["accepted"], answer["outside"]) == (202, [], ["registry.test:5000/other/app:1"])
        assert process.poll() is None
    finally:
        process.terminate()
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "without the right Authorization header" in err
    assert "malformed notification" in err
    assert "refused (400)" in err and "Content-Length too long" in err
    assert "refused image name 'registry.test:5000/bcm11/App:1'" in err
    assert "Traceback" not in err


# --- on the real cluster ----------------------------------------------------------------


def _wait(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.cluster
def test_a_push_reaches_every_node_and_pushes_during_a_run_follow(deploy):
    port = free_port()
    d = deploy(nodes=3, registry_notify=(f"http://127.0.0.1:{port}/", SECRET))
    cluster = d.cluster
    d.configure(webhook_secret=SECRET, webhook_port=port)
    d.start()
    d.services.start_webhook(port)
    nodes = [node.name for node in cluster.nodes]
    # pushed through the proxy, as a client names images: the registry's
    # notification then says the host the nodes pull from
    through_proxy = Registry(cluster.workdir / "push-client", port=cluster.proxy.port)

    began = time.monotonic()
    through_proxy.push_image("bcm11/hot", "1")
    ref = f"{cluster.registry_address}/bcm11/hot:1"
    _wait(lambda: all(ref in d.held(node) for node in nodes), 30, f"{ref} on every node")
    latency = time.monotonic() - began
    print(f"push to every node of 3: {latency:.2f} s")

    # a run held under way (the proxy holds its downloads); pushes while it runs
    # wait for it, then run together
    cluster.proxy.hold(match="/bcm11/slow/")
    try:
        through_proxy.push_image("bcm11/slow", "1")
        slow = f"{cluster.registry_address}/bcm11/slow:1"
        _wait(lambda: d.cli("history", "--json").stdout.count("webhook: " + slow) >= 1, 30, "the slow run")
        later = []
        for name in ("late-a", "late-b"):
            through_proxy.push_image(f"bcm11/{name}", "1")
            later.append(f"{cluster.registry_address}/bcm11/{name}:1")
        with cluster.redis.client() as client:
            _wait(lambda: {m.decode() for m in client.smembers(keys.WEBHOOK_PENDING)} >= set(later), 30,
                  "both later pushes waiting for the slow run")
            assert client.get(keys.LOCK) is not None  # the slow run still holds the lock
    finally:
        cluster.proxy.release()
    wanted = [ref, slow, *later]
    _wait(lambda: all(set(wanted) <= set(d.held(node)) for node in nodes), 60, "every push on every node")

    # the images are on the nodes a moment before their last pull reports
    _wait(lambda: all(run["status"] != "running" for run in d.history()), 30, "every run to end")
    runs = [run for run in d.history() if run["trigger"].startswith("webhook")]
    triggers = sorted(run["trigger"] for run in runs)
    assert triggers == sorted([f"webhook: {ref}", f"webhook: {slow}", f"webhook: {later[0]}, {later[1]}"]), triggers
    assert all(run["status"] == "completed" for run in runs), runs
    assert sum(run["counts"].get("pulled", 0) for run in runs) == 3 * 4  # each image once per node

    # a Harbor push, posted as Harbor does; and a push the registry names by
    # another host (straight to the registry, not the proxy) is no prefix's
    cluster.push("bcm11/harbor", "v1")
    harbor_ref = f"{cluster.registry_address}/bcm11/harbor:v1"
    status, answer = post(port, harbor(harbor_ref, tag="v1"), secret=f"Bearer {SECRET}")
    assert (status, answer["accepted"]) == (202, [harbor_ref])
    _wait(lambda: all(harbor_ref in d.held(node) for node in nodes), 30, "the Harbor push on every node")
    direct = f"{cluster.registry.address}/bcm11/harbor:v1"
    assert not any(direct in cluster.node(node).images() for node in nodes)
    assert post(port, {"events": []}, secret="nope")[0] == 401
    log = d.services.log("webhook")
    assert "Traceback" not in log
    assert f"{direct} lies under no configured prefix" in log


@pytest.mark.cluster
def test_a_push_whose_run_reaches_no_node_stays_pending_and_runs_once_nodes_are_back(deploy):
    port = free_port()
    d = deploy(nodes=2, registry_notify=(f"http://127.0.0.1:{port}/", SECRET))
    cluster = d.cluster
    d.configure(webhook_secret=SECRET, webhook_port=port)
    d.start()
    d.services.start_webhook(port)
    for node in cluster.nodes:
        node.stop_sshd()
    through_proxy = Registry(cluster.workdir / "push-client", port=cluster.proxy.port)
    through_proxy.push_image("bcm11/lost", "1")
    ref = f"{cluster.registry_address}/bcm11/lost:1"

    # its run reaches no node: the image stays pending (no node holds it, so no
    # later full run would ever want it)
    _wait(lambda: any(run["trigger"] == f"webhook: {ref}" and run["status"] != "running" for run in d.history()),
          60, "the run of the push")
    with cluster.redis.client() as client:
        assert Pending(client).images() == [ref]
    for node in cluster.nodes:
        node.start_sshd()
    _wait(lambda: all(ref in d.held(node.name) for node in cluster.nodes), 60, f"{ref} on every node")
    with cluster.redis.client() as client:
        _wait(lambda: Pending(client).images() == [], 30, "the pending set to empty")
    log = d.services.log("webhook")
    assert f"the last run did not send the pulls of {ref}" in log and "Traceback" not in log
