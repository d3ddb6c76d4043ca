"""The deployment files: docker-compose.yml, the Dockerfiles, their entrypoints.

No Docker engine runs here, so the compose file is parsed and checked for what
matters to imagesync, and the entrypoints are run as plain shell scripts with
a fake PATH, so that nothing real is started.

PyYAML is not an imagesync dependency; these tests use it where it is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict = COMPOSE["services"]
ENTRYPOINTS = [ROOT / "workers" / "entrypoint.sh"]
WORKER, = ENTRYPOINTS
DOCKERFILES = [ROOT / "workers" / "Dockerfile", ROOT / "beat" / "Dockerfile"]
CONFIG = "/etc/imagesync/imagesync.toml"
REDIS_URL = "redis://redis:6379/0"
# What `cp imagesync.sample.toml imagesync.toml` gives: the nodes compose must serve.
NODES = [node["name"] for node in tomllib.loads((ROOT / "imagesync.sample.toml").read_text())["nodes"]]
IMAGESYNC = {name: s for name, s in SERVICES.items() if name != "redis"}
#: started on a node (a profile of its own), reaching the head node's Redis
AGENT = SERVICES["agent"]
ON_THE_HEAD_NODE = {name: s for name, s in IMAGESYNC.items() if name != "agent"}
WORKERS = {name: s for name, s in SERVICES.items() if name.startswith("worker-")}


def env(service: dict) -> dict[str, str]:
    value = service.get("environment") or {}
    if isinstance(value, list):
        value = dict(item.split("=", 1) for item in value)
    return {key: str(val) for key, val in value.items()}


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of the short-syntax volumes."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        found[target] = (source, mode[0] if mode else "rw")
    return found


def argv(service: dict) -> list[str]:
    words: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        words += shlex.split(value) if isinstance(value, str) else value
    return words


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unreadable duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- docker-compose.yml --------------------------------------------------------


def test_redis_keeps_its_data_and_never_evicts():
    redis = SERVICES["redis"]
    command = " ".join(argv(redis))
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "/data" in mounts(redis)
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_one_worker_service_per_node():
    assert sorted(WORKERS) == sorted(f"worker-{node}" for node in NODES)
    for name, service in WORKERS.items():
        node = name.removeprefix("worker-")
        assert env(service).get("IMAGESYNC_NODE") == node, name
        assert env(service).get("IMAGESYNC_ROLE", "node") == "node", name
        words = argv(service)
        if "--node" in words:
            assert words[words.index("--node") + 1] == node, name
        # a second worker for a node would double its max_parallel
        assert int(service.get("scale", 1)) == 1 and int((service.get("deploy") or {}).get("replicas", 1)) == 1


def test_one_control_worker():
    control = [name for name, s in SERVICES.items() if env(s).get("IMAGESYNC_ROLE") == "control"]
    assert control == ["control"]


def test_every_imagesync_service_reads_the_config_and_reaches_redis():
    for name, service in ON_THE_HEAD_NODE.items():
        environment = env(service)
        assert environment.get("IMAGESYNC_REDIS_URL") == REDIS_URL, name
        assert environment.get("IMAGESYNC_CONFIG", CONFIG) == CONFIG, name
        assert mounts(service).get(CONFIG) == ("./imagesync.toml", "ro"), name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name


def test_no_imagesync_variable_that_the_config_refuses():
    # imagesync refuses IMAGESYNC_* variables it does not know; only the
    # worker entrypoint reads (and unsets) IMAGESYNC_ROLE and IMAGESYNC_NODE.
    from imagesync.config import CONFIG_VARIABLE, ENVIRONMENT

    known = {*ENVIRONMENT, CONFIG_VARIABLE}
    for name, service in IMAGESYNC.items():
        allowed = known | ({"IMAGESYNC_ROLE", "IMAGESYNC_NODE"} if name in {*WORKERS, "control", "agent"} else set())
        unknown = {key for key in env(service) if key.startswith("IMAGESYNC_")} - allowed
        assert not unknown, f"{name}: {unknown}"


def test_workers_have_ssh_logs_and_time_to_finish_a_pull():
    for name in [*WORKERS, "control"]:
        service = SERVICES[name]
        assert mounts(service).get("/etc/imagesync/ssh") == ("./ssh", "ro"), name
        assert mounts(service).get("/var/log/imagesync", ("", ""))[0] == "logs", name
        assert seconds(service["stop_grace_period"]) >= 60, name


def test_the_node_agent_serves_its_images_on_the_published_port():
    environment = env(AGENT)
    assert AGENT["profiles"] == ["agent"] and not AGENT["depends_on"]  # never started with the head node's services
    assert environment["IMAGESYNC_ROLE"] == "agent" and environment["IMAGESYNC_AGENTS"] == "true"
    assert environment["IMAGESYNC_REDIS_URL"] == "${IMAGESYNC_REDIS_URL:-" + REDIS_URL + "}"
    port = environment["IMAGESYNC_AGENT_PEER_PORT"]
    assert f"{port}:{port}" in AGENT["ports"]
    socket = environment["IMAGESYNC_AGENT_ENDPOINT"]
    assert mounts(AGENT)[socket] == (socket, "rw") and mounts(AGENT).get(CONFIG) == ("./imagesync.toml", "ro")


def test_flower_requires_basic_auth():
    flower = SERVICES["flower"]
    assert argv(flower)[:4] == ["celery", "-A", "imagesync", "flower"]
    # ${VAR:?message}: compose refuses to start without it; no default password
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?.+\}", env(flower)["FLOWER_BASIC_AUTH"])
    # published on 5555 unless FLOWER_PUBLISH says where (${VAR:-default} in Compose)
    assert "${FLOWER_PUBLISH:-5555}:5555" in flower["ports"]


def test_exactly_one_beat():
    beats = [name for name, s in SERVICES.items()
             if "beat" in argv(s) or (s.get("build") or {}).get("dockerfile") == "beat/Dockerfile"]
    assert beats == ["beat"], "two beats would start every sync twice"
    assert int(SERVICES["beat"].get("scale", 1)) == 1
    for name, service in SERVICES.items():  # nor a worker with beat embedded
        assert not {"-B", "--beat"} & set(argv(service)), name


# --- Dockerfiles and build context ------------------------------------------------


def instructions(dockerfile: Path) -> list[list[str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1) + [""])[:2] for line in lines if line and not line.startswith("#")]


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context."""
    found = []
    for keyword, rest in instructions(dockerfile):
        if keyword.upper() != "COPY":
            continue
        words = json.loads(rest) if rest.startswith("[") else rest.split()
        if any(word.startswith("--from") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        found.append((words[:-1], words[-1]))
    return found


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the context (last match wins)."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_copy_sources_exist_and_reach_the_builder(dockerfile):
    for sources, _ in copies(dockerfile):
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.parent.name}/Dockerfile copies missing {source}"
            assert not dockerignored(source), f".dockerignore keeps {source} out of the build"


