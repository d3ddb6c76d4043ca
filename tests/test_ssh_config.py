"""SSH as ssh does it: the operator's OpenSSH client configuration, ProxyJump, MaxStartups.

The tests without a mark read SSH config files written here. The cluster tests
share one two-node test cluster: node-1's sshd listens on 127.0.0.1 and is also
the jump host; node-2's sshd listens only on 127.0.0.23 (``JUMP_ONLY``), an
address that only the SSH config's entry for node-2, used through ProxyJump by
the jump host, leads to: imagesync itself is never told to connect there, and
the test shows that the TCP connection to it is the jump host's sshd's.
Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from imagesync import cli
from imagesync.config import load_settings
from imagesync.errors import ConfigError, HostKeyUnknown, NodeUnreachable
from imagesync.transport import HANDSHAKE_RETRIES, SSHTransport, close_all, make_transport
from testcluster.cluster import Cluster
from testcluster.node import generate_key
from testcluster.process import free_port
from testcluster.services import Services

#: node-2's only listening address: local (all of 127.0.0.0/8 is), but named only in its SSH config entry
JUMP_ONLY = "127.0.0.23"


def toml(tmp_path: Path, ssh: str = "", nodes: str = 'name = "k8s-worker1"\n', top: str = "") -> Path:
    """An imagesync.toml: one prefix, an [ssh] table, and the given [[nodes]] tables (split on blank lines)."""
    tables = "".join(f"[[nodes]]\n{node.strip()}\n" for node in nodes.split("\n\n") if node.strip())
    path = tmp_path / "imagesync.toml"
    path.write_text(f'prefixes = ["bcm11"]\n{top}[ssh]\n{ssh}{tables}')
    return path


def target(settings, name="k8s-worker1"):
    return settings.ssh_target(settings.node(name))


def rows(settings):
    return {key: (value, source) for key, value, source in settings.describe()}


# --- looking nodes up ------------------------------------------------------------------


def test_a_node_takes_its_ssh_settings_from_the_ssh_config(tmp_path):
    key = generate_key(tmp_path / "id_ops", "ops")
    config = tmp_path / "ssh_config"
    config.write_text(f"""# as an operator writes it
Host k8s-worker1
    HostName 10.0.0.5
    Port 2222
    User ops
    IdentityFile {key}
    IdentityFile {tmp_path}/missing_key
    UserKnownHostsFile {tmp_path}/known_%h_%p
    ConnectTimeout 1m30s
""")
    settings = load_settings(toml(tmp_path, f'config_file = "{config}"\n'), {})
    found = target(settings)
    assert (found.host, found.port, found.user, found.key_files, found.connect_timeout) == (
        "10.0.0.5", 2222, "ops", (key,), 90.0)
    assert found.known_hosts == (tmp_path / "known_10.0.0.5_2222",)
    assert found.jump is None
    assert {key: source for key, source in found.sources.items() if key != "proxy_jump"} == dict.fromkeys(
        ("host", "port", "user", "key_file", "known_hosts", "connect_timeout"), "ssh config, Host k8s-worker1")
    assert found.notes == (f"k8s-worker1: IdentityFile {tmp_path}/missing_key of the ssh config does not exist: "
                           "it is skipped, as ssh skips it",)
    shown = rows(settings)
    assert shown["nodes.k8s-worker1.host"] == ("10.0.0.5", "ssh config, Host k8s-worker1")
    assert shown["nodes.k8s-worker1.user"] == ("ops", "ssh config, Host k8s-worker1")
    assert shown["nodes.k8s-worker1.known_hosts"] == (f"{tmp_path}/known_10.0.0.5_2222", "ssh config, Host k8s-worker1")
    assert shown["nodes.k8s-worker1.proxy_jump"] == ("(none)", "default")
    assert shown["ssh.config_file"] == (str(config), f"file {tmp_path / 'imagesync.toml'}")


def test_what_imagesync_sets_explicitly_wins_over_the_ssh_config(tmp_path):
    key = generate_key(tmp_path / "id_node", "node")
    config = tmp_path / "ssh_config"
    config.write_text("""Host *
    HostName 10.0.0.5
    Port 2222
    User ops
    IdentityFile /etc/hostname
    UserKnownHostsFile /tmp/elsewhere
    ConnectTimeout 60
