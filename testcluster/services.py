"""imagesync's own processes on a test cluster: one worker per node, the control
worker, beat and Flower, started exactly as an operator starts them
(``imagesync worker --node NAME`` and so on), each logging to its own file.
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path

from .process import ServerProcess, free_port, port_open, tail

#: a worker of a test cluster has no neighbours worth a second of handshakes
QUICK_START = ("--without-mingle", "--without-gossip")


class Services:
    """The Celery side of imagesync for one configuration file."""

    def __init__(self, config_path: str | Path, workdir: str | Path, env: dict[str, str] | None = None) -> None:
        self.config_path = Path(config_path)
        self.workdir = Path(workdir)
        self.env = {**os.environ, **(env or {}), "IMAGESYNC_CONFIG": str(self.config_path)}
        self.processes: dict[str, ServerProcess] = {}
        self.flower_port: int | None = None

    def _start(self, name: str, argv: list[str], ready: str | None, timeout: float = 60.0,
               wait: bool = True, env: dict[str, str] | None = None) -> ServerProcess:
        log_path = self.workdir / f"{name}.log"
        if log_path.exists():
            log_path.rename(log_path.with_suffix(f".{os.getpid()}.{len(self.processes)}.old"))
        process = ServerProcess(name, argv, log_path, env={**self.env, **(env or {})})
        process.start()
        self.processes[name] = process
        if ready is not None and wait:
            self.wait_ready(name, ready, timeout)
        return process

    def wait_ready(self, name: str, ready: str = "ready.", timeout: float = 60.0) -> None:
        """Wait until ``ready`` appears in the process's log (Celery prints "<name> ready.")."""
        log_path = self.workdir / f"{name}.log"
        self.processes[name].wait_ready(lambda: ready in log_path.read_text(errors="replace"), timeout)

    def _imagesync(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "imagesync.cli", *args]

    def start_worker(self, node: str, *celery_args: str, wait: bool = True) -> ServerProcess:
        """``imagesync worker --node NODE``: the node's queue, max_parallel processes."""
        argv = self._imagesync("worker", "--node", node, "--", *QUICK_START, *celery_args)
        return self._start(f"worker-{node}", argv, "ready.", wait=wait)

    def start_shared_worker(self, name: str, *worker_args: str, wait: bool = True) -> ServerProcess:
        """``imagesync worker WORKER_ARGS`` (``--nodes A,B``, ``--all-nodes``, ``--concurrency N``):
        one worker for several nodes' queues, logging to ``NAME.log``."""
        argv = self._imagesync("worker", *worker_args, "--", *QUICK_START)
        return self._start(name, argv, "ready.", wait=wait)

    def start_agent(self, node: str, environment: dict[str, str], *agent_args: str,
                    wait: bool = True) -> ServerProcess:
        """``imagesync agent --name NODE AGENT_ARGS``: the node's worker running on the node
        itself, in the node's ``environment`` (its runtime's socket, its crictl on PATH), as
        a DaemonSet pod would; logging to ``agent-NODE.log``."""
        argv = self._imagesync("agent", "--name", node, *agent_args, "--", *QUICK_START)
        return self._start(f"agent-{node}", argv, "ready.", wait=wait, env=environment)

    def start_control(self, *celery_args: str, wait: bool = True) -> ServerProcess:
        argv = self._imagesync("worker", "--control", "--", *QUICK_START, *celery_args)
        return self._start("control", argv, "ready.", wait=wait)

    def start_beat(self, due: tuple[str, ...] = ()) -> ServerProcess:
        """``imagesync beat``. ``due``: entries of its schedule (``"sync"``, ``"finalize-stale-runs"``)
        that last ran long ago, as after a beat that was down for a while, so that beat sends them
        at once rather than one period after it starts (Celery's rule for a new schedule)."""
        if due:
            self._date_back(due)
        return self._start("beat", self._imagesync("beat"), "beat: Starting...")

    def _date_back(self, due: tuple[str, ...]) -> None:
        """Write beat's schedule file (``log_dir/beat-schedule``) with ``due`` last run in 2000.
        Beat keeps a stored entry's last run and takes everything else from the configuration."""
        import shelve
        from datetime import datetime

        import celery
        from celery.beat import ScheduleEntry
        from celery.schedules import schedule

        from imagesync.celeryconfig import celery_settings
        from imagesync.config import load_settings

        settings = load_settings(self.config_path)
        schedule_file = settings.log_dir / "beat-schedule"
        schedule_file.parent.mkdir(parents=True, exist_ok=True)
        long_ago = datetime(2000, 1, 1, tzinfo=UTC)
        with shelve.open(str(schedule_file)) as store:
            entries = store.get("entries", {})
            for name in due:
                entries[name] = ScheduleEntry(name=name, task="", last_run_at=long_ago,
                                              schedule=schedule(60.0))
            # what beat compares before it keeps a stored schedule (else it starts a new one)
            store.update({"entries": entries, "__version__": celery.__version__,
                          "tz": celery_settings(settings)["timezone"], "utc_enabled": True})

    def start_flower(self, user: str, password: str) -> ServerProcess:
        self.flower_port = free_port()
        argv = [sys.executable, "-m", "celery", "-A", "imagesync", "flower",
                "--address=127.0.0.1", f"--port={self.flower_port}", f"--basic-auth={user}:{password}"]
        process = self._start("flower", argv, None)
        process.wait_ready(lambda: port_open(self.flower_port or 0), 60)
        return process

    def start_webhook(self, port: int) -> ServerProcess:
        """``imagesync webhook`` on 127.0.0.1:PORT; its secret comes from the configuration."""
        argv = self._imagesync("webhook", "--address", "127.0.0.1", "--port", str(port))
        process = self._start("webhook", argv, None)
        process.wait_ready(lambda: port_open(port), 30)
        return process

    def start_all(self, nodes: list[str]) -> None:
        """The control worker and one worker per node, started together."""
        self.start_control(wait=False)
        for node in nodes:
            self.start_worker(node, wait=False)
        for name in ["control", *(f"worker-{node}" for node in nodes)]:
            self.wait_ready(name)

    def worker(self, node: str) -> ServerProcess:
        return self.processes[f"worker-{node}"]

    def log(self, name: str) -> str:
        return tail(self.workdir / f"{name}.log", 200)

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        pid = process.pid
        process.stop(timeout=20)
        # prefork children of a worker that had to be killed must not linger
        try:
            os.killpg(pid or 0, signal.SIGKILL) if pid else None
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        # Together: a worker's warm shutdown takes ~2 s, and one after the other
        # they made every test's teardown wait for the sum.
        names = list(self.processes)
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            list(pool.map(self.stop, names))

    def kill_all(self) -> None:
        """SIGKILL every process group: for a cluster about to be thrown away, which needs no
        warm shutdown (about 2 s a worker) and no acknowledgement of what the workers held."""
        for name, process in list(self.processes.items()):
            if process.pid:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.kill()
            del self.processes[name]

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
