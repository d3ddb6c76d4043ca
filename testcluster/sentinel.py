"""Redis Sentinel for the test cluster: a master, a replica and three sentinels.

    with SentinelGroup(tmp_path, password="pw") as group:
        group.url                 # sentinel://:pw@127.0.0.1:P1;sentinel://...;sentinel://...:P3/0
        group.master.kill()       # SIGKILL, as a crash would
        group.wait_for_failover(old_port, timeout=30)   # -> the replica, now master

Every server is Debian's redis-server (the sentinels are ``redis-sentinel``, the
same binary) on a free 127.0.0.1 port, with its own directory. The sentinels
take a master for down after ``down_after_ms`` (1 s here, 30 s by default) and
two of them must agree, as in a production quorum of three.
"""

from __future__ import annotations

import atexit
import time
from pathlib import Path

import redis

from .process import ClusterError, ServerProcess, free_port, start_server, wait_until
from .redis import RedisServer


class ReplicaServer(RedisServer):
    """A redis-server replicating ``master`` (with its password, if it has one)."""

    def __init__(self, workdir: str | Path, master: RedisServer) -> None:
        super().__init__(workdir, password=master.password)
        self.master = master

    def _argv(self) -> list[str]:
        argv = [*super()._argv(), "--replicaof", "127.0.0.1", str(self.master.port)]
        if self.password:
            argv += ["--masterauth", self.password]
        return argv


class SentinelServer:
    """``redis-sentinel`` on a free port, watching ``master`` as ``master_name``."""

    def __init__(self, workdir: str | Path, master: RedisServer, master_name: str, down_after_ms: int) -> None:
        self.workdir = Path(workdir)
        self.master = master
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.port = free_port()
        self._process: ServerProcess | None = None

    def _config(self) -> str:
        name = self.master_name
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            "daemonize no",
            "protected-mode no",
            f"dir {self.workdir}",
            'logfile ""',
            # quorum 2 of 3: one sentinel alone cannot fail a master over
            f"sentinel monitor {name} 127.0.0.1 {self.master.port} 2",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} 10000",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.master.password:
            lines.append(f"sentinel auth-pass {name} {self.master.password}")
        return "\n".join(lines) + "\n"

    def _argv(self) -> list[str]:
        # sentinel rewrites its configuration file as it learns: one per start, in its directory
        path = self.workdir / "sentinel.conf"
        path.write_text(self._config())
        return ["redis-sentinel", str(path)]

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def _ping(self, process: ServerProcess) -> bool:
        with self.client() as c:
            return bool(c.info("server")["process_id"] == process.pid)

    def start(self, timeout: float = 10.0) -> SentinelServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._process = start_server("redis-sentinel", self._argv, self.workdir / "sentinel.log", self._ping,
                                     timeout, False, self._move)
        return self

    def _move(self) -> None:
        self.port = free_port()

    def master_state(self) -> dict:
        """What this sentinel says of the master (``SENTINEL MASTER name``)."""
        with self.client() as c:
            return dict(c.sentinel_master(self.master_name))

    def stop(self) -> None:
        if self._process:
            self._process.stop()


class SentinelGroup:
    """A master, its replica and three sentinels under ``workdir``."""

    def __init__(self, workdir: str | Path, master_name: str = "imagesync", password: str | None = None,
                 down_after_ms: int = 1000) -> None:
        self.workdir = Path(workdir).absolute()
        self.master_name = master_name
        self.password = password
        self.master = RedisServer(self.workdir / "master", password=password)
        self.replica = ReplicaServer(self.workdir / "replica", self.master)
        self.sentinels = [SentinelServer(self.workdir / f"sentinel-{i}", self.master, master_name, down_after_ms)
                          for i in (1, 2, 3)]

    @property
    def url(self) -> str:
        """The ``redis_url`` an operator would write: every sentinel, the database after the last."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{s.port}" for s in self.sentinels) + "/0"

    def start(self, timeout: float = 30.0) -> SentinelGroup:
        atexit.register(self.stop)  # as the cluster does: nothing outlives the tests
        try:
            self.master.start()
            self.replica.start()
            for sentinel in self.sentinels:
                sentinel.start()
            wait_until(self._watching, timeout, "sentinels watching the master, its replica and each other",
                       lambda: f"; sentinel-1 says {self.sentinels[0].master_state()}")
        except BaseException:
            self.stop()
            raise
        return self

    def _watching(self) -> bool:
        # Sentinels learn of the replica from the master, and of each other from
        # their announcements through it: a failover before that would not happen.
        for sentinel in self.sentinels:
            state = sentinel.master_state()
            if int(state["num-slaves"]) != 1 or int(state["num-other-sentinels"]) != 2:
                return False
        with self.master.client() as c:
            link = c.info("replication")
        return bool(link.get("connected_slaves") == 1 and link.get("slave0", {}).get("state") == "online")

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as c:
                    address = c.sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def wait_for_failover(self, old_port: int, timeout: float) -> float:
        """Wait until every sentinel names another master than ``old_port`` and that
        server answers as a master; returns the seconds it took."""
        began = time.monotonic()

        def moved() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                with sentinel.client() as c:
                    address = c.sentinel_get_master_addr_by_name(self.master_name)
                ports.add(int(address[1]))
            if len(ports) != 1 or old_port in ports:
                return False
            (port,) = ports
            server = self.replica if port == self.replica.port else None
            if server is None:
                raise ClusterError(f"the sentinels name a master on port {port}, which is not the replica's")
            with server.client() as c:
                return bool(c.info("replication")["role"] == "master")

        wait_until(moved, timeout, "a failover to the replica")
        return time.monotonic() - began

    def stop(self) -> None:
        """Stop everything; safe to call twice, and after a failed start."""
        atexit.unregister(self.stop)
        for stop in [*(s.stop for s in self.sentinels), self.replica.stop, self.master.stop]:
            try:
                stop()
            except Exception:  # stop the rest whatever one of them does
                pass

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
