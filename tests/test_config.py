"""Tests of imagesync.config: formats, environment, defaults and error lines."""

from __future__ import annotations

import atexit
import math
import re
import shutil
import tempfile
from pathlib import Path

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagesync.config import (
    DEFAULT_CONFIG_PATH,
    ENVIRONMENT,
    LEGACY_KEYS,
    Node,
    Settings,
    SSHSettings,
    load_settings,
    mask_url,
)
from imagesync.config.backup import BackupSettings
from imagesync.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

# The configuration section of the seed tool's README, verbatim.
SEED_CONF = """\
# REQUIRED: Worker node hostnames (SSH accessible)
NODE1="k8s-worker1"
NODE2="k8s-worker2"

# REQUIRED: Primary image prefix to sync
PREFIX1="bcm11"

# REQUIRED: Logging directory
LOG_DIR="/var/log/giindia/image-sync"

# OPTIONAL: Secondary image prefix (leave empty to disable)
PREFIX2="nvcr.io/nvidia"

# OPTIONAL: Timeout for pulling a single image (default: 1800 seconds)
TIME_OUT=1800

# OPTIONAL: Maximum parallel pulls per node (default: 4)
MAX_PARALLEL=4
"""

MINIMAL = """\
prefixes = ["bcm11"]

[[nodes]]
name = "k8s-worker1"
"""


