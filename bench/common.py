"""What every benchmark needs: statistics, the machine, /proc readings, a deployment.

Figures are medians over repetitions, with the spread shown as min..max; the
machine is shared and noisy, so every comparison is made side by side within
one run, never against a number measured another day.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: where benchmark clusters live: short, so containerd's socket path fits
WORK_ROOT = Path(os.environ.get("BENCH_TMP", "/tmp"))
#: what-if changes to the workers, for measuring what a piece of imagesync costs
WHATIF = Path(__file__).with_name("whatif")


# -- statistics ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """Repeated measurements of one quantity."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Sample:
        return cls(tuple(values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def show(self, fmt: str = ".3f", unit: str = "") -> str:
        """``1.234 s (1.200..1.300, n=5)``"""
        m = format(self.median, fmt)
        if len(self.values) == 1:
            return f"{m}{unit} (n=1)"
        return f"{m}{unit} ({format(self.low, fmt)}..{format(self.high, fmt)}, n={len(self.values)})"


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


# -- output --------------------------------------------------------------------------


class Report:
    """Lines printed as they come, kept for the summary at the end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.figures: dict[str, Any] = {}

    def say(self, line: str = "") -> None:
        self.lines.append(line)
        print(f"[{self.name}] {line}" if line else "", flush=True)

    def figure(self, key: str, value: Any) -> None:
        self.figures[key] = value


def progress(text: str) -> None:
    """A note on stderr while something slow happens (not part of the figures)."""
    print(f"  .. {text}", file=sys.stderr, flush=True)


# -- the machine ---------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- /proc readings ------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(rest.split()[0])
    return found


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def cpu_seconds_used() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds() -> float:
    """CPU seconds this process has used (all its threads)."""
    t = os.times()
    return t.user + t.system


# -- clusters ------------------------------------------------------------------------


def workdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"isb-{name}-", dir=WORK_ROOT))


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Deployment:
    """A test cluster with imagesync's workers on it, driven from this process.

    Runs are triggered the way beat or ``celery call`` triggers them (a message
    to the control queue), and followed through the run record in Redis, so
    that a makespan is measured from the trigger to the record's ``finished``
    time, without a CLI process's start-up in it.
    """

    def __init__(self, root: Path, nodes: int = 2, runtime: str = "crictl", whatif: str | None = None) -> None:
        from testcluster.cluster import Cluster
        from testcluster.services import Services

        self.root = root
        self.cluster = Cluster(root / "cluster", nodes=nodes, runtime=runtime)
        self.config_path = root / "imagesync.toml"
        env = {}
        if whatif:
            # bench/whatif/sitecustomize.py changes the workers as BENCH_WHATIF says; it imports
            # imagesync before ``-m`` puts the working directory on the path: this tree's, then
            path = [str(WHATIF), str(WHATIF.parents[1]), os.environ.get("PYTHONPATH", "")]
            env = {"BENCH_WHATIF": whatif, "PYTHONPATH": os.pathsep.join(filter(None, path))}
        self.services = Services(self.config_path, root / "services", env=env)
        self._app: Any = None
        self._redis: Any = None

    def start(self) -> Deployment:
        self.cluster.start()
        return self

    def configure(self, **overrides: Any) -> Path:
        self.cluster.write_config(self.config_path, **overrides)
        return self.config_path

    def start_workers(self, nodes: Sequence[str] | None = None) -> None:
        names = [n.name for n in self.cluster.nodes] if nodes is None else list(nodes)
        self.services.start_all(names)

    def stop(self) -> None:
        if self._app is not None:
            self._app.close()
        if self._redis is not None:
            self._redis.close()
        self.services.stop_all()
        self.cluster.stop()

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def redis(self) -> Any:
        if self._redis is None:
            self._redis = self.cluster.redis.client()
        return self._redis

    @property
    def app(self) -> Any:
        """A Celery client of this deployment's broker (imagesync.celery reads one config per process)."""
        if self._app is None:
            from celery import Celery

            url = self.cluster.redis.url
            self._app = Celery("bench-client", broker=url, backend=url)
        return self._app

    def store(self) -> Any:
        from imagesync.runs import RunStore

        return RunStore(self.redis, stale_after=3600, lock_ttl=3600)

    def trigger(self, timeout: float = 300.0) -> tuple[str, float, dict[str, Any]]:
        """Send ``imagesync.sync``; returns (run id, wall time it was sent, the task's answer)."""
        sent = time.time()
        result = self.app.send_task("imagesync.sync", kwargs={"trigger": "bench"}, queue="imagesync")
        answer = result.get(timeout=timeout)
        result.forget()
        return answer["run"], sent, answer

    def wait(self, run_id: str, timeout: float = 900.0, poll: float = 0.05) -> Any:
        """The run record once the run is over."""
        store = self.store()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if store.status(run_id) not in (None, "running"):
                return store.get(run_id)
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} still running after {timeout:g} s")

    def sync(self, timeout: float = 900.0) -> tuple[Any, float]:
        """One run, start to end: (run record, makespan from trigger to finished)."""
        run_id, sent, answer = self.trigger()
        if answer["status"] != "started":
            raise RuntimeError(f"sync did not start a run: {answer}")
        run = self.wait(run_id, timeout)
        if run.status != "completed" or run.failures:
            raise RuntimeError(f"run {run_id} ended {run.status} with {run.failures} failures: {run.counts}")
        return run, run.finished - sent

    def cli(self, *args: str, timeout: float = 600.0) -> Any:
        import subprocess

        return subprocess.run(
            [sys.executable, "-m", "imagesync.cli", *args],
            env={**os.environ, "IMAGESYNC_CONFIG": str(self.config_path)},
            capture_output=True, text=True, timeout=timeout,
        )


def clear_pull_log(node: Any) -> None:
    node.pull_log.write_text("")


def pull_intervals(nodes: Iterable[Any]) -> list[tuple[str, float, float]]:
    """(node, start, end) of every finished pull the nodes' crictl logged."""
    return [(n.name, p.start, p.end) for n in nodes for p in n.pulls() if p.end is not None]
