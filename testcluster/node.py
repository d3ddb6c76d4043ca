"""One worker node of the test cluster: a real containerd and a real sshd, on loopback.

Everything lives under the node's workdir::

    containerd/config.toml, root/, state/, log     containerd (CRI on, snapshotter native)
    containerd.sock                                 its socket (a symlink to /tmp/isync-*/
                                                    when this path would pass the 107-byte
                                                    limit of socket paths; ``socket`` then
                                                    names the short path)
    certs.d/<host:port>/hosts.toml                  each registry is plain HTTP
    ssh/sshd_config, ssh_host_ed25519_key, log      sshd on its own port and host key
    ssh/peers_config, ssh/peers_known_hosts         the node's own ssh client, towards the
                                                    other nodes (see trust_peers)
    bin/ssh                                         ssh with that client config (-F)
    bin/crictl                                      the crictl-compatible client
    home/                                           $HOME of SSH sessions (see below)
    pulls.log                                       crictl's CRICTL_PULL_LOG

sshd's ``SetEnv`` gives every SSH session this node's runtime with default flags
(``CONTAINERD_ADDRESS``, ``CONTAINER_RUNTIME_ENDPOINT``, ``PATH`` with bin/
first), so ``ssh -p PORT root@127.0.0.1 crictl images -o json`` or ``ctr images
ls`` see this node and no other. Sessions log in as root, as on real nodes;
``HOME`` points at home/ because bash sources ~/.bashrc for SSH commands, and
a root .bashrc that initialises a Python version manager can make each command
cost ~100 ms instead of ~45 ms (the same as a test user with /bin/sh, which
could not run crictl when its Python lives under /root, mode 0700).

Nodes that trust each other over SSH, as on HPC clusters (:meth:`Node.trust_peers`):
each sshd also accepts a key the nodes share, and each node's ``ssh`` (bin/ssh, first
on the sessions' PATH) uses that key and a known_hosts file of the peers' host keys,
with StrictHostKeyChecking yes. ``ssh`` reads no ``~/.ssh`` of its own here: every
node logs in as the same root of this machine, whose home is the real one.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import crictl
from .process import ClusterError, ProcessInfo, ServerProcess, find_processes, free_port, retry_if_port_taken

CRICTL_SOURCE = Path(crictl.__file__).resolve()
# sockaddr_un.sun_path is 108 bytes with the NUL; containerd also adds ".ttrpc"
_MAX_SOCKET_PATH = 100
_DISABLED_PLUGINS = [
    # only the native snapshotter works without kernel support here
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.zfs",
    # nothing to export traces to
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]


@dataclass(frozen=True)
class PullRecord:
    """One ``crictl pull`` run on the node, from its pull log."""

    ref: str
    pid: int
    start: float  # wall clock (time.time())
    end: float | None  # None while it runs (or if it was SIGKILLed)
    outcome: str  # ok | error | killed | "" while running


def _check_path(path: Path) -> None:
    # sshd's SetEnv and containerd's TOML take these paths unquoted
    if any(c.isspace() or c in "\"'\\" for c in str(path)):
        raise ClusterError(f"the node workdir must not contain spaces or quotes: {path}")


def generate_key(path: Path, comment: str) -> Path:
    """An ed25519 key pair without passphrase at ``path`` and ``path.pub``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