def test_entrypoint_is_the_copied_script():
    dockerfile = ROOT / "workers" / "Dockerfile"
    entrypoint = json.loads(dict(instructions(dockerfile))["ENTRYPOINT"])
    assert entrypoint[-1] in {destination for _, destination in copies(dockerfile)}


def test_beat_runs_the_worker_entrypoint_in_its_beat_role():
    beat = dict(instructions(ROOT / "beat" / "Dockerfile"))
    assert "ENTRYPOINT" not in beat, "beat inherits the workers' entrypoint"
    assert beat["ENV"] == "IMAGESYNC_ROLE=beat"


@pytest.mark.parametrize(("dockerfile", "default"), [(DOCKERFILES[0], "python:3.11-slim"),
                                                    (DOCKERFILES[1], "imagesync")], ids=["workers", "beat"])
def test_the_base_image_is_a_build_argument(dockerfile, default):
    # docker build --build-arg BASE=...: tests/test_compose.py builds on a base made with debootstrap
    assert instructions(dockerfile)[:2] == [["ARG", f"BASE={default}"], ["FROM", "${BASE}"]]


def test_beat_builds_from_the_worker_image():
    beat = instructions(ROOT / "beat" / "Dockerfile")
    # FROM ${BASE}, with BASE an ARG whose default names the image
    defaults = dict(rest.split("=", 1) for keyword, rest in beat if keyword == "ARG" and "=" in rest)
    base = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], dict(beat)["FROM"])
    context = SERVICES["beat"]["build"]["additional_contexts"][base]
    service = SERVICES[context.removeprefix("service:")]
    assert service["build"]["dockerfile"] == "workers/Dockerfile"


# --- entrypoints ----------------------------------------------------------------


@pytest.mark.parametrize("script", ENTRYPOINTS, ids=lambda p: p.parent.name)
def test_entrypoint_syntax(script):
    subprocess.run(["/bin/sh", "-n", str(script)], check=True)


