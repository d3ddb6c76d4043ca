"""The whole test cluster: Redis, a registry behind a fault-injecting proxy, N nodes.

    with Cluster(tmp_path, nodes=3) as cluster:
        ref = cluster.push("bcm11/app", "1")              # 127.0.0.1:PROXY/bcm11/app:1
        cluster.seed({"node-1": ["bcm11/app:1"]})         # pushed and preloaded via CRI
        config = cluster.write_config(tmp_path / "imagesync.toml", max_parallel=2)

Images are named by the proxy's address, so every pull a node makes goes through
``cluster.proxy`` (delay, hang, error, reset) and is recorded there; pushes go
straight to the registry. Everything is started in parallel, and stopped on exit,
on a failed start and at interpreter exit; ``state`` (written to
``<workdir>/cluster.json``) lets ``python -m testcluster down`` find it all.
"""

from __future__ import annotations

import atexit
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .node import Node, generate_key
from .proxy import RegistryProxy
from .redis import RedisServer
from .registry import Registry

RUNTIMES = ("crictl", "ctr")
DEFAULT_PREFIXES = ("bcm11", "nvidia")


class Cluster:
    """Redis, registry, proxy and ``nodes`` nodes (``node-1``...) under ``workdir``."""

    def __init__(self, workdir: str | Path, nodes: int = 3, runtime: str = "crictl",
                 redis_password: str | None = None, registry_login: tuple[str, str] | None = None,
                 registry_notify: tuple[str, str] | None = None) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
        self.workdir = Path(workdir).absolute()
        self.runtime = runtime
        self.key_file = self.workdir / "id_ed25519"
        #: the key every node's ssh uses to reach the others (Node.trust_peers)
        self.peer_key = self.workdir / "peer_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.log_dir = self.workdir / "logs"
        self.redis = RedisServer(self.workdir / "redis", password=redis_password)
        # registry_notify: (url, secret) of a notification endpoint for every push
        self.registry = Registry(self.workdir / "registry", login=registry_login, notify=registry_notify)
        self.proxy = RegistryProxy(self.registry.address)
        self.nodes = [
            Node(f"node-{i}", self.workdir / "nodes" / f"node-{i}",
                 registries=[self.proxy.address, self.registry.address], key_file=self.key_file,
                 peer_key=self.peer_key)
            for i in range(1, nodes + 1)
        ]
        #: every ref pushed through ``push``/``seed`` -> its manifest digest
        self.digests: dict[str, str] = {}
        self.startup_seconds: float | None = None
        self._started = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Cluster:
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        atexit.register(self.stop)
        self._started = True
        try:
            if not self.key_file.exists():
                generate_key(self.key_file, "imagesync-test-client")
            if not self.peer_key.exists():
                generate_key(self.peer_key, "imagesync-test-peers")
            # the registry first: if it had to move to another port, the proxy and
            # the nodes' hosts.toml must name the port it got
            self._parallel([self.redis.start, self.registry.start, self.proxy.start])
            self.proxy.upstream = self.registry.address
            for node in self.nodes:
                node.registries = [self.proxy.address, self.registry.address]
            self._parallel([node.start for node in self.nodes])
            self.known_hosts.write_text("".join(node.known_hosts_line() + "\n" for node in self.nodes))
            for node in self.nodes:  # the nodes trust each other over SSH, as for peer_ssh
                node.trust_peers(self.nodes)
            self.startup_seconds = time.monotonic() - began
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything; safe to call twice, and after a failed start."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        # one after the other: also runs from atexit, when no new thread may start
        for stop in [*(node.stop for node in self.nodes), self.proxy.stop, self.registry.stop, self.redis.stop]:
            try:
                stop()
            except Exception:  # stop the rest whatever one of them does
                pass
        (self.workdir / "cluster.json").unlink(missing_ok=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _parallel(calls: Iterable[Callable[[], object]]) -> None:
        calls = list(calls)
        if not calls:
            return
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            futures = [pool.submit(call) for call in calls]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]

    @property
    def state(self) -> dict[str, Any]:
        """What is running, for people (``up``) and for ``down``."""
        return {
            "workdir": str(self.workdir),
            "redis": {"url": self.redis.url, "pid": self.redis.pid},
            "registry": {"address": self.registry.address, "pid": self.registry.pid},
            "proxy": {"address": self.proxy.address},
            "key_file": str(self.key_file),
            "known_hosts": str(self.known_hosts),
            "nodes": [
                {"name": n.name, "ssh_port": n.ssh_port, "ssh_user": n.ssh_user, "socket": n.socket, "pids": n.pids}
                for n in self.nodes
            ],
        }

    def _write_state(self) -> None:
        (self.workdir / "cluster.json").write_text(json.dumps(self.state, indent=2) + "\n")

    # -- images ----------------------------------------------------------------------

    @property
    def registry_address(self) -> str:
        """The host:port images are named by (the proxy, so pulls go through it)."""
        return self.proxy.address

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in this cluster (nodes: {[n.name for n in self.nodes]})")

    def ref(self, image: str) -> str:
        """``bcm11/app:1`` -> ``127.0.0.1:PROXY/bcm11/app:1``; full refs pass unchanged."""
        first = image.split("/", 1)[0]
        if "/" in image and ("." in first or ":" in first or first == "localhost"):
            return image
        return f"{self.registry_address}/{image}"

    def push(self, repo: str, tag: str, size: int = 1024, layers: int = 1, variant: str = "",
             user: str | None = None, layer_seeds: Sequence[str] | None = None) -> str:
        """Push a generated image (see ``image.build_image``) and return its ref."""
        digest = self.registry.push_image(repo, tag, size=size, layers=layers, variant=variant, user=user,
                                          layer_seeds=layer_seeds)
        ref = f"{self.registry_address}/{repo}:{tag}"
        self.digests[ref] = digest
        return ref

    def push_many(self, images: Iterable[str], size: int = 1024, workers: int = 4) -> list[str]:
        """Push ``repo:tag`` images in parallel (the registry takes ~4x more pushes
        per second from 4 threads than from one); returns their refs, in order."""
        def push_one(image: str) -> str:
            repo, _, tag = image.rpartition(":")
            return self.push(repo, tag, size=size)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(push_one, images))

    def seed(self, images: Mapping[str, Iterable[str]], size: int = 1024) -> dict[str, list[str]]:
        """Push (once) and preload images on nodes through the CRI, as a kubelet pull would:
        ``{"node-1": ["bcm11/app:1", ...]}`` -> the full refs per node."""
        seeded = {name: [self.ref(image) for image in wanted] for name, wanted in images.items()}
        ours = f"{self.registry_address}/"
        missing = {ref for refs in seeded.values() for ref in refs if ref.startswith(ours) and ref not in self.digests}
        self.push_many(sorted(ref.removeprefix(ours) for ref in missing), size=size)

        def preload(name: str) -> None:
            node = self.node(name)
            for ref in seeded[name]:
                node.pull(ref, creds=":".join(self.registry.login) if self.registry.login else None)

        self._parallel([lambda name=name: preload(name) for name in seeded])  # type: ignore[misc]
        return seeded

    # -- imagesync configuration ------------------------------------------------------

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The imagesync configuration for this cluster, as a dict (see ``write_config``)."""
        runtime = overrides.pop("runtime", self.runtime)
        nodes_extra: Mapping[str, Mapping[str, Any]] = overrides.pop("nodes_extra", {})
        selected = overrides.pop("nodes", None)
        ssh_overrides: Mapping[str, Any] = overrides.pop("ssh", {})
        unknown = set(nodes_extra) - {n.name for n in self.nodes}
        if unknown:
            raise KeyError(f"nodes_extra names unknown nodes: {sorted(unknown)}")
        config: dict[str, Any] = {
            "prefixes": [f"{self.registry_address}/{p}" for p in DEFAULT_PREFIXES],
            "time_out": 60,
            "max_parallel": 4,
            "log_dir": str(self.log_dir),
            "redis_url": self.redis.url,
            "schedule": 3600,
        }
        _merge(config, overrides)
        config["ssh"] = _merge({
            "known_hosts": str(self.known_hosts),
            "host_key_policy": "reject",
            "connect_timeout": 5,
        }, ssh_overrides)
        config["nodes"] = []
        for node in self.nodes:
            if selected is not None and node.name not in selected:
                continue
            config["nodes"].append(_merge({
                "name": node.name,
                "host": node.ssh_host,
                "port": node.ssh_port,
                "user": node.ssh_user,
                "key_file": str(node.key_file),
                "runtime": runtime,
                # each node's containerd root, as an operator with a non-default root sets it
                "image_fs": str(node.workdir / "containerd" / "root"),
            }, nodes_extra.get(node.name, {})))
        return config

    def write_config(self, path: str | Path | None = None, **overrides: Any) -> Path:
        """Write an imagesync TOML configuration for this cluster and return its path.

        ``overrides`` replace top-level keys (``None`` removes one; new keys are
        added, a dict becomes a table); ``ssh={...}`` changes keys of [ssh];
        ``runtime="ctr"`` switches every node; ``nodes=["node-1", ...]`` keeps only
        those nodes; ``nodes_extra={"node-1": {...}}`` adds or replaces keys of one
        node. Default path: ``<workdir>/imagesync.toml``.
        """
        target = Path(path) if path else self.workdir / "imagesync.toml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(toml_dumps(self.config(**overrides)))
        return target


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


# -- a small TOML writer (the standard library only reads TOML) -------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def toml_dumps(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for ``data``: plain keys first, then [tables], then [[arrays of tables]]."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items()
             if not isinstance(v, Mapping) and not _is_table_array(v)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in data.items():
        name = f"{prefix}{_toml_key(key)}"
        if isinstance(value, Mapping):
            out += f"\n[{name}]\n" + toml_dumps(value, name + ".")
        elif _is_table_array(value):
            for item in value:
                out += f"\n[[{name}]]\n" + toml_dumps(item, name + ".")
    return out