def write(tmp_path: Path, text: str, name: str = "imagesync.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, name: str = "imagesync.toml", **environ: str) -> Settings:
    return load_settings(write(tmp_path, text, name), environ)


def problems(tmp_path: Path, text: str, name: str = "imagesync.toml", **environ: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, name, **environ)
    assert_readable(caught.value)
    return caught.value.problems


def assert_readable(error: ConfigError) -> None:
    """Each problem is one line of plain words, without pydantic's vocabulary."""
    assert error.problems
    for problem in error.problems:
        assert problem.strip() and len(problem.splitlines()) == 1, problem
        for jargon in ("Input should", "errors.pydantic.dev", "validation error", "Field required", "type="):
            assert jargon not in problem, problem


# --- formats -------------------------------------------------------------------


def test_the_seed_config_is_read_as_it_is(tmp_path):
    settings = load(tmp_path, SEED_CONF, "image-sync.conf")
    assert [node.name for node in settings.nodes] == ["k8s-worker1", "k8s-worker2"]
    assert [node.host for node in settings.nodes] == ["k8s-worker1", "k8s-worker2"]
    assert {(node.runtime, node.transport) for node in settings.nodes} == {("crictl", "ssh")}
    assert settings.prefixes == ["bcm11", "nvcr.io/nvidia"]
    assert settings.log_dir == Path("/var/log/giindia/image-sync")
    assert (settings.time_out, settings.max_parallel) == (1800, 4)
    source = f"file {tmp_path / 'image-sync.conf'}"
    assert settings.sources["time_out"] == source
    assert settings.sources["nodes"] == source
    assert settings.sources["schedule"] == "default"


def test_the_embedded_seed_config_matches_the_seed_readme():
    # the Bash tool's own README, as it ships
    text = (REPO / "tests" / "data" / "image-sync-README.md").read_text()
    block = re.search(r"## Configuration.*?```bash\n(.*?)```", text, re.S)
    assert block is not None
    assert block.group(1) == SEED_CONF


def test_a_minimal_toml_file_gets_every_default(tmp_path):
    settings = load(tmp_path, MINIMAL)
    node = settings.nodes[0]
    assert (node.name, node.host, node.port, node.user, node.key_file) == ("k8s-worker1", "k8s-worker1", 22, None, None)
    assert (node.runtime, node.endpoint, node.namespace, node.hosts_dir, node.transport) == (
        "crictl",
        None,
        "k8s.io",
        None,
        "ssh",
    )
    assert settings.images == []
    assert (settings.time_out, settings.max_parallel, settings.history, settings.retries) == (1800, 4, 200, 3)
    assert settings.log_dir == Path("/var/log/imagesync")
    assert settings.log_keep_days == 30
    assert settings.schedule == "*/30 * * * *"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.ssh == SSHSettings()
    assert settings.ssh.user == "root" and settings.ssh.key_file is None
    assert settings.ssh.known_hosts == Path("~/.ssh/known_hosts").expanduser()
    assert (settings.ssh.host_key_policy, settings.ssh.connect_timeout) == ("reject", 10.0)
    assert settings.path == tmp_path / "imagesync.toml"


def test_every_key_can_be_set_in_toml(tmp_path):
    key = write(tmp_path, "key", "id_ed25519")
    ssh_config = write(tmp_path, "# no hosts\n", "ssh_config")
    image_config = write(tmp_path, '[{"ref": "u:1", "arch": {"arm64": "arm64v8/u:1"}}]', "image.config")
    settings = load(
        tmp_path,
        f"""
        prefixes = ["bcm11/", "nvcr.io/nvidia", "bcm11"]
        images = ["docker.io/library/busybox:1.36"]
        images_file = "{image_config}"
        time_out = 60
        max_parallel = 8
        log_dir = "/tmp/imagesync-logs"
        log_keep_days = 7
        schedule = 300
        timezone = "Asia/Kolkata"
        redis_url = "sentinel://:s3cret@redis1.example:26379;sentinel://:s3cret@redis2.example/1"
        redis_master_name = "mymaster"
        history = 5
        retries = 0
        exporter_address = "::1"
        exporter_port = 9100
        webhook_address = "::1"
        webhook_port = 9101
        webhook_secret_file = "{key}"
        source = "peers-first"
        transfer = false
        peer_ssh = true
        refresh = false
        prune = true
        min_free = "50GiB"
        exclude = ["bcm11/scratch", "*/ci-*"]
        agents = true
        agent_heartbeat = 2.5
        agent_lapse = 8
        agent_inventory_timeout = 12
        agent_forget = 3600
        agent_runtime = "ctr"
        agent_endpoint = "unix:///run/k3s/containerd/containerd.sock"
        agent_namespace = "k8s.io"
        agent_hosts_dir = "/etc/containerd/certs.d"
        agent_image_fs = "/var/lib/rancher"
        agent_labels = ["gpu", "a100"]
        agent_peer_port = 5071
        agent_peer_address = "10.0.0.0"
        agent_peer_advertise = "10.0.0.9"
        [backup]
        registry = "harbor.local:8443/backup"
        username = "robot$backup"
        password_file = "{key}"
        images = ["nvcr.io/nvidia"]
        insecure = true
        insecure_sources = ["registry.local:5000"]
        [registries."nvcr.io"]
        username = "$oauthtoken"
        password = "ngc api key"
        [registries."harbor.local:8443"]
        username = "robot$sync"
        password_file = "{key}"
        [ssh]
        user = "admin"
        key_file = "{key}"
        known_hosts = "/etc/imagesync/known_hosts"
        host_key_policy = "accept-new"
        connect_timeout = 2.5
        config_file = "{ssh_config}"
        [[nodes]]
        name = "gpu-1"
        host = "10.0.0.7"
        port = 2222
        user = "ops"
        key_file = "{key}"
        runtime = "ctr"
        endpoint = "/run/containerd/containerd.sock"
        namespace = "k8s.io"
        hosts_dir = "/etc/containerd/certs.d"
        transport = "local"
        platform = "linux/arm64/v8"
        image_fs = "/srv/containerd"
        labels = ["gpu"]
        peer_host = "gpu-1.cluster"
        peer_port = 22
        peer_user = "root"
        """,
    )
    # a trailing "/" is dropped, and with it the repeat
    assert settings.prefixes == ["bcm11", "nvcr.io/nvidia"]
    assert settings.images == ["docker.io/library/busybox:1.36"]
    assert (settings.time_out, settings.max_parallel, settings.schedule, settings.history, settings.retries) == (
        60,
        8,
        300,
        5,
        0,
    )
    assert settings.ssh == SSHSettings(
        user="admin",
        key_file=key,
        known_hosts=Path("/etc/imagesync/known_hosts"),
        host_key_policy="accept-new",
        connect_timeout=2.5,
        config_file=ssh_config,
    )
    assert (settings.source, settings.transfer, settings.peer_ssh) == ("peers-first", False, True)
    assert settings.exclude == ["bcm11/scratch", "*/ci-*"]
    assert settings.backup == BackupSettings(registry="harbor.local:8443/backup", username="robot$backup",
                                             password_file=key, images=["nvcr.io/nvidia"], insecure=True,
                                             insecure_sources=["registry.local:5000"])
    assert settings.min_free == "50GiB"
    assert (settings.agents, settings.agent_heartbeat, settings.agent_lapse, settings.agent_inventory_timeout,
            settings.agent_forget) == (True, 2.5, 8.0, 12.0, 3600)
    assert (settings.agent_runtime, settings.agent_endpoint, settings.agent_namespace, settings.agent_hosts_dir,
            settings.agent_image_fs) == ("ctr", "unix:///run/k3s/containerd/containerd.sock", "k8s.io",
                                         "/etc/containerd/certs.d", "/var/lib/rancher")
    assert settings.redis_master_name == "mymaster"
    assert (settings.exporter_address, settings.exporter_port) == ("::1", 9100)
    assert (settings.webhook_address, settings.webhook_port, settings.webhook_secret_file) == ("::1", 9101, key)
    node = settings.node("gpu-1")
    assert (node.host, node.port, node.user, node.key_file, node.runtime) == ("10.0.0.7", 2222, "ops", key, "ctr")
    assert (node.endpoint, node.hosts_dir, node.transport) == (
        "/run/containerd/containerd.sock",
        "/etc/containerd/certs.d",
        "local",
    )
    assert (node.platform, node.image_fs, node.labels) == ("linux/arm64/v8", "/srv/containerd", ["gpu"])
    assert (node.peer_host, node.peer_port, node.peer_user) == ("gpu-1.cluster", 22, "root")
    assert (settings.refresh, settings.agent_labels, settings.prune) == (False, ["gpu", "a100"], True)
    assert (settings.agent_peer_port, settings.agent_peer_address, settings.agent_peer_advertise) == (
        5071, "10.0.0.0", "10.0.0.9")
    # webhook_secret and webhook_secret_file are one or the other, as are the backup's password and password_file
    sources = {key: source for key, source in settings.sources.items()
               if key not in ("webhook_secret", "backup.password")}
    assert set(sources.values()) == {f"file {tmp_path / 'imagesync.toml'}"}


def test_a_file_of_key_value_lines_is_legacy_whatever_its_name(tmp_path):
    settings = load(tmp_path, 'NODE1="a"\nPREFIX1=bcm11\n', "imagesync.toml")
    assert [node.name for node in settings.nodes] == ["a"]


def test_legacy_shell_syntax(tmp_path):
    settings = load(
        tmp_path,
        """
        export NODE10='ten'   # NODE10 comes after NODE2
        NODE2=two
        NODE1="admin@one"
        NODE3=""
        PREFIX1=bcm11/
        PREFIX2=""
        PREFIX3='nvcr.io/nvidia'
        TIME_OUT=60
        TIME_OUT=90
        MAX_PARALLEL=
        """,
        "image-sync.conf",
    )
    assert [(node.name, node.host, node.user) for node in settings.nodes] == [
        ("one", "one", "admin"),
        ("two", "two", None),
        ("ten", "ten", None),
    ]
    assert settings.prefixes == ["bcm11", "nvcr.io/nvidia"]
    assert settings.time_out == 90  # as in bash, the later assignment wins
    assert settings.max_parallel == 4  # empty: the default
    assert settings.sources["max_parallel"] == "default"


def test_legacy_problems_name_the_legacy_key(tmp_path):
    found = problems(
        tmp_path,
        """
        NODE1="k8s-worker1"
        NODE2="k8s-worker1"
        PREFIX1="bcm 11"
        TIME_OUT=abc
        MAX_PARALLEL=0
        TIMEOUT=5
        LOG_DIR="$HOME/logs"
        REDIS_URL=redis://x
        PREFIX2="unterminated
        NODE3 = "spaces"
        """,
        "image-sync.conf",
    )
    assert found == [
        "unknown key TIMEOUT: did you mean TIME_OUT?",
        "LOG_DIR: imagesync does not expand shell variables or commands: write the value out",
        "unknown key REDIS_URL: image-sync.conf takes NODE1.., PREFIX1.., LOG_DIR, TIME_OUT and MAX_PARALLEL; "
        "other settings need a TOML file (see imagesync.sample.toml)",
        "line 10: no closing quotation: check the quotes",
        "line 11: 'NODE3 = \"spaces\"' is not a KEY=value line: write KEY=\"value\", with no spaces around '='",
        "NODE2: 'k8s-worker1' is the name of another node too: give each node its own name",
        "PREFIX1: 'bcm 11' contains spaces or control characters: write an image prefix",
        "TIME_OUT: 'abc' is not a whole number of seconds",
        "MAX_PARALLEL: 0 is out of range: use 1 to 256",
    ]


def test_legacy_duplicate_and_missing_nodes(tmp_path):
    assert problems(tmp_path, "NODE1=a\nNODE2=a\nPREFIX1=x\n", "image-sync.conf") == [
        "NODE2: 'a' is the name of another node too: give each node its own name"
    ]
    assert problems(tmp_path, 'NODE1=""\nPREFIX1=x\n', "image-sync.conf") == [
        "NODE1: no nodes are configured: list at least one worker node, "
        "or set agents = true for nodes that run imagesync agent"
    ]
    assert problems(tmp_path, "NODE1=a\n", "image-sync.conf") == [
        "PREFIX1: no prefixes and no images are configured: list at least one prefix or image to keep in sync"
    ]


# --- where the file is ------------------------------------------------------------


def test_the_path_argument_wins_over_the_environment(tmp_path):
    chosen = write(tmp_path, MINIMAL, "chosen.toml")
    other = write(tmp_path, "not toml at all [", "other.toml")
    assert load_settings(chosen, {"IMAGESYNC_CONFIG": str(other)}).path == chosen
    assert load_settings(None, {"IMAGESYNC_CONFIG": str(chosen)}).path == chosen


def test_without_a_path_the_default_file_is_read():
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine")
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={})
    assert caught.value.problems == [
        f"no configuration file at {DEFAULT_CONFIG_PATH}: create it (see imagesync.sample.toml) "
        "or point IMAGESYNC_CONFIG at one"
    ]


