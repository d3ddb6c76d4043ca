"""``python -m bench webhook``: push to every node, through the registry's notification.

A 4-node test cluster whose docker-registry notifies ``imagesync webhook``;
each repetition pushes a new image (through the proxy, under the name the
nodes pull by) and measures, from the moment the push's manifest PUT
returned: when the run started (its record's ``started``), when it finished,
and when every node's containerd held the image (polled every 0.1 s).
"""

from __future__ import annotations

import time
from typing import Any

from .common import Deployment, Report, Sample, progress, remove_workdir, workdir

NODES = 4
SECRET = "bench-webhook-secret"


def _run_for(d: Deployment, ref: str) -> Any:
    store = d.store()
    for run_id in d.redis.lrange("imagesync:runs", 0, 20):
        run = store.get(run_id.decode())
        if run is not None and run.trigger == f"webhook: {ref}":
            return run
    return None


def _one(d: Deployment, client: Any, name: str, timeout: float = 60.0) -> dict[str, float]:
    client.push_image(f"bcm11/{name}", "1")
    pushed = time.time()
    ref = f"{d.cluster.registry_address}/bcm11/{name}:1"
    deadline = time.monotonic() + timeout
    everywhere = None
    while time.monotonic() < deadline:
        if all(ref in node.images() for node in d.cluster.nodes):
            everywhere = time.time() - pushed
            break
        time.sleep(0.1)
    if everywhere is None:
        raise RuntimeError(f"{ref} not on every node after {timeout:g} s")
    run = None
    while run is None or run.status == "running":
        run = _run_for(d, ref)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no finished webhook run for {ref}")
        time.sleep(0.05)
    return {"everywhere": everywhere, "run_started": run.started - pushed, "run_finished": run.finished - pushed}


def run(report: Report, quick: bool = False) -> None:
    from testcluster.process import free_port
    from testcluster.registry import Registry

    root = workdir("webhook")
    try:
        port = free_port()
        d = Deployment(root, nodes=NODES)
        d.cluster.registry.notify = (f"http://127.0.0.1:{port}/", SECRET)
        with d:
            d.configure(webhook_secret=SECRET, webhook_port=port)
            d.start_workers()
            d.services.start_webhook(port)
            client = Registry(root / "push-client", port=d.cluster.proxy.port)
            progress("webhook: warm-up push")
            _one(d, client, "warm-up")
            repeats = 3 if quick else 7
            results = []
            for i in range(repeats):
                progress(f"webhook: push {i + 1} of {repeats}")
                results.append(_one(d, client, f"push-{i}"))
        for key, what in (("run_started", "push -> run started"), ("run_finished", "push -> run finished"),
                          ("everywhere", f"push -> on all {NODES} nodes (containerd, polled 0.1 s)")):
            sample = Sample.of(r[key] for r in results)
            report.say(f"{what}: {sample.show('.2f', ' s')}")
            report.figure(f"webhook_{key}", list(sample.values))
    finally:
        remove_workdir(root)
