"""Child processes of the test cluster: start, wait until ready, stop, and find them again.

Every server of the cluster (redis-server, docker-registry, containerd, sshd) is a
``ServerProcess``: started in its own session (so a terminal's Ctrl-C or a
detached ``up`` leaves it to us), logging to a file under its workdir, and
stopped with SIGTERM, then SIGKILL. ``kill_pid`` lets ``down`` stop processes
that an earlier Python process started, checking the command line first so a
reused pid is never killed.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class ClusterError(RuntimeError):
    """A component of the test cluster failed to start or misbehaved."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Not the global generator: tests seed that (hypothesis does), and processes
# seeded alike would pick the same ports.
_random = random.SystemRandom()
#: set (by ``make unit``'s pytest run) where no server of the test cluster may start
NO_SERVERS = "TESTCLUSTER_NO_SERVERS"
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, below the ephemeral range.

    Ports from bind(0) come from the ephemeral range, which every outgoing
    connection on the machine also draws from: between choosing such a port and
    a server binding it, a client (ssh, containerd, another test) can take it as
    its local port. Below the range only another listener can, and servers that
    lose that race are moved (``retry_if_port_taken``).
    """
    low, _ = _ephemeral_range()
    if low > 11000:
        for _ in range(200):
            port = _random.randint(10000, low - 1)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_taken(err: BaseException) -> bool:
    """Whether a failed start was a lost race for the port (redis, sshd and the
    registry all say "address already in use", in their own capitals)."""
    return "address already in use" in str(err).lower()


def retry_if_port_taken(start: Callable[[], None], move: Callable[[], None], attempts: int = 3) -> None:
    """Run ``start``; if it fails because the port was taken, ``move`` to another port and retry."""
    for attempt in range(attempts):
        try:
            start()
            return
        except (ClusterError, OSError) as err:
            if attempt == attempts - 1 or not port_taken(err):
                raise
            move()


def start_server(name: str, argv: Callable[[], Sequence[str]], log_path: Path,
                 ready: Callable[[ServerProcess], bool],
                 timeout: float, port_fixed: bool, move: Callable[[], None]) -> ServerProcess:
    """Start a server on its port and wait until ``ready``; if someone took the port
    first (and it was not fixed by the caller), ``move`` to another and try again.
    ``argv`` is called for each try, so that it can name the current port; ``ready``
    is given the process, so that it can tell its own server from a squatter."""
    started: list[ServerProcess] = []

    def launch() -> None:
        process = ServerProcess(name, argv(), log_path)
        process.start()
        try:
            process.wait_ready(lambda: ready(process), timeout)
        except Exception:
            process.stop()
            raise
        started.append(process)

    if port_fixed:
        launch()
    else:
        retry_if_port_taken(launch, move)
    return started[-1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str, detail: Callable[[], str] = str) -> None:
    """Poll ``check`` until it is true; raise ``ClusterError`` naming ``what`` after
    ``timeout``. Other exceptions from ``check`` count as "not yet" (a server that
    is still starting refuses or resets connections); ``ClusterError`` propagates."""
    deadline = time.monotonic() + timeout
    interval = 0.01
    while True:
        try:
            if check():
                return
        except ClusterError:
            raise
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} not ready after {timeout:g} s{detail()}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ServerProcess:
    """One long-running child process whose output goes to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        if os.environ.get(NO_SERVERS):
            raise ClusterError(f"{self.name}: no server may start here ({NO_SERVERS} is set: "
                               "a test that starts one is marked cluster)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        """Raise with the end of the log if the process has exited."""
        if self._proc is not None and self._proc.poll() is not None:
            raise ClusterError(
                f"{self.name} exited with status {self._proc.returncode}; "
                f"end of {self.log_path}:\n{tail(self.log_path)}"
            )

    def wait_ready(self, check: Callable[[], bool], timeout: float = 15.0) -> None:
        """Wait until ``check`` passes; fail at once, with the log, if the process exits."""

        def alive_and_ready() -> bool:
            self.check_alive()
            return check()

        wait_until(alive_and_ready, timeout, self.name, lambda: f"; end of {self.log_path}:\n{tail(self.log_path)}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._proc = None


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    cmdline: str


def cmdline(pid: int) -> str | None:
    """The command line of a live (non-zombie) process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return None
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def find_processes(pattern: str, environ_contains: str | None = None) -> list[ProcessInfo]:
    """Live processes whose command line matches ``pattern`` (a regex), optionally
    only those whose environment contains ``environ_contains`` (e.g. ``KEY=value``)."""
    regex = re.compile(pattern)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        line = cmdline(int(entry))
        if not line or not regex.search(line):
            continue
        if environ_contains is not None:
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if environ_contains.encode() not in env:
                continue
        found.append(ProcessInfo(int(entry), line))
    return found


def kill_pid(pid: int, expect: str, timeout: float = 10.0) -> bool:
    """Stop ``pid`` (SIGTERM, then SIGKILL) if its command line still contains
    ``expect``; returns whether it was running. Used for processes started by
    another Python process (``up``/``down``), whose pids may have been reused."""
    line = cmdline(pid)
    if line is None or expect not in line:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cmdline(pid) is None:
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True
