"""deploy/systemd/ and deploy/install.sh, uninstall.sh: the units an operator enables.

systemd is not PID 1 where these tests run, so no unit is started by systemd:
every unit passes ``systemd-analyze verify``, and each unit's command lines are
run as written (ExecStartPre, ExecStart, with its Environment= and
EnvironmentFile=) against the real test cluster, from a venv that
deploy/install.sh made under a temporary root (DESTDIR), the unit's paths
moved under that root.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import measured, wait_for

from testcluster.process import ServerProcess, free_port, port_open, tail

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = sorted(p.name for p in (DEPLOY / "systemd").glob("*.service"))
WORKERS = ("imagesync-control.service", "imagesync-nodes.service", "imagesync-worker@.service")
#: the paths the units name, which a DESTDIR install puts under its root
PATHS = ("/opt/imagesync", "/etc/imagesync", "/var/log/imagesync")
#: what systemd gives a service of User=root, besides the unit's own variables
SYSTEMD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": os.path.expanduser("~"), "LANG": "C.UTF-8"}


def parse_unit(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value, in order (continuation lines are not used by these units)."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def unit(name: str) -> dict[str, list[str]]:
    return parse_unit((DEPLOY / "systemd" / name).read_text())


def staged(text: str, root: Path, own: Path | None = None) -> str:
    """The unit's paths moved under ``root``; the configuration's and the logs' under ``own``
    instead when given: a test's own, so that the installed tree stays as install.sh left it."""
    for path in PATHS:
        text = text.replace(path, f"{own if own is not None and path != '/opt/imagesync' else root}{path}")
    return text