def test_unreadable_files_are_one_line(tmp_path):
    for path, expected in [
        (tmp_path, f"cannot read {tmp_path}: it is a directory: name the configuration file itself"),
        (tmp_path / "missing" / "x.toml", f"no configuration file at {tmp_path / 'missing' / 'x.toml'}"),
        (write(tmp_path, "", "file") / "x.toml", f"no configuration file at {tmp_path / 'file' / 'x.toml'}"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_settings(path, {})
        assert len(caught.value.problems) == 1
        assert caught.value.problems[0].startswith(expected)
        assert caught.value.source == str(path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'prefixes = ["caf\xe9"]\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(latin1, {})
    assert caught.value.problems == [f"cannot read {latin1}: byte 16 is not UTF-8: save the file as UTF-8"]


def test_a_toml_syntax_error_gives_its_line(tmp_path):
    assert problems(tmp_path, 'prefixes = ["a"]\n\ntime_out = = 3\n') == [
        "not valid TOML: Invalid value (at line 3, column 12): fix the syntax there"
    ]


# --- errors ---------------------------------------------------------------------------


def test_every_problem_is_reported_at_once(tmp_path):
    found = problems(
        tmp_path,
        """
        prefixes = ["bcm11", "", "a b", "/"]
        time_out = "abc"
        max_parallel = 300
        history = 0
        retries = 21
        schedule = "61 * * * *"
        log_dir = 5
        redis_url = "http://:pw@redis"
        timeout = 5
        [ssh]
        user = ""
        host_key_policy = "acept-new"
        key_file = "/no/such/key"
        connect_timeout = 0
        [[nodes]]
        name = "a"
        hostt = "x"
        port = "22x"
        [[nodes]]
        name = "b c"
        runtime = "critcl"
        transport = 1
        [[nodes]]
        host = "c"
        namespace = "-x"
        """,
    )
    assert found == [
        "nodes[0].port: '22x' is not a port number",
        "unknown key nodes[0].hostt: did you mean host?",
        "nodes[1].name: 'b c' contains spaces or control characters: write a node name",
        "nodes[1].runtime: 'critcl' is not one of crictl, ctr: did you mean crictl?",
        "nodes[1].transport: 1 is not one of ssh, local",
        "nodes[2].name is missing: give every node a name (it becomes the node's Celery queue)",
        "nodes[2].namespace: '-x' is not a containerd namespace: use letters and digits joined by . _ -",
        "prefixes[1]: empty value: write an image prefix",
        "prefixes[2]: 'a b' contains spaces or control characters: write an image prefix",
        "prefixes[3]: '/' is not an image prefix: name a registry or a repository",
        "time_out: 'abc' is not a whole number of seconds",
        "max_parallel: 300 is out of range: use 1 to 256",
        "log_dir: 5 is not a path",
        "schedule: '61 * * * *' has an invalid minute field '61': use 0-59",
        "redis_url: 'http://:****@redis' is not a Redis URL: use redis://HOST:6379/0, rediss:// for TLS, "
        "unix:///path/to/redis.sock or sentinel://HOST:26379;sentinel://HOST:26379/0 for Redis Sentinel",
        "history: 0 is out of range: use at least 1",
        "retries: 21 is out of range: use 0 to 20",
        "ssh.user: empty value: write a user name",
        "ssh.key_file: '/no/such/key' does not exist: create the file or fix the path",
        "ssh.host_key_policy: 'acept-new' is not one of reject, accept-new: did you mean accept-new?",
        "ssh.connect_timeout: 0 is out of range: use a number of seconds above 0",
        "unknown key timeout: did you mean time_out?",
    ]


def test_the_shape_of_the_document(tmp_path):
    # the keys in the order the model declares them
    known = ", ".join(Settings.model_fields)
    assert known.startswith("nodes, prefixes, images, images_file, time_out, max_parallel, log_dir")
    assert problems(tmp_path, 'prefixes = "bcm11"\nssh = 5\nnodes = [1]\nwhat = 1\n') == [
        "nodes[0]: 1 is not a table of keys: write it as a [[nodes]] table",
        "prefixes: 'bcm11' is not a list: write ['bcm11']",
        "ssh: 5 is not a table of keys: write it as an [ssh] table",
        f"unknown key what: remove it (the keys here are {known})",
    ]
    assert problems(tmp_path, 'prefixes = ["x"]\nnodes = "a"\n"odd key" = 1\n') == [
        "nodes: 'a' is not a list of nodes: write each node as a [[nodes]] table",
        f'unknown key "odd key": remove it (the keys here are {known})',
    ]
    none = "nodes: no nodes are configured: list at least one worker node, or set agents = true for nodes that run " \
        "imagesync agent"
    assert problems(tmp_path, 'prefixes = ["x"]\n') == [none]
    assert problems(tmp_path, 'prefixes = ["x"]\nnodes = []\n') == [none]
    # agent mode: the nodes are the agents alive in Redis; the lapse must outlast a heartbeat
    assert load(tmp_path, 'prefixes = ["x"]\nagents = true\n').nodes == []
    assert problems(tmp_path, 'prefixes = ["x"]\nagents = true\nagent_heartbeat = 10\nagent_lapse = 5\n') == [
        "agent_lapse: 5 s is not longer than agent_heartbeat (10 s): give an agent at least two heartbeats, "
        "such as 3 x agent_heartbeat"
    ]


def test_duplicate_node_names(tmp_path):
    text = 'prefixes = ["x"]\n' + '[[nodes]]\nname = "a"\n' * 2
    assert problems(tmp_path, text) == [
        "nodes[1].name: 'a' is the name of another node too: give each node its own name"
    ]


def test_something_must_be_synced(tmp_path):
    text = '[[nodes]]\nname = "a"\n'
    assert problems(tmp_path, text) == [
        "prefixes: no prefixes and no images are configured: list at least one prefix or image to keep in sync"
    ]
    assert load(tmp_path, 'images = ["busybox"]\n' + text).images == ["busybox"]
    assert load(tmp_path, text, IMAGESYNC_PREFIXES="bcm11").prefixes == ["bcm11"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", "5 is out of range: use at least 10"),
        (
            '"abc"',
            "'abc' is not a crontab expression: write five fields, minute hour day-of-month month "
            "day-of-week, such as '*/30 * * * *', or a number of seconds",
        ),
        ("true", "true is not a crontab expression"),
        ('"* 24 * * *"', "'* 24 * * *' has an invalid hour field '24': use 0-23"),
        ('"* * 0 * *"', "'* * 0 * *' has an invalid day-of-month field '0': use 1-31"),
        ('"* * * 13 *"', "'* * * 13 *' has an invalid month field '13': use 1-12 or jan-dec"),
        ('"* * * * 7"', "'* * * * 7' has an invalid day-of-week field '7': use 0-6 (Sunday is 0) or sun-sat"),
        ('"*/0 * * * *"', "'*/0 * * * *' has an invalid minute field '*/0': use 0-59"),
    ],
)
def test_bad_schedules(tmp_path, value, expected):
    (problem,) = problems(tmp_path, f"schedule = {value}\n" + MINIMAL)
    assert problem.startswith(f"schedule: {expected}")


def test_good_schedules(tmp_path):
    assert load(tmp_path, 'schedule = " 0  */6 * * mon-fri "\n' + MINIMAL).schedule == "0 */6 * * mon-fri"
    assert load(tmp_path, 'schedule = "600"\n' + MINIMAL).schedule == 600
    assert load(tmp_path, MINIMAL, IMAGESYNC_SCHEDULE="45").schedule == 45
    assert load(tmp_path, MINIMAL, IMAGESYNC_SCHEDULE="0 2 * * *").schedule == "0 2 * * *"


def test_key_files_must_exist_and_fall_back_to_ssh(tmp_path):
    shared, own = write(tmp_path, "k", "shared_key"), write(tmp_path, "k", "own_key")
    settings = load(
        tmp_path,
        f"""
        prefixes = ["x"]
        [ssh]
        user = "admin"
        key_file = "{shared}"
        [[nodes]]
        name = "a"
        [[nodes]]
        name = "b"
        user = "ops"
        key_file = "{own}"
        """,
    )
    a, b = settings.nodes
    assert (settings.node_user(a), settings.node_key_file(a)) == ("admin", shared)
    assert (settings.node_user(b), settings.node_key_file(b)) == ("ops", own)
    (problem,) = problems(tmp_path, MINIMAL + f'key_file = "{tmp_path}"\n')
    assert problem.startswith("nodes[0].key_file: '/") and problem.endswith(" is not a file: name the file itself")


def test_paths_expand_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, "k", "id_ed25519")
    settings = load(tmp_path, 'log_dir = "~/logs"\n' + MINIMAL + '[ssh]\nkey_file = "~/id_ed25519"\n')
    assert settings.log_dir == tmp_path / "logs"
    assert settings.ssh.key_file == tmp_path / "id_ed25519"
    assert settings.ssh.known_hosts == tmp_path / ".ssh" / "known_hosts"
    assert problems(tmp_path, 'log_dir = "~nobody-such/x"\n' + MINIMAL) == [
        "log_dir: '~nobody-such/x': there is no home directory ~nobody-such: write the path out"
    ]


def test_unknown_nodes_are_a_config_error(tmp_path):
    settings = load(tmp_path, MINIMAL + '[[nodes]]\nname = "k8s-worker2"\n')
    with pytest.raises(ConfigError) as caught:
        settings.node("k8s-worker3")
    assert caught.value.problems == [
        "no node named 'k8s-worker3' in the configuration; known nodes: k8s-worker1, k8s-worker2"
    ]


def test_node_names_become_queue_names(tmp_path):
    long_name = "n" * 64
    assert problems(tmp_path, f'prefixes = ["x"]\n[[nodes]]\nname = "{long_name}"\n') == [
        f"nodes[0].name: '{long_name[:56]}... is not a node name: use up to 63 letters, digits, '.', '_' and '-', "
        "starting with a letter or digit"
    ]
    assert load(tmp_path, f'prefixes = ["x"]\n[[nodes]]\nname = "{long_name[:63]}"\n').nodes[0].name == long_name[:63]


# --- environment --------------------------------------------------------------------


def test_every_override(tmp_path):
    key = write(tmp_path, "k", "id")
    environ = {
        "IMAGESYNC_PREFIXES": " bcm11 , nvcr.io/nvidia/,",
        "IMAGESYNC_IMAGES": "busybox:1.36,alpine",
        "IMAGESYNC_IMAGES_FILE": str(write(tmp_path, "[]", "image.config")),
        "IMAGESYNC_TIME_OUT": "60",
        "IMAGESYNC_MAX_PARALLEL": "2",
        "IMAGESYNC_LOG_DIR": "/tmp/logs",
        "IMAGESYNC_LOG_KEEP_DAYS": "0",
        "IMAGESYNC_SCHEDULE": "120",
        "IMAGESYNC_TIMEZONE": "Europe/Berlin",
        "IMAGESYNC_REDIS_URL": "sentinel://:pw@h:26379/2",
        "IMAGESYNC_REDIS_MASTER_NAME": "mymaster",
        "IMAGESYNC_HISTORY": "10",
        "IMAGESYNC_RETRIES": "1",
        "IMAGESYNC_SOURCE": "peers-first",
        "IMAGESYNC_TRANSFER": "false",
        "IMAGESYNC_PEER_SSH": "true",
        "IMAGESYNC_REFRESH": "false",
        "IMAGESYNC_PRUNE": "true",
        "IMAGESYNC_MIN_FREE": "50GiB",
        "IMAGESYNC_EXPORTER_ADDRESS": "0.0.0.0",
        "IMAGESYNC_EXPORTER_PORT": "9900",
        "IMAGESYNC_WEBHOOK_ADDRESS": "0.0.0.0",
        "IMAGESYNC_WEBHOOK_PORT": "9901",
        "IMAGESYNC_WEBHOOK_SECRET_FILE": str(key),
        "IMAGESYNC_SSH_USER": "admin",
        "IMAGESYNC_SSH_KEY_FILE": str(key),
        "IMAGESYNC_SSH_KNOWN_HOSTS": "/tmp/known_hosts",
        "IMAGESYNC_SSH_HOST_KEY_POLICY": "accept-new",
        "IMAGESYNC_SSH_CONNECT_TIMEOUT": "1.5",
        "IMAGESYNC_SSH_CONFIG_FILE": "none",  # ssh -F none: no SSH config (an empty variable is unset)
        "IMAGESYNC_EXCLUDE": "bcm11/scratch, */ci-*",
        "IMAGESYNC_BACKUP_REGISTRY": "harbor.local/backup",
        "IMAGESYNC_BACKUP_USERNAME": "robot",
        "IMAGESYNC_BACKUP_PASSWORD_FILE": str(key),
        "IMAGESYNC_BACKUP_IMAGES": "bcm11",
        "IMAGESYNC_BACKUP_INSECURE": "true",
        "IMAGESYNC_BACKUP_INSECURE_SOURCES": "registry.local:5000",
        "IMAGESYNC_AGENTS": "true",
        "IMAGESYNC_AGENT_HEARTBEAT": "3",
        "IMAGESYNC_AGENT_LAPSE": "9.5",
        "IMAGESYNC_AGENT_INVENTORY_TIMEOUT": "20",
        "IMAGESYNC_AGENT_FORGET": "600",
        "IMAGESYNC_AGENT_RUNTIME": "ctr",
        "IMAGESYNC_AGENT_ENDPOINT": "/run/containerd/containerd.sock",
        "IMAGESYNC_AGENT_NAMESPACE": "moby",
        "IMAGESYNC_AGENT_HOSTS_DIR": "/etc/containerd/certs.d",
        "IMAGESYNC_AGENT_IMAGE_FS": "/srv/containerd",
        "IMAGESYNC_AGENT_LABELS": "gpu, a100",
        "IMAGESYNC_AGENT_PEER_PORT": "0",
        "IMAGESYNC_AGENT_PEER_ADDRESS": "127.0.0.1",
        "IMAGESYNC_AGENT_PEER_ADVERTISE": "127.0.0.2",
        "IMAGESYNC_AGENT_NODE": '{"name": "not a setting: ignored"}',  # what `imagesync agent` hands its worker
        "PATH": "/usr/bin",  # not ours: ignored
    }
    settings = load(tmp_path, MINIMAL + "[ssh]\nuser = 'root'\n", **environ)
    assert settings.prefixes == ["bcm11", "nvcr.io/nvidia"]
    assert settings.images == ["busybox:1.36", "alpine"]
    assert (settings.time_out, settings.max_parallel, settings.schedule, settings.history, settings.retries) == (
        60,
        2,
        120,
        10,
        1,
    )
    assert (settings.log_dir, settings.redis_url) == (Path("/tmp/logs"), "sentinel://:pw@h:26379/2")
    assert settings.redis_master_name == "mymaster"
    assert settings.log_keep_days == 0
    assert settings.timezone == "Europe/Berlin"
    assert (settings.source, settings.transfer, settings.refresh, settings.prune) == ("peers-first", False, False, True)
    assert settings.peer_ssh is True
    assert settings.agent_labels == ["gpu", "a100"]
    assert (settings.agent_peer_port, settings.agent_peer_address, settings.agent_peer_advertise) == (
        0, "127.0.0.1", "127.0.0.2")
    assert (settings.exporter_address, settings.exporter_port) == ("0.0.0.0", 9900)
    assert (settings.webhook_address, settings.webhook_port, settings.webhook_secret_file) == ("0.0.0.0", 9901, key)
    assert settings.ssh == SSHSettings(
        user="admin",
        key_file=key,
        known_hosts=Path("/tmp/known_hosts"),
        host_key_policy="accept-new",
        connect_timeout=1.5,
        config_file=None,
    )
    assert settings.exclude == ["bcm11/scratch", "*/ci-*"]
    assert settings.backup == BackupSettings(registry="harbor.local/backup", username="robot", password_file=key,
                                             images=["bcm11"], insecure=True, insecure_sources=["registry.local:5000"])
    assert (settings.agents, settings.agent_heartbeat, settings.agent_lapse, settings.agent_inventory_timeout,
            settings.agent_forget) == (True, 3.0, 9.5, 20.0, 600)
    assert (settings.agent_runtime, settings.agent_endpoint, settings.agent_namespace, settings.agent_hosts_dir,
            settings.agent_image_fs) == ("ctr", "/run/containerd/containerd.sock", "moby",
                                         "/etc/containerd/certs.d", "/srv/containerd")
    for variable, key_path in ENVIRONMENT.items():
        # one or the other: set below
        if variable not in ("IMAGESYNC_WEBHOOK_SECRET", "IMAGESYNC_BACKUP_PASSWORD"):
            assert settings.sources[".".join(key_path)] == f"env {variable}"
    assert settings.sources["nodes"] == f"file {tmp_path / 'imagesync.toml'}"


def test_the_webhook_secret_is_never_shown_and_comes_one_way(tmp_path):
    settings = load(tmp_path, MINIMAL, IMAGESYNC_WEBHOOK_SECRET="push token")
    assert settings.sources["webhook_secret"] == "env IMAGESYNC_WEBHOOK_SECRET"
    assert settings.webhook_token() == "push token"
    assert "push token" not in repr(settings)
    assert ("webhook_secret", "****", "env IMAGESYNC_WEBHOOK_SECRET") in settings.describe()
    key = write(tmp_path, "token\n", "token")
    both = problems(tmp_path, f'webhook_secret = "x"\nwebhook_secret_file = "{key}"\n' + MINIMAL)
    assert any("give either webhook_secret or webhook_secret_file, not both" in line for line in both), both


def test_every_key_but_nodes_and_registries_has_a_variable():
    # nodes and registry logins are tables: they are written in the file
    keys = {key for key in Settings.model_fields if key not in ("nodes", "registries", "ssh", "backup")}
    keys |= {f"ssh.{key}" for key in SSHSettings.model_fields}
    keys |= {f"backup.{key}" for key in BackupSettings.model_fields}
    assert {".".join(key) for key in ENVIRONMENT.values()} == keys
    for variable, key in ENVIRONMENT.items():
        assert variable == "IMAGESYNC_" + "_".join(key).upper()


def test_environment_problems_name_the_variable(tmp_path):
    assert problems(
        tmp_path,
        MINIMAL,
        IMAGESYNC_TIMEOUT="5",
        IMAGESYNC_RETRIES="x",
        IMAGESYNC_WHATEVER="1",
        IMAGESYNC_PREFIXES="ok,not ok",
    ) == [
        "IMAGESYNC_PREFIXES: 'not ok' contains spaces or control characters: write an image prefix",
        "IMAGESYNC_RETRIES: 'x' is not a whole number of retries",
        "unknown environment variable IMAGESYNC_TIMEOUT: did you mean IMAGESYNC_TIME_OUT?",
        "unknown environment variable IMAGESYNC_WHATEVER: unset it (docs/configuration.md lists the variables)",
    ]


def test_environment_overrides_legacy_keys_and_takes_their_blame(tmp_path):
    settings = load(tmp_path, SEED_CONF, "image-sync.conf", IMAGESYNC_TIME_OUT="30")
    assert settings.time_out == 30
    assert settings.sources["time_out"] == "env IMAGESYNC_TIME_OUT"
    assert problems(tmp_path, SEED_CONF, "image-sync.conf", IMAGESYNC_MAX_PARALLEL="0") == [
        "IMAGESYNC_MAX_PARALLEL: 0 is out of range: use 1 to 256"
    ]


def test_an_empty_variable_counts_as_unset(tmp_path):
    settings = load(tmp_path, "time_out = 99\n" + MINIMAL, IMAGESYNC_TIME_OUT="", IMAGESYNC_CONFIG="")
    assert settings.time_out == 99
    assert settings.sources["time_out"].startswith("file ")


def test_unknown_variables_are_reported_even_when_the_toml_is_broken(tmp_path):
    assert problems(tmp_path, "x = [", IMAGESYNC_TIMEOUT="5") == [
        "not valid TOML: Invalid value (at end of document): fix the syntax there",
        "unknown environment variable IMAGESYNC_TIMEOUT: did you mean IMAGESYNC_TIME_OUT?",
    ]


# --- showing the settings ------------------------------------------------------------


def test_describe_shows_every_key_with_its_source(tmp_path):
    settings = load(
        tmp_path,
        MINIMAL + 'port = 2200\n[[nodes]]\nname = "k8s-worker2"\nuser = "ops"\n',
        IMAGESYNC_REDIS_URL="redis://user:s3cret@redis:6379/0",
    )
    rows = {key: (value, source) for key, value, source in settings.describe()}
    file = f"file {tmp_path / 'imagesync.toml'}"
    top = [key for key in Settings.model_fields if key != "ssh"]
    ssh = [f"ssh.{key}" for key in SSHSettings.model_fields]
    # an SSH node's fields, then what the SSH config may add
    extra = ["known_hosts", "connect_timeout", "proxy_jump"]
    nodes = [f"nodes.{name}.{key}" for name in ("k8s-worker1", "k8s-worker2") for key in [*Node.model_fields, *extra]]
    assert list(rows) == top + ssh + nodes
    assert rows["redis_url"] == ("redis://user:****@redis:6379/0", "env IMAGESYNC_REDIS_URL")
    assert "s3cret" not in repr(settings) + repr(settings.describe())
    assert rows["nodes"] == ("k8s-worker1, k8s-worker2", file)
    assert rows["prefixes"] == ("bcm11", file)
    assert rows["images"] == ("(none)", "default")
    assert rows["time_out"] == ("1800", "default")
    assert rows["ssh.key_file"] == ("(not set)", "default")
    assert rows["nodes.k8s-worker1.port"] == ("2200", file)
    assert rows["nodes.k8s-worker1.host"] == ("k8s-worker1", "default")
    assert rows["nodes.k8s-worker1.user"] == ("root", "default")  # from ssh.user
    assert rows["nodes.k8s-worker2.user"] == ("ops", file)
    assert all(isinstance(value, str) for row in settings.describe() for value in row)


def test_settings_built_in_code():
    settings = Settings(nodes=[Node(name="a")], images=["busybox"])
    assert settings.path is None
    assert settings.nodes[0].host == "a"
    assert settings.sources["nodes"] == "argument"
    assert settings.sources["time_out"] == "default"
    assert settings.sources["ssh.user"] == "default"
    assert ("nodes.a.host", "a", "default") in settings.describe()
    with pytest.raises(pydantic.ValidationError):
        settings.time_out = 5  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        Settings(nodes=[Node(name="a"), Node(name="a")], images=["busybox"])


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:****@h:6379/0"),
        ("redis://user:s3cret@h:6379/0", "redis://user:****@h:6379/0"),
        ("rediss://user:p@ss@h", "rediss://user:****@h"),
        ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=****"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://user@h:6379/0", "redis://user@h:6379/0"),
        ("redis://user:@h", "redis://user:@h"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("not a url", "not a url"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


# --- the documents beside the code ------------------------------------------------------


def test_the_sample_loads_and_documents_every_key():
    settings = load_settings(REPO / "imagesync.sample.toml", {})
    assert [node.name for node in settings.nodes] == ["k8s-worker1", "k8s-worker2"]
    assert settings.prefixes == ["bcm11", "nvcr.io/nvidia"]
    text = (REPO / "imagesync.sample.toml").read_text()
    for model in (Settings, SSHSettings, Node, BackupSettings):
        for key in model.model_fields:
            if key not in ("nodes", "ssh", "backup"):
                assert re.search(rf"^(# )?{key} = ", text, re.M), key
    assert re.search(r"^(# )?\[backup\]$", text, re.M)
    for variable in ENVIRONMENT:
        assert variable in text


def test_the_reference_documents_every_key_and_variable():
    text = (REPO / "docs" / "configuration.md").read_text()
    for key in Settings.model_fields:
        if key != "ssh":  # documented key by key, as ssh.user and so on
            assert f"| `{key}` |" in text, key
    for key in SSHSettings.model_fields:
        assert f"| `ssh.{key}` |" in text, key
    for key in BackupSettings.model_fields:
        assert f"| `backup.{key}` |" in text, key
    for key in Node.model_fields:
        assert f"| `{key}` |" in text, key
    for variable in [*ENVIRONMENT, "IMAGESYNC_CONFIG"]:
        assert f"`{variable}`" in text, variable
    for legacy in [*LEGACY_KEYS, "NODE1", "PREFIX1"]:
        assert f"`{legacy}`" in text, legacy


# --- nothing but ConfigError escapes ----------------------------------------------------

# Hypothesis cannot use the function-scoped tmp_path; one directory serves all examples.
_SCRATCH = Path(tempfile.mkdtemp(prefix="imagesync-config-test-"))
atexit.register(shutil.rmtree, _SCRATCH, True)


def load_or_refuse(text: str | bytes, name: str, environ: dict[str, str]) -> Settings | None:
    """Load, asserting that anything refused is refused with readable lines."""
    path = _SCRATCH / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        settings = load_settings(path, environ)
    except ConfigError as error:
        assert_readable(error)
        return None
    assert settings.nodes and all(isinstance(v, str) for row in settings.describe() for v in row)
    return settings


def toml_string(text: str) -> str:
    """A TOML basic string: control characters escaped, the rest as it is."""
    escaped = "".join(
        "\\\\" if c == "\\" else '\\"' if c == '"' else f"\\u{ord(c):04x}" if ord(c) < 32 or ord(c) == 127 else c
        for c in text
    )
    return f'"{escaped}"'


def toml_value(value: object) -> str:
    """A value as TOML, inline: enough for the documents generated here."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(values: dict[str, object]) -> str:
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n" for key, value in values.items())


scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(["bcm11", "k8s-worker1", "*/5 * * * *", "reject", "ctr", "local", "60", "", "redis://h/0", "/"]),
)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)


def keyed(keys: list[str]) -> st.SearchStrategy[dict[str, object]]:
    """Tables whose keys are mostly the real ones, with values of any kind."""
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=8)), anything, max_size=len(keys))


nodes = st.lists(
    st.one_of(keyed(list(Node.model_fields)), st.fixed_dictionaries({"name": st.sampled_from(["a", "b", "a b"])})),
    max_size=3,
)
numbers = st.one_of(st.integers(-3, 300), st.integers(-3, 300).map(str), scalars)
plausible_nodes = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["a", "b", "k8s-worker1", "x" * 64, ""])},
        optional={
            "host": st.sampled_from(["10.0.0.1", "h", "a b"]),
            "port": numbers,
            "user": st.sampled_from(["ops", ""]),
            "key_file": st.sampled_from(["/nonexistent", "/etc/hostname", "~/x"]),
            "runtime": st.sampled_from(["crictl", "ctr", "docker"]),
            "endpoint": st.sampled_from(["unix:///run/containerd/containerd.sock", " "]),
            "namespace": st.sampled_from(["k8s.io", "-", "moby"]),
            "hosts_dir": st.sampled_from(["/etc/containerd/certs.d", ""]),
            "transport": st.sampled_from(["ssh", "local", "telnet"]),
        },
    ),
    max_size=3,
)
plausible = st.fixed_dictionaries(
    {"nodes": plausible_nodes},
    optional={
        "prefixes": st.lists(st.sampled_from(["bcm11", "nvcr.io/nvidia/", "bad prefix", "", "/"]), max_size=3),
        "images": st.lists(st.sampled_from(["busybox", "nvcr.io/nvidia/cuda:12", ""]), max_size=2),
        "time_out": numbers,
        "max_parallel": numbers,
        "log_dir": st.sampled_from(["/var/log/x", "~/logs", ""]),
        "schedule": st.one_of(numbers, st.sampled_from(["*/5 * * * *", "0 0 * * sun", "* * *", "60 * * * *"])),
        "redis_url": st.sampled_from(["redis://:pw@h/0", "unix:///r.sock", "http://h"]),
        "history": numbers,
        "retries": numbers,
        "ssh": st.fixed_dictionaries(
            {},
            optional={
                "user": st.sampled_from(["root", ""]),
                "key_file": st.sampled_from(["/nonexistent", "/etc/hostname"]),
                "known_hosts": st.sampled_from(["~/.ssh/known_hosts", "/tmp/kh"]),
                "host_key_policy": st.sampled_from(["reject", "accept-new", "yes"]),
                "connect_timeout": st.one_of(st.floats(), st.sampled_from(["2.5", "-1", "x"])),
            },
        ),
    },
)
documents = st.one_of(
    plausible,
    st.dictionaries(st.text(max_size=10), anything, max_size=6),
    st.tuples(keyed(list(Settings.model_fields)), nodes, keyed(list(SSHSettings.model_fields))).map(
        lambda parts: parts[0] | {"nodes": parts[1], "ssh": parts[2]}
    ),
)
variables = st.dictionaries(
    st.one_of(
        st.sampled_from([*ENVIRONMENT, "IMAGESYNC_TIMEOUT", "HOME_NOT_OURS"]),
        st.text(max_size=12).map("IMAGESYNC_".__add__),
    ),
    st.text(max_size=20),
    max_size=4,
)
fragments = st.sampled_from(
    [
        "[[nodes]]",
        "[ssh]",
        "name",
        "=",
        " ",
        '"',
        "'",
        "\n",
        "[",
        "]",
        "{",
        "}",
        ",",
        "#",
        "1",
        "3.5",
        "true",
        "time_out",
        "prefixes",
        "schedule",
        "NODE1",
        "PREFIX1",
        "TIME_OUT",
        "export",
        "\\",
        "$",
        "ab c",
        "\x00",
    ]
)
near_toml = st.lists(st.one_of(fragments, st.text(max_size=5)), max_size=40).map("".join)
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(documents, variables)
def test_any_document_is_loaded_or_refused_in_plain_words(document, environ):
    load_or_refuse(toml_document(document), "random.toml", environ)


@fuzz
@given(near_toml, st.sampled_from(["random.toml", "random.conf"]), variables)
def test_any_text_is_loaded_or_refused_in_plain_words(text, name, environ):
    load_or_refuse(text, name, environ)


@fuzz
@given(st.binary(max_size=200))
def test_any_bytes_are_loaded_or_refused_in_plain_words(data):
    load_or_refuse(data, "random.toml", {})


@fuzz
@given(st.dictionaries(st.sampled_from(list(ENVIRONMENT)), st.text(max_size=40), max_size=6))
def test_any_environment_value_is_used_or_refused_in_plain_words(environ):
    load_or_refuse(MINIMAL, "valid.toml", environ)


@fuzz
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="@/?#&"), min_size=1))
def test_a_masked_url_never_shows_its_password(password):
    assert mask_url(f"redis://:{password}@h:6379/0") == "redis://:****@h:6379/0"
    assert mask_url(f"redis://u:{password}@h") == "redis://u:****@h"
    assert mask_url(f"unix:///s?password={password}") == "unix:///s?password=****"


valid_documents = st.fixed_dictionaries(
    {
        "nodes": st.lists(st.sampled_from(["a", "b.c", "k8s-worker1", "Z_9"]), min_size=1, max_size=4, unique=True).map(
            lambda names: [{"name": name} for name in names]
        ),
        "prefixes": st.lists(st.sampled_from(["bcm11", "bcm11/", "nvcr.io/nvidia", "h:5000/x"]), min_size=1),
    },
    optional={
        "time_out": st.integers(1, 10**9),
        "max_parallel": st.integers(1, 256).map(str),
        "retries": st.integers(0, 20),
        "schedule": st.one_of(st.integers(10, 10**6), st.sampled_from(["*/5 * * * *", "0 0 1 jan sun", "5-3 * * * *"])),
        "ssh": st.fixed_dictionaries({}, optional={"connect_timeout": st.floats(0.001, 1e6), "user": st.just("u")}),
    },
)


@fuzz
@given(valid_documents)
def test_any_valid_document_is_loaded_as_written(document):
    settings = load_or_refuse(toml_document(document), "valid-random.toml", {})
    assert settings is not None
    assert [node.name for node in settings.nodes] == [node["name"] for node in document["nodes"]]
    assert settings.prefixes == list(dict.fromkeys(prefix.rstrip("/") for prefix in document["prefixes"]))
    assert settings.max_parallel == int(document.get("max_parallel", 4))
    logins = sum(2 for _ in settings.registries)
    # every key once (ssh's as ssh.KEY), each node's keys and the three SSH settings
    # it takes from the SSH config (known_hosts, connect_timeout, proxy_jump), each login's two
    top = len(Settings.model_fields) - 1
    per_node = len(Node.model_fields) + 3
    assert len(settings.describe()) == top + len(SSHSettings.model_fields) + per_node * len(settings.nodes) + logins


def test_prefixes_are_normalized_and_one_that_can_never_match_is_a_config_error(tmp_path):
    path = tmp_path / "imagesync.toml"
    path.write_text('prefixes = ["library/nginx", "Registry.Example.com/x"]\n[[nodes]]\nname = "w1"\n')
    assert load_settings(path, environ={}).prefixes == ["docker.io/library/nginx", "registry.example.com/x"]
    path.write_text('prefixes = ["nvcr.io/nvidia/pytorch:24.01"]\n[[nodes]]\nname = "w1"\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})
    assert refused.value.problems == [
        "prefixes[0]: 'nvcr.io/nvidia/pytorch:24.01' is not a usable image prefix: a prefix names a registry "
        "or repository, not a tag or digest: did you mean nvcr.io/nvidia/pytorch?"]


def test_a_crontab_schedule_is_read_in_the_configured_time_zone(tmp_path):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from celery import Celery

    from imagesync.celeryconfig import celery_settings

    path = tmp_path / "imagesync.toml"
    path.write_text('prefixes = ["bcm11"]\nschedule = "30 2 * * *"\ntimezone = "Asia/Kolkata"\n'
                    '[[nodes]]\nname = "w1"\n')
    app = Celery("t", set_as_current=False)
    app.conf.update(celery_settings(load_settings(path, environ={})))
    schedule = app.conf.beat_schedule["sync"]["schedule"]
    schedule.app = app
    # 02:30 in Kolkata is 21:00 UTC the day before
    last = datetime(2026, 11, 28, 21, 30, tzinfo=ZoneInfo("UTC"))
    due = schedule.remaining_estimate(last) + schedule.maybe_make_aware(schedule.now())
    assert due.astimezone(ZoneInfo("Asia/Kolkata")).strftime("%H:%M") == "02:30"


def test_the_time_zone_defaults_to_the_hosts(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "America/Sao_Paulo")
    path = tmp_path / "imagesync.toml"
    path.write_text('prefixes = ["bcm11"]\n[[nodes]]\nname = "w1"\n')
    assert load_settings(path, environ={}).timezone == "America/Sao_Paulo"


def test_a_comment_of_the_shell_tools_file_may_hold_quotes(tmp_path):
    settings = load(tmp_path, "# the seed's file, as shipped\n"
                    'NODE1="k8s-worker1"  # the first worker\'s name\n'
                    "PREFIX1='bcm11' # Harbor's prefix\n", "image-sync.conf")
    assert [node.name for node in settings.nodes] == ["k8s-worker1"]
    assert settings.prefixes == ["bcm11"]


def test_prefix_tables_name_the_labels_a_node_needs_and_the_seeds_prefixes_mean_every_node(tmp_path):
    settings = load(tmp_path, """\
        prefixes = ["bcm11", {name = "nvcr.io/nvidia/", nodes = "gpu, a100"}]
        images = [{ref = "busybox:1", nodes = ["cpu"]}]
        [[nodes]]
        name = "k8s-worker1"
        labels = ["gpu"]
        """.replace("        ", ""))
    assert settings.prefixes == ["bcm11", "nvcr.io/nvidia"]
    assert [prefix.nodes for prefix in settings.prefixes] == [(), ("gpu", "a100")]
    assert settings.image_selections() == {"docker.io/library/busybox:1": ("cpu",)}
    shown = dict((key, value) for key, value, _ in settings.describe())
    assert shown["prefixes"] == "bcm11, nvcr.io/nvidia (nodes: gpu, a100)"
    assert shown["nodes.k8s-worker1.labels"] == "gpu"
    seed = load(tmp_path, SEED_CONF, "image-sync.conf")
    assert [prefix.nodes for prefix in seed.prefixes] == [(), ()]
    found = problems(tmp_path, MINIMAL.replace('prefixes = ["bcm11"]',
                                               'prefixes = [{name = "bcm11", nodes = ["g p u"]}, {nodes = []}]'))
    assert any("prefixes[0]" in line and "label" in line for line in found), found
    assert any("prefixes[1]" in line and "has no name" in line for line in found), found
