"""Fan-out: how fast a sync hands out 10,000 and 100,000 pulls, and in how much memory.

``imagesync.sync.start_run`` runs with its real ``send_pull`` (Celery
``apply_async`` to the node queues of a real redis-server); only the
inventory is synthetic (``bench.synthetic``: nodes that each lack 2,000
images). Two ways:

* in a process of its own (``python -m bench.fanout child``), timed phase by
  phase: the plan, then the messages; its peak RSS (VmHWM) is the sync task's;
* inside a real control worker (``imagesync worker --control`` with the
  inventory patched), the sync task sent as beat sends it: the peak RSS of the
  worker's main process and of the pool process that ran the task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import Report, Sample, children, proc_status, progress, remove_workdir, verdict, workdir

IMAGES_PER_NODE = 2000


def _config(root: Path, redis_url: str, nodes: int) -> Path:
    from testcluster.cluster import toml_dumps

    from .synthetic import PREFIXES

    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "prefixes": list(PREFIXES),
        "max_parallel": 4,
        "time_out": 1800,
        "log_dir": str(log_dir),
        "redis_url": redis_url,
        "nodes": [{"name": f"node-{n + 1:03d}", "host": "127.0.0.1"} for n in range(nodes)],
    }
    path = root / "imagesync.toml"
    path.write_text(toml_dumps(config))
    return path


def _patch_inventory(nodes: int) -> None:
    """Make ``start_run`` see synthetic nodes (one catalogue image missing per node and pull)."""
    import imagesync.sync

    from . import synthetic

    # every node lacks IMAGES_PER_NODE of a catalogue twice that size
    inventory = synthetic.inventory_of(nodes, 2 * IMAGES_PER_NODE, IMAGES_PER_NODE)
    imagesync.sync.survey = lambda settings, redis, send=None: inventory  # type: ignore[assignment]


def child(nodes: int) -> None:
    """The sync task's body in this process; prints its figures as JSON."""
    _patch_inventory(nodes)
    from imagesync import sync, tasks
    from imagesync.planning.plan import Route

    if os.environ.get("BENCH_SENT_EVENT"):
        tasks.app.conf.task_send_sent_event = True  # as before: one task-sent event per pull, for Flower
    redis = tasks.redis()
    marks: dict[str, float] = {}
    first: dict[str, float] = {}
    real_plan = sync.make_plan

    def timed_plan(*args: Any, **kwargs: Any) -> Any:
        # the first plan: the one the pulls are sent by (a second one follows the registries'
        # answers about the tags held, after the sending)
        start = time.perf_counter()
        plan = real_plan(*args, **kwargs)
        if "plan_end" not in marks:
            marks["plan_start"], marks["plan_end"] = start, time.perf_counter()
        return plan

    sync.make_plan = timed_plan  # type: ignore[assignment]

    def send(node: str, image: str, run_id: str, expires: float, route: Route) -> None:
        if node not in first:
            first[node] = time.perf_counter()
        tasks.send_pull(node, image, run_id, expires, route, producer=producer)
        marks["last_send"] = time.perf_counter()

    rss_before = proc_status()["VmRSS"]
    # one producer for the whole fan-out, connected before the clock starts, as the sync task holds one
    with tasks.app.producer_or_acquire() as producer:
        began = time.perf_counter()
        started = sync.start_run(tasks.settings, redis, send, trigger="bench")
    ended = time.perf_counter()
    status = proc_status()
    sending = marks["last_send"] - marks["plan_end"]
    print(json.dumps({
        "pulls": started.pulls,
        "total": ended - began,
        "plan": marks["plan_end"] - marks["plan_start"],
        "sending": sending,
        "rate": started.pulls / sending,
        "last_node_first_send": max(first.values()) - marks["plan_end"],
        "rss_before_kib": rss_before,
        "peak_kib": status["VmHWM"],
    }))


def worker(nodes: int) -> None:
    """A control worker whose inventory is synthetic (started by ``measure_worker``)."""
    _patch_inventory(nodes)
    from imagesync.celery import app

    app.worker_main(["worker", "-P", "prefork", "-c", "1", "-Q", "imagesync", "-l", "WARNING",
                     "--without-mingle", "--without-gossip", "--without-heartbeat", "-n", "bench-control@%h"])