@pytest.fixture
def fake_path(tmp_path):
    """A PATH holding only fake imagesync and celery commands that print what they got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("imagesync", "celery"):
        fake = bin_dir / command
        roles = "role=${IMAGESYNC_ROLE-unset} node=${IMAGESYNC_NODE-unset}"
        fake.write_text(f'#!/bin/sh\necho "{command} $*|{roles}"\n')
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def run(script: Path, fake_path: Path, *args: str, **environ: str) -> subprocess.CompletedProcess:
    environ = {"PATH": str(fake_path), "HOSTNAME": "box", **environ}
    return subprocess.run(["/bin/sh", str(script), *args], env=environ, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("script", ENTRYPOINTS, ids=lambda p: p.parent.name)
@pytest.mark.parametrize("problem", ["missing", "directory"])
def test_entrypoint_without_config_says_so_in_one_line(script, problem, fake_path, tmp_path):
    config = tmp_path / "imagesync.toml"
    if problem == "directory":  # what Docker makes of a bind mount whose file is missing
        config.mkdir()
    result = run(script, fake_path, IMAGESYNC_CONFIG=str(config), IMAGESYNC_NODE="k8s-worker1")
    assert result.returncode != 0
    assert result.stdout == "", "something was run"
    assert len(result.stderr.splitlines()) == 1 and str(config) in result.stderr, result.stderr


def test_worker_entrypoint_needs_a_node(fake_path, tmp_path):
    config = tmp_path / "imagesync.toml"
    config.write_text("")
    result = run(WORKER, fake_path, IMAGESYNC_CONFIG=str(config))
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "IMAGESYNC_NODE" in result.stderr


@pytest.mark.parametrize(("script", "args", "environ", "expected"), [
    (WORKER, [], {"IMAGESYNC_NODE": "k8s-worker1"}, "imagesync worker --node k8s-worker1 --"),
    (WORKER, [], {"IMAGESYNC_ROLE": "control"}, "imagesync worker --control --"),
    (WORKER, ["--healthcheck"], {"IMAGESYNC_NODE": "k8s-worker1"},
     "celery -A imagesync inspect ping --timeout 10 --destination k8s-worker1@box"),
    (WORKER, ["--healthcheck"], {"IMAGESYNC_ROLE": "control"},
     "celery -A imagesync inspect ping --timeout 10 --destination control@box"),
    (WORKER, [], {"IMAGESYNC_ROLE": "beat"}, "imagesync beat --"),
    (WORKER, [], {"IMAGESYNC_ROLE": "agent", "NODE_NAME": "k8s-worker3"}, "imagesync agent --"),
    (WORKER, ["--healthcheck"], {"IMAGESYNC_ROLE": "agent", "NODE_NAME": "k8s-worker3"},
     "celery -A imagesync inspect ping --timeout 10 --destination k8s-worker3@box"),
    (WORKER, [], {"IMAGESYNC_ROLE": "nodes"}, "imagesync worker --all-nodes -- -n nodes@%h"),
    (WORKER, ["--healthcheck"], {"IMAGESYNC_ROLE": "nodes"},
     "celery -A imagesync inspect ping --timeout 10 --destination nodes@box"),
], ids=["node", "control", "node-health", "control-health", "beat", "agent", "agent-health", "nodes", "nodes-health"])
def test_entrypoint_runs_the_command(script, args, environ, expected, fake_path, tmp_path):
    config = tmp_path / "imagesync.toml"
    config.write_text("")
    result = run(script, fake_path, *args, IMAGESYNC_CONFIG=str(config), **environ)
    assert result.returncode == 0, result.stderr
    # ROLE and NODE are unset: imagesync would refuse them as unknown settings
    assert result.stdout.strip() == f"{expected}|role=unset node=unset"


def healthcheck(d, **environ: str) -> subprocess.CompletedProcess:
    """``entrypoint.sh --healthcheck`` as the image's HEALTHCHECK runs it: in the container of a
    worker, whose HOSTNAME is the %h in the worker's Celery name, with celery on PATH."""
    import socket
    import sys

    environ = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOSTNAME": socket.gethostname(),
               "IMAGESYNC_CONFIG": str(d.config_path), **environ}
    return subprocess.run(["/bin/sh", str(WORKER), "--healthcheck"], env=environ, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.cluster
def test_healthcheck_is_healthy_with_a_live_worker_and_unhealthy_without(deploy):
    """The HEALTHCHECK pings the name `imagesync worker` gives its Celery node (NODE@%h,
    control@%h): 0 while that worker answers on the real cluster's Redis, 1 once it is gone."""
    d = deploy(nodes=1)
    d.configure()
    d.start()
    alive = healthcheck(d, IMAGESYNC_NODE="node-1")
    assert alive.returncode == 0, alive.stdout + alive.stderr
    assert "pong" in alive.stdout
    control = healthcheck(d, IMAGESYNC_ROLE="control")
    assert control.returncode == 0, control.stdout + control.stderr
    d.services.stop("worker-node-1")
    dead = healthcheck(d, IMAGESYNC_NODE="node-1")
    assert dead.returncode == 1, dead.stdout + dead.stderr
    # the worker of every SSH node, named as the entrypoint names it
    assert healthcheck(d, IMAGESYNC_ROLE="nodes").returncode == 1
    d.services.start_shared_worker("nodes", "--all-nodes", "--", "-n", "nodes@%h")
    alive = healthcheck(d, IMAGESYNC_ROLE="nodes")
    assert alive.returncode == 0, alive.stdout + alive.stderr


def test_the_webhook_receiver_runs_with_its_secret_and_listens_where_the_registry_reaches_it():
    webhook = SERVICES["webhook"]
    assert argv(webhook)[:2] == ["imagesync", "webhook"]
    assert re.fullmatch(r"\$\{IMAGESYNC_WEBHOOK_SECRET:\?.+\}", env(webhook)["IMAGESYNC_WEBHOOK_SECRET"])
    assert "127.0.0.1:9809:9809" in webhook["ports"]