def expand(word: str, env: dict[str, str]) -> str:
    """systemd's expansion of a command line word: ${VAR} and $VAR from the environment, $$ a literal $."""
    return re.sub(r"\$\$|\$\{(\w+)\}|\$(\w+)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1) or m.group(2), ""), word)


def environment_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip('"')
    return env


def service_env(values: dict[str, list[str]]) -> dict[str, str]:
    """The environment systemd would give the unit: its Environment=, then its EnvironmentFile=."""
    env = dict(SYSTEMD_ENV)
    for assignment in values.get("Service.Environment", []):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            env[key] = value
    for path in values.get("Service.EnvironmentFile", []):
        optional = path.startswith("-")
        path = Path(path.lstrip("-"))
        if path.exists():
            env.update(environment_file(path))
        else:
            assert optional, f"EnvironmentFile {path} is missing"
    return env


def command(values: dict[str, list[str]], key: str, env: dict[str, str], instance: str = "") -> list[str]:
    (line,) = values[f"Service.{key}"]
    return [expand(word.replace("%i", instance), env) for word in shlex.split(line)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """deploy/install.sh with DESTDIR: the whole install under a temporary root."""
    root = tmp_path_factory.mktemp("install") / "root"
    began = time.monotonic()
    result = subprocess.run([str(DEPLOY / "install.sh")], env={**os.environ, "DESTDIR": str(root)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"install.sh took {time.monotonic() - began:.1f} s")
    return root, result.stdout


@pytest.fixture(scope="module")
def systemd_analyze():
    if shutil.which("systemd-analyze") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "systemd"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("systemd-analyze")


# -- the unit files ---------------------------------------------------------------------


def test_the_six_units():
    assert UNITS == ["imagesync-beat.service", "imagesync-control.service", "imagesync-flower.service",
                     "imagesync-nodes.service", "imagesync-webhook.service", "imagesync-worker@.service"]


@pytest.mark.parametrize("name", UNITS)
def test_unit_restarts_reads_secrets_and_is_hardened(name):
    values = unit(name)
    assert values["Service.Restart"] == ["on-failure"]
    assert values["Service.EnvironmentFile"] == ["-/etc/imagesync/imagesync.env"]
    assert values["Service.Environment"] == ["IMAGESYNC_CONFIG=/etc/imagesync/imagesync.toml"]
    assert values["Service.NoNewPrivileges"] == ["yes"]
    assert values["Service.ProtectSystem"] == ["strict"]
    assert values["Service.PrivateTmp"] == ["yes"]
    assert "/var/log/imagesync" in values["Service.ReadWritePaths"]  # logs, and beat's schedule file
    assert "Service.ProtectHome" not in values, "root's ~/.ssh holds the key and known_hosts"
    assert values["Install.WantedBy"] == ["multi-user.target"]
    (exec_start,) = values["Service.ExecStart"]
    assert exec_start.startswith("/opt/imagesync/venv/bin/")


@pytest.mark.parametrize("name", UNITS)
def test_stop_timeout_outlasts_a_pull(name):
    from imagesync.budgets import pull_time_limits
    from imagesync.config import load_settings

    settings = load_settings(ROOT / "imagesync.sample.toml", environ={})
    assert settings.time_out == 1800
    _, hard = pull_time_limits(settings)
    (timeout,) = unit(name)["Service.TimeoutStopSec"]
    assert int(timeout) >= hard + 60, (timeout, hard)


@pytest.mark.parametrize("name", WORKERS)
def test_workers_get_a_warm_shutdown(name):
    # SIGTERM to celery's main process only: the pool's processes finish their pulls
    assert unit(name)["Service.KillMode"] == ["mixed"]


def test_worker_instance_is_the_node():
    (exec_start,) = unit("imagesync-worker@.service")["Service.ExecStart"]
    assert exec_start == "/opt/imagesync/venv/bin/imagesync worker --node %i"  # %i: "-" stays "-"


def test_the_worker_of_all_ssh_nodes_has_room_for_a_thread_and_a_connection_per_pull():
    values = unit("imagesync-nodes.service")
    assert values["Service.ExecStart"] == ["/opt/imagesync/venv/bin/imagesync worker --all-nodes"]
    assert values["Service.TasksMax"] == ["infinity"] and int(values["Service.LimitNOFILE"][0]) >= 65536


def test_past_a_handful_of_ssh_nodes_one_worker_serves_them_all(installed, tmp_path):
    # README: one worker per node for a few nodes; past 4 SSH nodes, imagesync-nodes for all of them
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", installed[0], root], check=True)
    config = root / "etc/imagesync/imagesync.toml"
    sample = config.read_text()
    more = "".join(f'\n[[nodes]]\nname = "gpu-{i}"\nhost = "10.0.0.{i}"\n' for i in range(4))
    wants = root / "etc/systemd/system/multi-user.target.wants"

    def install(text):
        config.write_text(text)
        result = subprocess.run([str(DEPLOY / "install.sh")], env={**os.environ, "DESTDIR": str(root)},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return sorted(p.name for p in wants.iterdir() if p.name.startswith("imagesync-")), result.stdout

    enabled, output = install(sample + more)  # 6 SSH nodes
    assert enabled == ["imagesync-beat.service", "imagesync-control.service", "imagesync-flower.service",
                       "imagesync-nodes.service"]
    assert "no longer configured: imagesync-worker@k8s-worker1.service imagesync-worker@k8s-worker2.service" \
        in output
    enabled, output = install(sample)  # back to 2: one worker each again
    assert enabled == ["imagesync-beat.service", "imagesync-control.service", "imagesync-flower.service",
                       "imagesync-worker@k8s-worker1.service", "imagesync-worker@k8s-worker2.service"]
    assert "no longer configured: imagesync-nodes.service" in output


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_systemd_analyze_verify(name, installed, systemd_analyze, tmp_path):
    root, _ = installed
    (tmp_path / name).write_text(staged((DEPLOY / "systemd" / name).read_text(), root))
    target = tmp_path / name.replace("@.", "@node-1.")
    result = subprocess.run([systemd_analyze, "verify", "--man=no", str(target)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


# -- install.sh, uninstall.sh -------------------------------------------------------------


def tree(root: Path) -> set[str]:
    """Every path under root, the venv's contents left out."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if "venv/" not in str(p.relative_to(root))}


ENABLED = ["imagesync-beat.service", "imagesync-control.service", "imagesync-flower.service",
           "imagesync-worker@k8s-worker1.service", "imagesync-worker@k8s-worker2.service"]  # the sample's nodes
KEPT = {"etc", "etc/imagesync", "etc/imagesync/imagesync.toml", "etc/imagesync/imagesync.sample.toml",
        "etc/imagesync/imagesync.env", "etc/systemd", "etc/systemd/system", "opt", "var", "var/log",
        "var/log/imagesync"}


def test_install_lays_out_venv_config_logs_and_enabled_units(installed):
    root, output = installed
    wants = "etc/systemd/system/multi-user.target.wants"
    assert tree(root) == KEPT | {"opt/imagesync", "opt/imagesync/venv", wants} \
        | {f"etc/systemd/system/{name}" for name in UNITS} | {f"{wants}/{name}" for name in ENABLED}
    for name in ENABLED:  # systemd's own enablement symlinks, to the unit (the template for a worker)
        template = re.sub(r"@.*\.", "@.", name)
        assert os.readlink(root / wants / name) == f"/etc/systemd/system/{template}"
    venv = root / "opt/imagesync/venv/bin"
    assert subprocess.run([venv / "imagesync", "--version"], capture_output=True).returncode == 0
    assert (venv / "celery").exists()
    assert (root / "etc/imagesync/imagesync.toml").read_text() == (ROOT / "imagesync.sample.toml").read_text()
    env = root / "etc/imagesync/imagesync.env"
    assert env.stat().st_mode & 0o777 == 0o600
    assert re.search(r"^FLOWER_BASIC_AUTH=admin:\S{16,}$", env.read_text(), re.M)
    for name in UNITS:
        assert (root / "etc/systemd/system" / name).read_text() == (DEPLOY / "systemd" / name).read_text()
    assert "systemd is not asked to do anything" in output


def _copy(root: Path, target: Path) -> Path:
    """The installed tree without the venv's contents (uninstall only removes it)."""
    shutil.copytree(root, target, symlinks=True,
                    ignore=lambda folder, names: names if folder.endswith("/venv") else [])
    return target


@pytest.mark.parametrize("purge", [False, True], ids=["keep", "purge"])
def test_uninstall_leaves_config_and_logs_unless_purge(installed, tmp_path, purge):
    root = _copy(installed[0], tmp_path / "root")
    (root / "var/log/imagesync/2026-01-01").mkdir()
    result = subprocess.run([str(DEPLOY / "uninstall.sh"), *(["--purge"] if purge else [])],
                            env={**os.environ, "DESTDIR": str(root)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    if purge:
        assert tree(root) == {"etc", "etc/systemd", "etc/systemd/system", "opt", "var", "var/log"}
    else:
        assert tree(root) == KEPT | {"var/log/imagesync/2026-01-01"}


def test_uninstall_refuses_unknown_arguments(tmp_path):
    result = subprocess.run([str(DEPLOY / "uninstall.sh"), "--purg"], env={**os.environ, "DESTDIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "--purge" in result.stderr


# -- the units' commands, run as written, on the real cluster ------------------------------


class UnitProcess:
    """A unit's ExecStart run as systemd would: its environment, its own process group."""

    def __init__(self, name: str, root: Path, own: Path, workdir: Path, instance: str = "") -> None:
        self.values = parse_unit(staged((DEPLOY / "systemd" / name).read_text(), root, own))
        self.env = service_env(self.values)
        self.label = name.replace("@.", f"@{instance}.")
        self.process = ServerProcess(self.label, command(self.values, "ExecStart", self.env, instance),
                                     workdir / f"{self.label}.log", env=self.env)

    def pre(self) -> subprocess.CompletedProcess:
        return subprocess.run(command(self.values, "ExecStartPre", self.env), env=self.env,
                              capture_output=True, text=True, timeout=30)

    def start(self) -> UnitProcess:
        self.process.start()
        return self

    def wait_log(self, text: str, timeout: float = 60) -> None:
        self.process.wait_ready(lambda: text in self.process.log_path.read_text(errors="replace"), timeout)

    def stop(self) -> None:
        pid = self.process.pid
        self.process.stop(timeout=20)  # SIGTERM to the main process, as KillMode=mixed
        try:
            os.killpg(pid, signal.SIGKILL) if pid else None
        except ProcessLookupError:
            pass


def _get(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.cluster
@pytest.mark.parametrize("workers", ["one per node", "one for all nodes"])
def test_unit_commands_serve_the_cluster(installed, deploy, tmp_path, workers):
    root, _ = installed
    own = tmp_path / "own"  # this test's /etc/imagesync and /var/log/imagesync
    (own / "etc/imagesync").mkdir(parents=True)
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/app:1"], "node-2": ["nvidia/cuda:12"]})
    config = own / "etc/imagesync/imagesync.toml"
    log_dir = own / "var/log/imagesync"
    log_dir.mkdir(parents=True)
    d.cluster.write_config(config, log_dir=str(log_dir))
    port = free_port()
    (own / "etc/imagesync/imagesync.env").write_text(
        f"FLOWER_BASIC_AUTH=ops:s3cret\nFLOWER_PORT={port}\nFLOWER_ADDRESS=127.0.0.1\n")
    workdir = tmp_path / "units"
    workdir.mkdir()
    if workers == "one per node":
        pull_workers = [UnitProcess("imagesync-worker@.service", root, own, workdir, "node-1"),
                        UnitProcess("imagesync-worker@.service", root, own, workdir, "node-2")]
    else:
        pull_workers = [UnitProcess("imagesync-nodes.service", root, own, workdir)]
    units = [UnitProcess("imagesync-control.service", root, own, workdir), *pull_workers,
             UnitProcess("imagesync-beat.service", root, own, workdir),
             UnitProcess("imagesync-flower.service", root, own, workdir)]
    flower = units[-1]
    refused = subprocess.run(command(flower.values, "ExecStartPre", {**flower.env, "FLOWER_BASIC_AUTH": ""}),
                             env={**flower.env, "FLOWER_BASIC_AUTH": ""}, capture_output=True, text=True)
    assert refused.returncode == 1 and "FLOWER_BASIC_AUTH" in refused.stderr
    assert flower.pre().returncode == 0
    try:
        for process in units:
            assert process.env["IMAGESYNC_CONFIG"] == str(config)
            process.start()
        for process in units[:-2]:
            process.wait_log("ready.")
        units[-2].wait_log("beat: Starting...")
        flower.process.wait_ready(lambda: port_open(port), 60)

        result = subprocess.run([root / "opt/imagesync/venv/bin/imagesync", "sync", "--wait"],
                                env={**SYSTEMD_ENV, "IMAGESYNC_CONFIG": str(config)},
                                capture_output=True, text=True, timeout=180)
        logs = "\n".join(f"--- {u.label}\n{tail(u.process.log_path, 40)}" for u in units)
        assert result.returncode == 0, result.stdout + result.stderr + logs
        for node in ("node-1", "node-2"):
            assert {d.cluster.ref("bcm11/app:1"), d.cluster.ref("nvidia/cuda:12")} <= set(d.held(node))
        assert list(log_dir.glob("20*/success_images.log"))
        assert list(log_dir.glob("beat-schedule*")), "beat writes its schedule file into log_dir"
        assert _get(f"http://127.0.0.1:{port}/") == 401
        assert _get(f"http://127.0.0.1:{port}/", "ops:s3cret") == 200
    finally:
        for process in units:
            process.stop()


# -- two beats at once --------------------------------------------------------------------


@pytest.mark.cluster
def test_two_beats_never_overlap_runs(deploy, tmp_path):
    """Two beats (say one per head node) on one Redis: every extra trigger is answered
    "already running" while a run holds the lock; runs never overlap."""
    d = deploy(nodes=2)
    d.cluster.seed({"node-1": ["bcm11/app:1", "bcm11/lib:1"]})
    d.configure(schedule=10)
    d.start()
    d.cluster.proxy.delay(3.0)  # every registry request: a run lasts longer than a tick
    env = {**os.environ, "IMAGESYNC_CONFIG": str(d.config_path)}
    beats = []
    for name in ("beat-a", "beat-b"):
        folder = tmp_path / name
        folder.mkdir()
        argv = [sys.executable, "-m", "imagesync.cli", "beat", "--",
                "-s", str(folder / "beat-schedule"), "--pidfile", str(folder / "beat.pid")]
        beats.append(ServerProcess(name, argv, folder / "beat.log", env=env))

    def sent() -> list[int]:
        return [beat.log_path.read_text(errors="replace").count("Sending due task sync") for beat in beats]

    try:
        for beat in beats:
            beat.start()
        # both beats triggered, each every 10 s, and a trigger found the lock taken
        wait_for(lambda: min(sent()) >= 2 and "'status': 'already-running'" in d.services.log("control"),
                 120, "two triggers of each beat, one answered already-running")
    finally:
        for beat in beats:
            beat.stop()
    d.cluster.proxy.passthrough()
    wait_for(lambda: d.history() and not any(run["status"] == "running" for run in d.history()), 120,
             "the end of the beats' runs")
    runs = sorted(d.history(), key=lambda run: run["started"])
    triggers = sent()
    control = d.services.log("control")
    assert runs, control
    # the records are what `imagesync history --json` prints: every run a beat's, completed,
    # and node-2 got node-1's two images once
    assert {(run["trigger"], run["status"]) for run in runs} == {("beat", "completed")}, runs
    assert runs[0]["expected"] == 2 and runs[0]["expected_per_node"] == {"node-2": 2}, runs[0]
    assert sum(run["counts"].get("pulled", 0) for run in runs) == 2, runs
    assert not any(set(run["counts"]) - {"pulled", "present"} for run in runs), runs
    assert {d.cluster.ref("bcm11/app:1"), d.cluster.ref("bcm11/lib:1")} <= set(d.held("node-2"))
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier["finished"] is not None and earlier["finished"] <= later["started"], runs
    # never more runs than triggers, and some triggers found the lock taken (how many
    # depends on how the two beats' ticks fall against the runs: not asserted)
    measured("triggers sent, runs started", (sum(triggers), len(runs)))
    assert len(runs) < sum(triggers)


def test_install_again_where_systemd_is_not_pid_1_keeps_the_config_and_follows_the_nodes(
        installed, systemd_analyze, tmp_path):
    """README: run again (an upgrade, or other nodes), install.sh keeps the configuration and the
    workers follow it; where systemd is not PID 1 it enables the units offline (symlinks) and
    says that it skipped daemon-reload and start. As root and without DESTDIR, as an operator
    runs it, in a mount namespace whose /etc, /opt and /var/log are overlays holding what the
    first install left: what it writes lands in this test's folders, never in the machine's."""
    assert not Path("/run/systemd/system").is_dir(), "systemd runs here: this is not the case tested"
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs root and a mount namespace (unshare -m)")
    first = installed[0]
    layers = {top: tmp_path / "upper" / top.strip("/") for top in ("/etc", "/opt", "/var/log")}
    etc = layers["/etc"]
    for top, upper in layers.items():
        (tmp_path / "work" / top.strip("/")).mkdir(parents=True)
        upper.parent.mkdir(parents=True, exist_ok=True)
        # the venv too: pip, run again, writes /opt/imagesync/venv into its scripts
        subprocess.run(["cp", "-a", first / top.strip("/"), upper], check=True)
    config = etc / "imagesync/imagesync.toml"
    config.write_text((ROOT / "imagesync.sample.toml").read_text().replace('"k8s-worker2"', '"gpu-node.7"'))
    before = config.read_text()

    mounts = " && ".join(f"mount -t overlay overlay -o lowerdir={top},upperdir={upper},"
                         f"workdir={tmp_path / 'work' / top.strip('/')} {top}" for top, upper in layers.items())
    env = {key: value for key, value in os.environ.items() if key != "DESTDIR"}
    result = subprocess.run(["unshare", "-m", "sh", "-c", f'{mounts} && exec "$0"', str(DEPLOY / "install.sh")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    pid_1 = subprocess.run(["ps", "-o", "comm=", "-p", "1"], capture_output=True, text=True).stdout.strip()
    assert (f"install.sh: systemd is not running (PID 1 is {pid_1}): enabling the units offline, as symlinks; "
            "not starting anything") in result.stdout
    assert "install.sh: skipped: systemctl daemon-reload and start (once systemd runs: systemctl start " \
        in result.stdout
    assert "no longer configured: imagesync-worker@k8s-worker2.service" in result.stdout
    assert config.read_text() == before
    wants = etc / "systemd/system/multi-user.target.wants"
    enabled = sorted(p.name for p in wants.iterdir() if p.name.startswith("imagesync-"))
    assert enabled == ["imagesync-beat.service", "imagesync-control.service", "imagesync-flower.service",
                       "imagesync-worker@gpu-node.7.service", "imagesync-worker@k8s-worker1.service"]
    for name in enabled:  # systemd's own enablement symlinks, to the installed unit
        assert os.readlink(wants / name) == f"/etc/systemd/system/{re.sub(r'@.*[.]', '@.', name)}"
    assert not Path("/etc/imagesync").exists() and not Path("/opt/imagesync").exists()