def _env(config: Path) -> dict[str, str]:
    root = str(Path(__file__).absolute().parent.parent)
    return {**os.environ, "IMAGESYNC_CONFIG": str(config),
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def measure_child(root: Path, redis: Any, nodes: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    redis.client().flushall()
    config = _config(root, redis.url, nodes)
    out = subprocess.run([sys.executable, "-m", "bench.fanout", "child", str(nodes)],
                         env={**_env(config), **(env or {})}, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"fan-out child failed:\n{out.stderr[-3000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    with redis.client() as client:
        figures["redis_used_kib"] = int(client.info("memory")["used_memory"]) // 1024
        figures["queued"] = sum(client.llen(f"node.node-{n + 1:03d}") for n in range(nodes))
    return figures


def measure_worker(root: Path, redis: Any, nodes: int) -> dict[str, Any]:
    """The sync task inside a real control worker: seconds, and the peak RSS of its processes."""
    from celery import Celery

    redis.client().flushall()
    config = _config(root, redis.url, nodes)
    log = open(root / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "bench.fanout", "worker", str(nodes)], env=_env(config),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    app = Celery("bench-client", broker=redis.url, backend=redis.url)
    try:
        deadline = time.monotonic() + 120
        while not app.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the control worker did not start: see {root / 'worker.log'}")
        pool = children(proc.pid)
        idle = {pid: proc_status(pid)["VmRSS"] for pid in [proc.pid, *pool]}
        began = time.perf_counter()
        answer = app.send_task("imagesync.sync", kwargs={"trigger": "bench"}, queue="imagesync").get(timeout=900)
        took = time.perf_counter() - began
        peaks = {pid: proc_status(pid)["VmHWM"] for pid in [proc.pid, *pool]}
    finally:
        app.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return {
        "pulls": answer["pulls"],
        "seconds": took,
        "main_idle_kib": idle[proc.pid],
        "main_peak_kib": peaks[proc.pid],
        "pool_idle_kib": max(idle[p] for p in pool),
        "pool_peak_kib": max(peaks[p] for p in pool),
    }


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


def _say_child(report: Report, nodes: int, runs: list[dict[str, Any]]) -> None:
    pulls = nodes * IMAGES_PER_NODE
    rate = Sample.of(r["rate"] for r in runs)
    report.say(f"{pulls:,} pulls ({nodes} nodes x {IMAGES_PER_NODE:,} missing), start_run with the real send_pull:")
    report.say(f"  enqueue rate      {rate.show(',.0f', ' pulls/s')}")
    report.say(f"  start_run total   {Sample.of(r['total'] for r in runs).show('.2f', ' s')} "
               f"(plan {Sample.of(r['plan'] for r in runs).show('.2f', ' s')})")
    first = Sample.of(r["last_node_first_send"] for r in runs)
    report.say(f"  last node's first pull sent after {first.show('.3f', ' s')} "
               f"(sent node by node, it would wait {(nodes - 1) * IMAGES_PER_NODE / rate.median:.1f} s)")
    report.say(f"  sync task peak RSS {_mib(max(r['peak_kib'] for r in runs))} "
               f"(RSS before the run {_mib(min(r['rss_before_kib'] for r in runs))}); "
               f"Redis holding the queued messages: {_mib(runs[-1]['redis_used_kib'])}")
    report.figure(f"fanout_{pulls}", runs)


def _say_sent_events(report: Report, root: Path, redis: Any, repeats: int) -> None:
    """What a task-sent event per pull (task_send_sent_event, off since issue 28) costs: 10,000 pulls
    sent with and without them, taking turns."""
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for i in range(repeats):
        for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
            progress(f"fan-out 10,000 pulls, task-sent events {name}: run {i + 1} of {repeats}")
            runs[name].append(measure_child(root, redis, 5, {"BENCH_SENT_EVENT": "1"} if name == "on" else {}))
    off, on = (Sample.of(r["rate"] for r in runs[name]) for name in ("off", "on"))
    ratio = Sample.of(a["rate"] / b["rate"] for a, b in zip(runs["off"], runs["on"], strict=True))
    report.say("10,000 pulls (5 nodes x 2,000), taking turns:")
    report.say(f"  as shipped, no task-sent events          {off.show(',.0f', ' pulls/s')}")
    report.say(f"  with a task-sent event per pull (before) {on.show(',.0f', ' pulls/s')}")
    report.say(f"  rate without / with                      {ratio.show('.2f')}   "
               f"target >= 2,000 pulls/s: {verdict(off.median >= 2000)}")
    report.figure("fanout_sent_events", runs)


def run(report: Report, quick: bool = False) -> None:
    from testcluster.redis import RedisServer

    root = workdir("fanout")
    try:
        redis = RedisServer(root / "redis").start()
        try:
            sizes = [(5, 3, False), (50, 1, True)] if not quick else [(5, 2, True)]
            for nodes, repeats, in_worker in sizes:
                pulls = nodes * IMAGES_PER_NODE
                runs = []
                for i in range(repeats):
                    progress(f"fan-out {pulls} pulls: run {i + 1} of {repeats}")
                    runs.append(measure_child(root, redis, nodes))
                assert all(r["pulls"] == pulls and r["queued"] == pulls for r in runs), runs
                _say_child(report, nodes, runs)
                if not in_worker:
                    continue
                progress(f"fan-out {pulls} pulls: inside a control worker")
                w = measure_worker(root, redis, nodes)
                assert w["pulls"] == pulls, w
                report.say(f"  in a control worker: {w['seconds']:.2f} s, {pulls / w['seconds']:,.0f} pulls/s "
                           f"with the plan; the pool process that ran it: {_mib(w['pool_idle_kib'])} idle, "
                           f"peak {_mib(w['pool_peak_kib'])}; the worker's main process "
                           f"{_mib(w['main_idle_kib'])} -> {_mib(w['main_peak_kib'])}")
                report.figure(f"fanout_worker_{pulls}", w)
            _say_sent_events(report, root, redis, 2 if quick else 3)
        finally:
            redis.stop()
    finally:
        remove_workdir(root)


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(int(sys.argv[2]))
    elif sys.argv[1] == "worker":
        worker(int(sys.argv[2]))