""")
    path = toml(tmp_path, f'config_file = "{config}"\nknown_hosts = "{tmp_path}/kh"\nuser = "admin"\n',
                nodes=f'name = "a"\nport = 22\nuser = "root"\nkey_file = "{key}"\n\nname = "b"\n')
    settings = load_settings(path, {"IMAGESYNC_SSH_CONNECT_TIMEOUT": "3"})
    file = f"file {path}"
    a, b = target(settings, "a"), target(settings, "b")
    # host is the name looked up, as ssh's argument: HostName says where that is
    assert (a.host, a.sources["host"]) == ("10.0.0.5", "ssh config, Host *")
    assert (a.port, a.user, a.key_files, a.known_hosts) == (22, "root", (key,), (tmp_path / "kh",))
    assert [a.sources[k] for k in ("port", "user", "key_file", "known_hosts")] == [file] * 4
    assert (a.connect_timeout, a.sources["connect_timeout"]) == (3.0, "env IMAGESYNC_SSH_CONNECT_TIMEOUT")
    # b sets nothing of its own: [ssh]'s explicit user wins, the SSH config gives the rest
    assert (b.port, b.sources["port"]) == (2222, "ssh config, Host *")
    assert (b.user, b.sources["user"]) == ("admin", file)
    assert (b.key_files, b.sources["key_file"]) == ((Path("/etc/hostname"),), "ssh config, Host *")


def test_include_and_match_host_as_ssh_reads_them(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-w1.conf").write_text("Host w1\n    HostName 10.9.0.1\n")
    (tmp_path / "conf.d" / "20-w2.conf").write_text("Host w2\n    HostName 10.8.0.2\n")
    (tmp_path / "inner.conf").write_text("Port 2300\nHost w1\n    ConnectTimeout 7\n")
    config = tmp_path / "ssh_config"
    config.write_text(f"""Include {tmp_path}/conf.d/*.conf
Match host 10.9.*
    User matched
Host w3
    Include "{tmp_path}/inner.conf"
    User three
Host *
    Port 2200
""")
    path = toml(tmp_path, f'config_file = "{config}"\n', nodes='name = "w1"\n\nname = "w2"\n\nname = "w3"\n')
    settings = load_settings(path, {})
    w1, w2, w3 = (target(settings, name) for name in ("w1", "w2", "w3"))
    assert (w1.host, w1.user, w1.port) == ("10.9.0.1", "matched", 2200)
    assert [w1.sources[k] for k in ("host", "user", "port")] == [
        "ssh config, Host w1", "ssh config, Match host 10.9.*", "ssh config, Host *"]
    assert (w2.host, w2.user, w2.sources["user"]) == ("10.8.0.2", "root", "default")
    # an Include inside "Host w3" applies to w3 only, its own "Host w1" too; after it, w3's block goes on
    assert (w3.port, w3.user) == (2300, "three")
    assert w1.connect_timeout == 10.0


def test_the_seeds_conf_reads_the_ssh_config_the_environment_names(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("Host k8s-worker*\n    User ops\n    Port 2022\nHost k8s-worker2\n    HostName 10.0.0.2\n")
    conf = tmp_path / "image-sync.conf"
    conf.write_text('NODE1="k8s-worker1"\nNODE2="admin@k8s-worker2"\nPREFIX1="bcm11"\n')
    settings = load_settings(conf, {"IMAGESYNC_SSH_CONFIG_FILE": str(config)})
    assert settings.sources["ssh.config_file"] == "env IMAGESYNC_SSH_CONFIG_FILE"
    one, two = target(settings, "k8s-worker1"), target(settings, "k8s-worker2")
    assert (one.host, one.user, one.port) == ("k8s-worker1", "ops", 2022)
    # NODE2=admin@host says the user, as "ssh admin@host" did: it wins over User
    assert (two.host, two.user, two.port) == ("10.0.0.2", "admin", 2022)
    assert two.sources["user"] == f"file {conf}"


def test_the_ssh_config_can_be_turned_off(tmp_path):
    assert load_settings(toml(tmp_path, 'config_file = ""\n'), {}).ssh.config_file is None
    settings = load_settings(toml(tmp_path), {"IMAGESYNC_SSH_CONFIG_FILE": "none"})
    assert rows(settings)["ssh.config_file"] == ("(none: not read)", "env IMAGESYNC_SSH_CONFIG_FILE")
    assert (target(settings).host, target(settings).sources["host"]) == ("k8s-worker1", "default")


def test_strict_host_key_checking_no_is_not_followed_and_said(tmp_path, monkeypatch, capsys):
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n")
    path = toml(tmp_path, f'config_file = "{config}"\n')
    settings = load_settings(path, {})
    note = (f"k8s-worker1: ssh config {config} line 2 says StrictHostKeyChecking no for k8s-worker1: imagesync "
            'does not follow it and checks host keys with ssh.host_key_policy = "reject" (docs/configuration.md, '
            'Host keys: /dev/null keeps no keys: set ssh.known_hosts to a file that does, and add the key there)')
    assert target(settings).notes == (note,)
    assert target(settings).known_hosts == (Path("/dev/null"),)
    monkeypatch.setenv("IMAGESYNC_CONFIG", str(path))
    monkeypatch.setenv("COLUMNS", "300")
    assert cli.main(["config", "show"]) == 0
    assert f"imagesync: note: {note}\n" in capsys.readouterr().err


def test_accept_new_into_a_known_hosts_that_keeps_nothing_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    # the SSH config's UserKnownHostsFile /dev/null (or none): load, check and every process refuse it
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n")
    path = toml(tmp_path, f'config_file = "{config}"\nhost_key_policy = "accept-new"\n')
    refusal = (f"ssh config {config} line 3: UserKnownHostsFile /dev/null keeps nothing, so ssh.host_key_policy = "
               '"accept-new" would accept any host key on every connection, a changed one too: set ssh.known_hosts '
               'to a file that keeps them, such as ~/.ssh/known_hosts (it wins over UserKnownHostsFile), or use '
               '"reject" and add the keys')
    with pytest.raises(ConfigError) as refused:
        load_settings(path, {})
    assert refused.value.problems == [refusal]
    monkeypatch.setenv("IMAGESYNC_CONFIG", str(path))
    assert cli.main(["check"]) == 2
    assert capsys.readouterr().err == f"imagesync: {refusal}\n"

    # imagesync's own known_hosts wins over the SSH config's, and may not be /dev/null either
    known = tmp_path / "known_hosts"
    assert target(load_settings(path, {"IMAGESYNC_SSH_KNOWN_HOSTS": str(known)})).known_hosts == (known,)
    with pytest.raises(ConfigError) as refused:
        load_settings(path, {"IMAGESYNC_SSH_KNOWN_HOSTS": "/dev/null"})
    assert refused.value.problems[0].startswith(
        "ssh.known_hosts /dev/null (env IMAGESYNC_SSH_KNOWN_HOSTS) keeps nothing, so ")
    # reject keeps nothing either, but accepts nothing: it stays allowed
    assert target(load_settings(path, {"IMAGESYNC_SSH_HOST_KEY_POLICY": "reject"})).known_hosts == (Path("/dev/null"),)


def test_a_broken_ssh_config_line_is_one_clear_error(tmp_path, monkeypatch, capsys):
    config = tmp_path / "ssh_config"
    config.write_text("Host k8s-worker1\n    HostName 10.0.0.5\n    Port abc\n")
    monkeypatch.setenv("IMAGESYNC_CONFIG", str(toml(tmp_path, f'config_file = "{config}"\n')))
    assert cli.main(["check"]) == 2
    assert capsys.readouterr().err == (
        f"imagesync: ssh config {config} line 3: Port 'abc' is not a port number: use 1 to 65535\n")

    # several: one line each, in the order of the file
    config.write_text('Host "k8s-worker1\n  Hostnme 10.0.0.5\n  Port\nMatch localnetwork 10.0.0.0/8\n'
                      "  ConnectTimeout 0\n  ProxyJump a b\n  SomeNewerOption yes\n")
    assert cli.main(["config", "show"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"imagesync: ssh config {config} line {n}: {problem}" for n, problem in [
        (1, """'"k8s-worker1' has an unmatched quote: close it"""),
        (2, "unknown keyword Hostnme: did you mean HostName?"),
        (3, "'Port' is not a 'Keyword value' line: give the keyword its value"),
        (4, "Match localnetwork is not supported by paramiko, which reads the SSH config for imagesync: "
            "use Match host, originalhost, user, localuser, exec, canonical, final or all"),
        (5, "ConnectTimeout '0' is not a number of seconds above 0 (such as 10, or 1m)"),
        (6, "ProxyJump 'a b': 'a b' is not [user@]host[:port]"),
    ]]


def test_what_imagesync_cannot_do_is_refused_by_name(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("""Host two-hops
    ProxyJump a,b
Host chained
    ProxyJump bastion
Host bastion
    ProxyJump outer
Host piped
    ProxyCommand nc %h %p
""")
    path = toml(tmp_path, f'config_file = "{config}"\n', nodes='name = "two-hops"\n\nname = "chained"\n\n'
                                                               'name = "piped"\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(path, {})
    assert refused.value.problems == [
        f"ssh config {config} line 2: ProxyJump a,b for two-hops has 2 hops: imagesync goes through one jump host; "
        "give it one (a Host block for the jump host may set its own ProxyJump none)",
        f"ssh config {config} line 6: the jump host bastion of chained has a ProxyJump outer of its own: imagesync "
        "goes through one jump host; set ProxyJump none for bastion in a block above this one",
        f"ssh config {config} line 8: ProxyCommand for piped is not supported by imagesync: use ProxyJump, or set "
        "ProxyCommand none for it in a block above this one",
    ]


# --- the real cluster --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("ssh-config"), nodes=2)
    # sshd's ListenAddress, and the known_hosts name: [127.0.0.23]:PORT
    cluster.nodes[1].ssh_host = JUMP_ONLY
    with cluster:
        yield cluster


def ssh_config(cluster, path: Path, known_hosts: Path | None = None) -> Path:
    """The operator's SSH config: aliases for both nodes; node-2 only through the jump host (node-1's sshd)."""
    one, two = cluster.nodes
    path.write_text(f"""Host k8s-worker1
    HostName 127.0.0.1
    Port {one.ssh_port}
Host k8s-worker2
    HostName {JUMP_ONLY}
    Port {two.ssh_port}
    ProxyJump jumphost
Host jumphost
    HostName 127.0.0.1
    Port {one.ssh_port}
Host *
    User root
    IdentityFile {cluster.key_file}
    UserKnownHostsFile {known_hosts or cluster.known_hosts}
""")
    return path


def connections_to(address: str, port: int) -> dict[int, str]:
    """pid -> command line of every process holding an established TCP connection to address:port."""
    remote = f"{socket.inet_aton(address)[::-1].hex().upper()}:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == remote and fields[3] == "01":
            inodes.add(f"socket:[{fields[9]}]")
    holders = {}
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                pid = int(fd.parts[2])
                holders[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return holders


@pytest.mark.cluster
def test_proxy_jump_reaches_a_node_only_the_jump_host_can_reach(cluster, tmp_path):
    """node-2's sshd listens on 127.0.0.23 only; imagesync goes there through node-1's sshd (the jump host)."""
    one, two = cluster.nodes
    path = toml(tmp_path, f'config_file = "{ssh_config(cluster, tmp_path / "ssh_config")}"\n',
                nodes='name = "k8s-worker2"\n')
    settings = load_settings(path, {})
    node = settings.node("k8s-worker2")
    found = settings.ssh_target(node)
    assert found.route() == f"root@{JUMP_ONLY}:{two.ssh_port} via jumphost (root@127.0.0.1:{one.ssh_port})"
    assert found.sources["proxy_jump"] == "ssh config, Host k8s-worker2"
    transport = make_transport(settings, node)
    try:
        assert transport.run("echo $CONTAINERD_ADDRESS", timeout=10).stdout.strip() == two.socket
        # the TCP connection to the node is the jump host's sshd's, not ours
        holders = connections_to(JUMP_ONLY, two.ssh_port)
        assert holders and os.getpid() not in holders
        assert all("sshd" in command for command in holders.values()), holders
        assert "127.0.0.23" in rows(settings)["nodes.k8s-worker2.host"][0]
    finally:
        close_all()
        transport.close()

    # the jump host down: said so, for the node
    one.stop_sshd()
    try:
        with pytest.raises(NodeUnreachable) as down:
            make_transport(settings, node).run("true", timeout=10)
        assert down.value.node == "k8s-worker2"
        assert down.value.message == (
            f"Cannot connect to jump host jumphost via SSH (root@127.0.0.1:{one.ssh_port}: connection refused): "
            "check that it is up and sshd is running")
    finally:
        close_all()
        one.start_sshd()


@pytest.mark.cluster
def test_without_config_file_the_users_ssh_config_then_the_systems_are_read(cluster, tmp_path, monkeypatch):
    """README: with no ssh.config_file, imagesync reads ~/.ssh/config of the user it runs as,
    then /etc/ssh/ssh_config (here a file of the test in its place); as ssh, the first value wins."""
    from imagesync.config import sshconfig

    one = cluster.nodes[0]
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    ssh_config(cluster, home / ".ssh" / "config")
    system = tmp_path / "ssh_config"
    system.write_text("Host k8s-worker1\n    Port 1\n    User nobody\nHost *\n    ConnectTimeout 7\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(sshconfig, "SYSTEM_CONFIG", system)
    settings = load_settings(toml(tmp_path), {})
    assert "config_file" not in settings.ssh.model_fields_set
    found = target(settings)
    # the user's file first: its Port and User; the system's for what the user's does not set
    assert (found.host, found.port, found.user) == ("127.0.0.1", one.ssh_port, "root")
    assert found.sources["port"] == "ssh config, Host k8s-worker1"
    assert (found.connect_timeout, found.sources["connect_timeout"]) == (7.0, "ssh config, Host *")
    node = settings.node("k8s-worker1")
    transport = make_transport(settings, node)
    try:
        assert transport.run("echo $CONTAINERD_ADDRESS", timeout=10).stdout.strip() == one.socket
    finally:
        close_all()
        transport.close()


@pytest.mark.cluster
def test_the_jump_hosts_own_host_key_is_checked(cluster, tmp_path):
    one, two = cluster.nodes
    known = tmp_path / "known_hosts"

    def attempt(policy="reject"):
        path = toml(tmp_path, f'config_file = "{ssh_config(cluster, tmp_path / "ssh_config", known)}"\n'
                              f'host_key_policy = "{policy}"\n', nodes='name = "k8s-worker2"\n')
        settings = load_settings(path, {})
        try:
            return make_transport(settings, settings.node("k8s-worker2")).run("true", timeout=10)
        finally:
            close_all()

    known.write_text(two.known_hosts_line() + "\n")  # the node's key, not the jump host's
    with pytest.raises(HostKeyUnknown) as unknown:
        attempt()
    assert unknown.value.node == "k8s-worker2"
    assert unknown.value.message.startswith(f"host key of [127.0.0.1]:{one.ssh_port} (jump host jumphost) is not "
                                            f"in {known}: add it with ssh-keyscan")

    known.write_text(one.known_hosts_line() + "\n")  # the jump host's key, not the node's
    with pytest.raises(HostKeyUnknown) as unknown:
        attempt()
    assert unknown.value.message == (
        f"host key of [{JUMP_ONLY}]:{two.ssh_port} is not in {known}: add it with ssh -p {one.ssh_port} "
        f"root@127.0.0.1 ssh-keyscan -p {two.ssh_port} {JUMP_ONLY} >> {known} (after checking it), "
        'or set ssh.host_key_policy = "accept-new"')

    # accept-new, in the file UserKnownHostsFile names: both keys recorded, then known
    known.write_text("")
    assert attempt("accept-new").ok
    assert sorted(known.read_text().splitlines()) == sorted([one.known_hosts_line(), two.known_hosts_line()])
    assert attempt("reject").ok


@pytest.mark.cluster
def test_a_node_whose_host_key_changes_after_first_contact_is_not_taken_under_accept_new(cluster, tmp_path):
    """accept-new with UserKnownHostsFile /dev/null "recorded" the first key where it is forgotten, and then took
    a changed key as if new: imagesync refuses that combination before any node is reached."""
    one = cluster.nodes[0]
    path = toml(tmp_path, f'config_file = "{ssh_config(cluster, tmp_path / "ssh_config", Path(os.devnull))}"\n'
                          'host_key_policy = "accept-new"\n')

    def contact(settings):
        try:
            return make_transport(settings, settings.node("k8s-worker1")).run("true", timeout=10)
        finally:
            close_all()

    changed = False
    try:
        with pytest.raises(ConfigError, match="keeps nothing"):
            settings = load_settings(path, {})
            assert contact(settings).ok  # first contact
            one.regenerate_host_key()
            changed = True
            contact(settings)  # the same node, with another host key
    finally:
        if changed:
            cluster.known_hosts.write_text("".join(node.known_hosts_line() + "\n" for node in cluster.nodes))
    assert not changed


@pytest.mark.cluster
def test_explicit_imagesync_settings_override_the_ssh_config(cluster, tmp_path):
    one = cluster.nodes[0]
    closed = free_port()
    stranger = generate_key(tmp_path / "stranger", "stranger")
    (tmp_path / "empty_known_hosts").write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(f"""Host k8s-worker1
    HostName 127.0.0.1
    Port {closed}
    User nobody
    IdentityFile {stranger}
    UserKnownHostsFile {tmp_path}/empty_known_hosts
""")
    env = {**os.environ, "COLUMNS": "1000"}

    def check(path):
        return subprocess.run([sys.executable, "-m", "imagesync.cli", "-c", str(path), "check"],
                              env=env, capture_output=True, text=True, timeout=120)

    # the SSH config alone: its port, where nothing listens
    alone = check(toml(tmp_path, f'config_file = "{config}"\n'))
    assert alone.returncode == 1
    assert f"nobody@127.0.0.1:{closed}: connection refused" in " ".join(alone.stdout.replace("│", " ").split())

    path = toml(tmp_path, f'config_file = "{config}"\nknown_hosts = "{cluster.known_hosts}"\n',
                nodes=f'name = "k8s-worker1"\nport = {one.ssh_port}\nuser = "root"\nkey_file = "{cluster.key_file}"\n')
    explicit = check(path)
    assert explicit.returncode == 0, explicit.stdout + explicit.stderr
    text = " ".join(explicit.stdout.replace("│", " ").split())
    assert f"root@127.0.0.1:{one.ssh_port}" in text
    assert "host: ssh config, Host k8s-worker1; port, user, key_file, known_hosts: file" in text
    settings = load_settings(path, {})
    assert target(settings).sources["port"] == f"file {path}"


@pytest.mark.cluster
def test_the_seeds_conf_with_ssh_aliases_checks_and_syncs(cluster, tmp_path):
    one, two = cluster.nodes
    seeded = cluster.seed({"node-1": ["bcm11/alias:1"], "node-2": ["nvidia/alias:2"]})
    wanted = sorted(seeded["node-1"] + seeded["node-2"])
    conf = tmp_path / "image-sync.conf"
    conf.write_text(f"""# the seed tool image-sync.conf, as it was, with this cluster in it
NODE1="k8s-worker1"
NODE2="k8s-worker2"
PREFIX1="{cluster.registry_address}/bcm11"
PREFIX2="{cluster.registry_address}/nvidia"
LOG_DIR="{tmp_path / 'logs'}"
TIME_OUT=60
MAX_PARALLEL=2
""")
    env = {"IMAGESYNC_CONFIG": str(conf), "IMAGESYNC_SSH_CONFIG_FILE": str(ssh_config(cluster, tmp_path / "ssh")),
           "IMAGESYNC_REDIS_URL": cluster.redis.url, "COLUMNS": "1000"}

    def imagesync(*args):
        return subprocess.run([sys.executable, "-m", "imagesync.cli", *args], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=300)

    check = imagesync("check")
    assert check.returncode == 0, check.stdout + check.stderr
    text = " ".join(check.stdout.replace("│", " ").split())
    assert f"k8s-worker1 root@127.0.0.1:{one.ssh_port} " in text
    assert f"k8s-worker2 root@{JUMP_ONLY}:{two.ssh_port} via jumphost (root@127.0.0.1:{one.ssh_port})" in text
    assert "host, port: ssh config, Host k8s-worker1; user, key_file, known_hosts: ssh config, Host *" in text
    shown = imagesync("config", "show").stdout
    assert any([cell.strip() for cell in line.split("│")[1:4]] == ["nodes.k8s-worker2.host", JUMP_ONLY,
                                                                    "ssh config, Host k8s-worker2"]
               for line in shown.splitlines()), shown

    with Services(conf, tmp_path / "services", env=env) as services:
        services.start_all(["k8s-worker1", "k8s-worker2"])
        sync = imagesync("sync", "--wait")
        assert sync.returncode == 0, sync.stdout + sync.stderr
    for node in (one, two):
        assert sorted(ref for ref in node.images() if ref in wanted) == wanted


@contextmanager
def max_startups(node, value: str):
    """Restart ``node``'s sshd with ``MaxStartups value``; back to the cluster's own afterwards."""
    write = node._sshd_config

    def tiny() -> Path:
        path = write()
        text = path.read_text()
        assert "MaxStartups 200\n" in text
        path.write_text(text.replace("MaxStartups 200\n", f"MaxStartups {value}\n"))
        return path

    node.stop_sshd()
    node._sshd_config = tiny
    try:
        node.start_sshd()
        yield
    finally:
        del node._sshd_config
        node.stop_sshd()
        node.start_sshd()


@pytest.mark.cluster
def test_handshakes_sshd_drops_past_max_startups_are_retried(cluster):
    """sshd with "MaxStartups 1:100:1" drops every connection while another is unauthenticated:
    16 at once fail without retries and all get through with them."""
    node = cluster.nodes[0]

    def storm(retries: int) -> list[object]:
        barrier = threading.Barrier(16)
        outcomes: list[object] = [None] * 16

        def connect(index: int) -> None:
            transport = SSHTransport(node.name, host=node.ssh_host, port=node.ssh_port, user=node.ssh_user,
                                     key_file=node.key_file, known_hosts=cluster.known_hosts, connect_timeout=10,
                                     handshake_retries=retries)
            barrier.wait()
            try:
                transport.run("true", timeout=10)
                outcomes[index] = transport.attempts
            except NodeUnreachable as exc:
                outcomes[index] = exc
            finally:
                transport.close()

        threads = [threading.Thread(target=connect, args=(index,)) for index in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return outcomes

    with max_startups(node, "1:100:1"):
        without = storm(0)
        failures = [outcome for outcome in without if isinstance(outcome, NodeUnreachable)]
        assert failures, without
        for failure in failures:
            assert "the connection during the SSH handshake)" in failure.message
            assert "MaxStartups" in failure.message

        retried = storm(HANDSHAKE_RETRIES)
        assert all(isinstance(outcome, int) for outcome in retried), retried
        assert max(retried) > 1  # type: ignore[type-var]
