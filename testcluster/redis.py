"""A private redis-server for the test cluster, never the system one on 6379."""

from __future__ import annotations

from pathlib import Path

import redis

from .process import ServerProcess, free_port, start_server


class RedisServer:
    """``redis-server`` on a free 127.0.0.1 port, with its data under ``workdir``.

    Runs as production should (``maxmemory-policy noeviction``, AOF unless
    ``appendonly=False``), so ``restart()`` keeps the data, and ``kill()``
    (SIGKILL) loses at most the last second of writes.
    """

    def __init__(self, workdir: str | Path, password: str | None = None, appendonly: bool = True,
                 port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.password = password
        self.appendonly = appendonly
        self.port = port or free_port()
        self._port_fixed = port is not None  # and once started: restart() keeps the port
        self._process: ServerProcess | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def url_for(self, db: int) -> str:
        return self.url.rsplit("/", 1)[0] + f"/{db}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url_for(db), socket_timeout=5)

    def _argv(self) -> list[str]:
        argv = [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--logfile", "",
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)

        self._process = start_server("redis-server", self._argv, self.workdir / "redis.log", self._ping,
                                     timeout, self._port_fixed, self._move)
        self._port_fixed = True
        return self

    def _move(self) -> None:
        self.port = free_port()

    def _ping(self, process: ServerProcess) -> bool:
        # our server, not one that took the port first (and that may never answer), and done
        # loading its AOF: until then it answers every command but INFO with LOADING
        with redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1) as c:
            return bool(c.info("server")["process_id"] == process.pid and not c.info("persistence")["loading"])

    def stop(self) -> None:
        """SIGTERM: redis flushes the AOF and exits."""
        if self._process:
            self._process.stop()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self._process:
            self._process.kill()

    def restart(self) -> None:
        """Stop and start again on the same port and directory (AOF brings the data back)."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