class Node:
    """A worker node: containerd + sshd under ``workdir``, pulling from ``registries``."""

    ssh_host = "127.0.0.1"
    ssh_user = "root"

    def __init__(self, name: str, workdir: str | Path, registries: Sequence[str] = (),
                 key_file: str | Path | None = None, ssh_port: int | None = None,
                 peer_key: str | Path | None = None) -> None:
        self.name = name
        self.workdir = Path(workdir).absolute()
        _check_path(self.workdir)
        self.registries = list(registries)
        self.ssh_port = ssh_port or free_port()
        # known_hosts entries name the port: it may move only before the first start
        self._port_fixed = ssh_port is not None
        self.key_file = Path(key_file).absolute() if key_file else self.workdir / "ssh" / "id_ed25519"
        #: the key the nodes share to reach each other (None: no peer trusts another)
        self.peer_key = Path(peer_key).absolute() if peer_key else None
        self.bin_dir = self.workdir / "bin"
        self.pull_log = self.workdir / "pulls.log"
        self.socket = self._socket_path()
        self._containerd: ServerProcess | None = None
        self._sshd: ServerProcess | None = None

    # -- paths -----------------------------------------------------------------------

    def _socket_path(self) -> str:
        """The containerd socket (what CONTAINERD_ADDRESS names on this node): in the
        workdir if its path fits a socket address, else in a short /tmp directory
        named after the workdir (a symlink in the workdir points there)."""
        path = self.workdir / "containerd.sock"
        if len(str(path)) + len(".ttrpc") <= _MAX_SOCKET_PATH:
            return str(path)
        tag = hashlib.sha256(str(self.workdir).encode()).hexdigest()[:12]
        return f"/tmp/isync-{self.name}-{tag}/containerd.sock"

    @property
    def host_key(self) -> Path:
        return self.workdir / "ssh" / "ssh_host_ed25519_key"

    @property
    def environment(self) -> dict[str, str]:
        """What an SSH session on this node sees (sshd SetEnv)."""
        return {
            "CONTAINERD_ADDRESS": self.socket,
            "CONTAINERD_NAMESPACE": "k8s.io",
            "CONTAINERD_SNAPSHOTTER": "native",
            "CONTAINER_RUNTIME_ENDPOINT": f"unix://{self.socket}",
            "IMAGE_SERVICE_ENDPOINT": f"unix://{self.socket}",
            "CRICTL_PULL_LOG": str(self.pull_log),
            "HOME": str(self.workdir / "home"),
            "PATH": f"{self.bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        }

    def known_hosts_line(self) -> str:
        """``[127.0.0.1]:PORT ssh-ed25519 AAAA...`` for a known_hosts file."""
        keytype, key = (self.host_key.with_suffix(".pub").read_text().split() + ["", ""])[:2]
        return f"[{self.ssh_host}]:{self.ssh_port} {keytype} {key}"

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Node:
        try:
            self._prepare()
            self.start_containerd()
            self.start_sshd()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _prepare(self) -> None:
        for sub in ("containerd", "ssh", "bin", "home", "certs.d"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        if not self.key_file.exists():
            generate_key(self.key_file, f"imagesync-test@{self.name}")
        if not self.host_key.exists():
            generate_key(self.host_key, self.name)
        self._write_hosts_dirs()
        self._write_crictl()

    def _write_hosts_dirs(self) -> None:
        for address in self.registries:
            hosts = self.workdir / "certs.d" / address / "hosts.toml"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text(
                f'server = "http://{address}"\n\n'
                f'[host."http://{address}"]\n'
                '  capabilities = ["pull", "resolve"]\n'
            )

    def _write_crictl(self) -> None:
        # Runs crictl.py by path: importing the testcluster package would load
        # whatever its __init__ imports (the whole cluster) on every SSH command.
        wrapper = self.bin_dir / "crictl"
        wrapper.write_text(
            f"#!{sys.executable}\n"
            "import runpy\n"
            f"runpy.run_path({str(CRICTL_SOURCE)!r}, run_name='__main__')\n"
        )
        wrapper.chmod(0o755)

    def _containerd_config(self, socket: str) -> Path:
        d = self.workdir
        plugins = ", ".join(f'"{p}"' for p in _DISABLED_PLUGINS)
        config = d / "containerd" / "config.toml"
        config.write_text(f"""version = 2
root = "{d / 'containerd' / 'root'}"
state = "{d / 'containerd' / 'state'}"
disabled_plugins = [{plugins}]

[grpc]
  address = "{socket}"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d / 'containerd' / 'opt'}"
  [plugins."io.containerd.grpc.v1.cri"]
    disable_cgroup = true
    disable_apparmor = true
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "native"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{d / 'containerd' / 'cni' / 'bin'}"
      conf_dir = "{d / 'containerd' / 'cni' / 'net.d'}"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{d / 'certs.d'}"
""")
        return config

    def start_containerd(self, timeout: float = 20.0) -> None:
        if self._containerd and self._containerd.running:
            return
        link = self.workdir / "containerd.sock"
        if str(link) != self.socket:
            Path(self.socket).parent.mkdir(mode=0o700, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(self.socket)
        config = self._containerd_config(self.socket)
        self._containerd = ServerProcess(f"containerd of {self.name}", ["containerd", "--config", str(config)],
                                         self.workdir / "containerd" / "log")
        self._containerd.start()

        def cri_ready() -> bool:
            with crictl.ImageClient(self.socket, timeout=1) as client:
                client.list()
            return True

        self._containerd.wait_ready(cri_ready, timeout)

    def stop_containerd(self) -> None:
        if self._containerd:
            self._containerd.stop()

    def _sshd_config(self) -> Path:
        ssh = self.workdir / "ssh"
        authorized = ssh / "authorized_keys"
        keys = [self.key_file] + ([self.peer_key] if self.peer_key else [])
        authorized.write_text("".join(key.with_name(key.name + ".pub").read_text() for key in keys))
        env = " ".join(f"{k}={v}" for k, v in self.environment.items())
        config = ssh / "sshd_config"
        config.write_text(f"""Port {self.ssh_port}
ListenAddress {self.ssh_host}
HostKey {self.host_key}
PidFile {ssh / 'sshd.pid'}
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# the workdir may sit under /tmp, which StrictModes refuses for authorized_keys
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
# parallel pulls open many connections and channels at once
MaxStartups 200
MaxSessions 100
Subsystem sftp internal-sftp
SetEnv {env}
""")
        return config

    def start_sshd(self, timeout: float = 10.0) -> None:
        if self._sshd and self._sshd.running:
            return
        # sshd refuses to start without its privilege separation directory
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        if self._port_fixed:
            self._launch_sshd(timeout)
        else:
            retry_if_port_taken(lambda: self._launch_sshd(timeout), self._move_sshd)
            self._port_fixed = True

    def _move_sshd(self) -> None:
        self.ssh_port = free_port()

    def _launch_sshd(self, timeout: float) -> None:
        config = self._sshd_config()
        log = self.workdir / "ssh" / "log"
        seen = log.stat().st_size if log.exists() else 0
        listening = f"Server listening on {self.ssh_host} port {self.ssh_port}.".encode()

        def ready() -> bool:
            # its own log line, not just an open port: another process may hold the port
            with open(log, "rb") as f:
                f.seek(seen)
                return listening in f.read()

        self._sshd = ServerProcess(f"sshd of {self.name}",
                                   [shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/sshd",
                                    "-D", "-f", str(config), "-E", str(log)],
                                   log)
        self._sshd.start()
        self._sshd.wait_ready(ready, timeout)

    def trust_peers(self, peers: Sequence[Node]) -> None:
        """Let this node's own ``ssh`` reach ``peers`` with the shared key, knowing their host keys
        (each peer's sshd must accept the key: same ``peer_key``). Call it again after a peer's
        host key or port changed."""
        if self.peer_key is None:
            raise ClusterError(f"{self.name} has no peer key: give the nodes a peer_key")
        ssh = self.workdir / "ssh"
        known = ssh / "peers_known_hosts"
        known.write_text("".join(peer.known_hosts_line() + "\n" for peer in peers if peer is not self))
        config = ssh / "peers_config"
        config.write_text(f"""Host *
  IdentityFile {self.peer_key}
  IdentitiesOnly yes
  UserKnownHostsFile {known}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  LogLevel ERROR
""")
        wrapper = self.bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {config} "$@"\n')
        wrapper.chmod(0o755)

    def stop_sshd(self) -> None:
        """Stop accepting SSH connections (sessions already open keep running)."""
        if self._sshd:
            self._sshd.stop()

    def regenerate_host_key(self) -> None:
        """Give sshd a new host key, so known_hosts entries for this node no longer match."""
        generate_key(self.host_key, self.name)
        if self._sshd and self._sshd.running:
            self.stop_sshd()
            self.start_sshd()

    def stop(self) -> None:
        """Stop sshd, end what SSH sessions left running, stop containerd."""
        self.stop_sshd()
        self.kill_session_processes()
        self.stop_containerd()
        if str(self.workdir / "containerd.sock") != self.socket:
            shutil.rmtree(Path(self.socket).parent, ignore_errors=True)

    @property
    def pids(self) -> dict[str, int]:
        """Pids of the node's servers that are running."""
        procs = {"containerd": self._containerd, "sshd": self._sshd}
        return {k: p.pid for k, p in procs.items() if p is not None and p.running and p.pid is not None}

    # -- inspection ------------------------------------------------------------------

    def processes(self, pattern: str = ".") -> list[ProcessInfo]:
        """Live processes started through this node's sshd whose command line matches
        ``pattern`` (a regex): e.g. ``processes("crictl pull")`` proves no pull is left."""
        return find_processes(pattern, environ_contains=f"CONTAINERD_ADDRESS={self.socket}")

    def kill_session_processes(self) -> None:
        """SIGKILL what SSH sessions on this node still run (their sshd handlers then exit)."""
        for proc in self.processes():
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def images(self) -> dict[str, str]:
        """Every image reference containerd holds in k8s.io -> its manifest digest.

        Tag refs (``host/repo:tag``) and digest refs (``host/repo@sha256:...``) both,
        but not the ``sha256:<id>`` names CRI adds. Asked with ``ctr images ls``
        rather than the CRI, because an image pulled with ``ctr`` has no repoDigests
        in the CRI's answer.
        """
        out = self.run(["ctr", "-a", self.socket, "-n", "k8s.io", "images", "ls"]).stdout
        refs = {}
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and not fields[0].startswith("sha256:"):
                refs[fields[0]] = fields[2]
        return refs

    def image_client(self, timeout: float = 10.0) -> crictl.ImageClient:
        return crictl.ImageClient(self.socket, timeout)

    def pull(self, ref: str, timeout: float = 120.0, creds: str | None = None) -> str:
        """Pull ``ref`` through the CRI, as the kubelet would; returns the image id.

        ``creds`` (``USER:PASSWORD``) is for a registry that demands a login.
        """
        with self.image_client() as client:
            return client.pull(ref, timeout=timeout, creds=creds)

    def remove(self, ref: str) -> None:
        """Remove the image ``ref`` names (every tag of it) through the CRI."""
        with self.image_client() as client:
            client.remove(ref)

    def run(self, argv: Sequence[str] | str, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a command locally with the environment an SSH session on this node gets."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        env = {**os.environ, **self.environment}
        result = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"{self.name}: {shlex.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def ssh_argv(self, command: str, known_hosts: str | Path | None = None, strict: bool = True) -> list[str]:
        """An ``ssh`` command line that runs ``command`` on this node."""
        argv = ["ssh", "-p", str(self.ssh_port), "-i", str(self.key_file),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5",
                "-o", "LogLevel=ERROR"]
        if known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                     "-o", f"StrictHostKeyChecking={'yes' if strict else 'no'}"]
        return argv + [f"{self.ssh_user}@{self.ssh_host}", command]

    def pulls(self) -> list[PullRecord]:
        """The crictl pulls run on this node so far (from its pull log), oldest first."""
        records: list[PullRecord] = []
        running: dict[tuple[int, str], int] = {}  # (pid, ref) -> index in records
        for event, when, ref, pid, outcome in crictl.iter_pull_log(str(self.pull_log)):
            if event == "start":
                running[(pid, ref)] = len(records)
                records.append(PullRecord(ref, pid, when, None, ""))
            elif event == "end" and (pid, ref) in running:
                i = running.pop((pid, ref))
                records[i] = PullRecord(ref, pid, records[i].start, when, outcome)
        return records
