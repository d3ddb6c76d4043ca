"""The backup registry: configuration, names, exclusions, and on a real cluster a second
``docker-registry`` (with a login) as the backup: filled after a run, refreshed by digest,
restoring an image upstream lost under its original name, and down without harm."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import measured, started_run, wait_for

from imagesync import backup, keys, references, runtimes
from imagesync.backupstore import BACKED_UP, BackupOutcome, BackupStore, abandon_overdue, summary_lines
from imagesync.config import Settings, load_settings
from imagesync.errors import ConfigError
from imagesync.facts import NodeFacts
from imagesync.planning.plan import BACKUP, REGISTRY, Policy
from imagesync.planning.planner import make_plan
from imagesync.planning.policy import policy_for
from imagesync.redisvalues import server_time
from imagesync.runtimes import Image
from imagesync.transport import close_all

BACKUP_PASSWORD = "bk pass 7f3e!"


# -- names, patterns, configuration -------------------------------------------------------------


def test_backup_names_keep_the_original_registry_and_path():
    name = references.backup_name
    assert name("harbor.example.com/b", "nvcr.io/nvidia/cuda:12") == "harbor.example.com/b/nvcr.io/nvidia/cuda:12"
    assert name("127.0.0.1:5001", "127.0.0.1:5000/bcm11/app:1") == "127.0.0.1:5001/127.0.0.1_5000/bcm11/app:1"
    assert name("bk.local/x/", "busybox") == "bk.local/x/docker.io/library/busybox:latest"
    assert name("bk.local", "nvcr.io/a@sha256:" + "a" * 64) is None  # untagged
    assert name("bk.local", "[::1]:5000/a:1") is None


def test_patterns_are_prefixes_exact_images_or_wildcards():
    def matches(image, pattern):
        return references.matches_pattern(references.parse(image), references.validate_pattern(pattern))

    assert matches("nvcr.io/nvidia/cuda:12", "nvcr.io/nvidia")
    assert not matches("nvcr.io/nvidiax/cuda:12", "nvcr.io/nvidia")
    assert matches("docker.io/bcm11/app:1", "bcm11/app:1")
    assert not matches("docker.io/bcm11/app:2", "bcm11/app:1")
    assert matches("reg.local/bcm11/ci-1234:build", "*/ci-*")
    assert matches("docker.io/library/busybox:1", "busybox:*")  # the familiar name too
    with pytest.raises(Exception, match="printable"):
        references.validate_pattern("a b*")


def _toml(tmp_path, text):
    path = tmp_path / "imagesync.toml"
    path.write_text('prefixes = ["bcm11"]\n' + text + '\n[[nodes]]\nname = "w1"\n')
    return path


def test_the_backup_table_and_exclude_load_and_the_password_is_never_shown(tmp_path):
    secret = tmp_path / "bk-password"
    secret.write_text(BACKUP_PASSWORD + "\n")
    settings = load_settings(_toml(tmp_path, f"""exclude = ["bcm11/scratch", "*/ci-*"]
[backup]
registry = "Harbor.example.com:8443/backup/"
username = "robot"
password = "{BACKUP_PASSWORD}"
images = ["bcm11"]
insecure = true
insecure_sources = ["Reg.local:5000"]
"""), {})
    assert settings.backup is not None
    assert settings.backup.registry == "harbor.example.com:8443/backup"
    assert settings.backup.host == "harbor.example.com:8443"
    assert settings.backup.login() == ("robot", BACKUP_PASSWORD)
    assert settings.backup.insecure_sources == ["reg.local:5000"]
    assert settings.exclude == ["bcm11/scratch", "*/ci-*"]
    assert settings.backup.wants("docker.io/bcm11/app:1") and not settings.backup.wants("nvcr.io/x/y:1")
    rows = {key: value for key, value, _ in settings.describe()}
    assert rows["backup"] == "harbor.example.com:8443/backup" and rows["backup.password"] == "****"
    assert BACKUP_PASSWORD not in repr(settings) + repr(settings.describe())
    # from the environment, the password from a file
    env = {"IMAGESYNC_BACKUP_REGISTRY": "bk.local", "IMAGESYNC_BACKUP_USERNAME": "u",
           "IMAGESYNC_BACKUP_PASSWORD_FILE": str(secret), "IMAGESYNC_EXCLUDE": "bcm11/a, bcm11/b"}
    settings = load_settings(_toml(tmp_path, ""), env)
    assert settings.backup is not None and settings.backup.login() == ("u", BACKUP_PASSWORD)
    assert settings.exclude == ["bcm11/a", "bcm11/b"]
    assert settings.sources["backup.registry"] == "env IMAGESYNC_BACKUP_REGISTRY"


@pytest.mark.parametrize(("table", "expected"), [
    ('registry = "https://bk.local"', "backup.registry"),
    ('registry = "backup"', "write host[:port][/path]"),
    ('registry = "bk.local"\nusername = "u"', "a username needs its password"),
    ('registry = "bk.local"\npassword = "p"', "a password needs its username"),
    ('registry = "bk.local"\nimages = ["a b"]', "write an image pattern"),
    ('registry = "bk.local"\nregistery = "x"', "registery"),
])
def test_a_bad_backup_table_is_one_line_naming_the_key(tmp_path, table, expected):
    with pytest.raises(ConfigError) as error:
        load_settings(_toml(tmp_path, "[backup]\n" + table), {})
    assert any(expected in line and "backup" in line for line in error.value.problems), error.value.problems


# -- the planner ----------------------------------------------------------------------------------


def _images(*refs):
    return [Image(id=f"id{i}", tags=(ref,), digests=(ref.rsplit(":", 1)[0] + "@sha256:" + f"{i:064x}",))
            for i, ref in enumerate(refs, 1)]


def test_excluded_images_are_never_wanted_even_when_declared():
    inventories = {"w1": _images("reg.local/bcm11/app:1", "reg.local/bcm11/scratch:1", "reg.local/bcm11/ci-9:1"),
                   "w2": []}
    plan = make_plan(inventories, ["reg.local/bcm11"], declared=["reg.local/bcm11/scratch:2"],
                     exclude=["reg.local/bcm11/scratch", "*/ci-*"])
    assert plan.wanted == ["reg.local/bcm11/app:1"]
    assert plan.missing == {"w2": ["reg.local/bcm11/app:1"]}


def test_with_a_backup_routes_go_registry_then_backup_and_candidates_name_holders():
    settings = Settings(nodes=[{"name": "w1"}, {"name": "w2"}], prefixes=["reg.local"],
                        backup={"registry": "bk.local/b", "images": ["reg.local/bcm11"]})
    assert policy_for(settings).backup
    inventories = {"w1": _images("reg.local/bcm11/app:1", "reg.local/other/x:1"), "w2": []}
    facts = {"w1": NodeFacts(platform="linux/amd64", ctr=True), "w2": NodeFacts(platform="linux/amd64", ctr=True)}
    plan = make_plan(inventories, ["reg.local"], facts=facts, policy=Policy(transfer=False, backup=True))
    assert plan.route("w2", "reg.local/bcm11/app:1").sources == (REGISTRY, BACKUP)
    assert "then backup" in plan.route("w2", "reg.local/bcm11/app:1").describe()
    wanted = backup.candidates(settings, plan)
    assert wanted == {"reg.local/bcm11/app:1": {"name": "bk.local/b/reg.local/bcm11/app:1",
                                                "digest": "sha256:" + f"{1:064x}", "holders": ["w1"]}}


def test_node_commands_quote_names_and_check_the_digest():
    """An insecure backup is tried over HTTPS without verification, then over plain HTTP;
    a secure one gets neither flag; the node's hosts dir applies to both directions."""
    node = {"name": "w1", "endpoint": "unix:///run/k.sock", "hosts_dir": "/etc/containerd/certs.d"}
    settings = Settings(nodes=[node], prefixes=["reg.local"],
                        backup={"registry": "bk.local", "username": "u", "password": "p w", "insecure": True})
    node, bk = settings.nodes[0], settings.backup
    assert bk is not None
    ctr = runtimes.ctr_for(node)
    restore = ctr.restore_command("bk.local/reg.local/a:1", "reg.local/a:1", 30, "sha256:" + "b" * 64,
                                  bk.insecure, bk.login())
    assert restore.startswith("timeout -k 5 30 sh -c ")
    script = shlex.split(restore)[-1]
    pull = "ctr --address /run/k.sock --namespace k8s.io images pull --hosts-dir /etc/containerd/certs.d --user 'u:p w'"
    assert f"{pull} --skip-verify bk.local/reg.local/a:1 " in script
    assert f"{pull} --plain-http bk.local/reg.local/a:1 " in script
    assert "images tag --force bk.local/reg.local/a:1 reg.local/a:1" in script
    assert "images rm bk.local/reg.local/a:1" in script and "sha256:" + "b" * 64 in script
    push = shlex.split(ctr.push_command("bk.local/reg.local/a:1", "reg.local/a:1", 30, bk.insecure, bk.login()))
    assert push[:6] == ["timeout", "-k", "5", "30", "sh", "-c"]
    flags = "--hosts-dir /etc/containerd/certs.d --user 'u:p w' --skip-verify"
    assert f"images push {flags} bk.local/reg.local/a:1 reg.local/a:1 " in push[-1]
    secure = shlex.split(ctr.push_command("bk.local/reg.local/a:1", "reg.local/a:1", 30, False, None))[-1]
    assert "--skip-verify" not in secure and "--plain-http" not in secure
    with pytest.raises(Exception, match="not a valid"):
        ctr.push_command("bk.local/x:1", "reg.local/a:1;reboot", 30, bk.insecure, bk.login())


# -- the record of a run's backup, in a real Redis ----------------------------------------------


def _backed_up(image):
    return BackupOutcome(image, f"bk.local/{image}", BACKED_UP)


def test_a_second_delivery_of_a_backup_changes_nothing_and_the_record_waits_for_every_copy(redis_client):
    """A long backup delivered twice: the second delivery finds fewer images to copy (the first
    copied some) and must not shrink what the record expects, or it would be done while copies run."""
    store = BackupStore(redis_client)
    store.remember("r1", {image: {} for image in "abc"})
    assert store.start("r1", ["a", "b", "c"], 0, 600)
    assert store.record("r1", _backed_up("a")) == 1
    assert not store.start("r1", ["b", "c"], 1, 600)  # the second delivery: the backup holds a now
    assert store.record("r1", _backed_up("b")) == 1  # c still copying: not done
    record = store.get("r1")
    assert (record["status"], record["expected"], record["held"]) == ("running", 3, 0)
    assert store.record("r1", _backed_up("c")) == 2
    assert store.get("r1")["status"] == "done"


def test_a_backup_past_its_deadline_is_abandoned_naming_what_never_came(redis_client):
    """The backup's worker died, or a node asked to push has no worker: the record does not stay
    running for ever. Its deadline passed, a reader or finalize marks it abandoned, with why."""
    store = BackupStore(redis_client)
    redis_client.lpush(keys.HISTORY, "r2")
    store.remember("r2", {image: {} for image in "abc"})
    now = server_time(redis_client)
    assert store.start("r2", ["a", "b", "c"], 0, 600, now=now)
    assert store.record("r2", _backed_up("a")) == 1
    store.pushing("r2", "c", "node-1")
    assert abandon_overdue(redis_client, now=now + 599) == []
    assert store.get("r2")["status"] == "running"
    assert abandon_overdue(redis_client, now=now + 601) == ["r2"]
    record = store.get("r2")
    assert record["status"] == "abandoned" and record["finished"] == pytest.approx(now + 601)
    assert record["reason"] == ("no outcome by its deadline for 2 of 3 images (1 copy by the control worker and "
                                "pushes from node-1): that worker stopped or never took them; the next run's "
                                "backup copies what the backup still lacks")
    assert summary_lines("r2", record)[1] == f"run r2: backup abandoned: {record['reason']}"
    assert store.record("r2", _backed_up("b")) == 0  # a late outcome is kept, and reopens nothing
    assert store.get("r2")["status"] == "abandoned" and abandon_overdue(redis_client, now=now + 700) == []


def _skopeo_raw(reference: str, login: tuple[str, str]) -> bytes:
    """The exact bytes a registry serves for ``reference`` (a manifest or an index)."""
    return subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", ":".join(login),
                           f"docker://{reference}"], check=True, capture_output=True, timeout=60).stdout


def _digest_of(raw: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.mark.cluster
def test_skopeo_copies_between_two_logins_read_from_a_private_file_never_the_command_line(tmp_path, monkeypatch):
    """Real skopeo, a real upstream and a real backup registry, each with its own login."""
    from testcluster.install import ensure_system_packages
    from testcluster.registry import Registry

    ensure_system_packages()
    up_login, bk_login = ("up", "upstream secret"), ("u", BACKUP_PASSWORD)
    with Registry(tmp_path / "upstream", login=up_login) as upstream, \
            Registry(tmp_path / "backup", login=bk_login) as bk:
        settings = Settings(nodes=[{"name": "w1"}], prefixes=[upstream.address],
                            registries={upstream.address: {"username": up_login[0], "password": up_login[1]}},
                            backup={"registry": bk.address, "username": bk_login[0], "password": bk_login[1],
                                    "insecure": True, "insecure_sources": [upstream.address]})
        digest = upstream.push_image("bcm11/a", "1")
        source, target = f"{upstream.address}/bcm11/a:1", f"{bk.address}/{upstream.address.replace(':', '_')}/bcm11/a:1"
        seen = []
        run = subprocess.run

        def watched_run(argv, **kwargs):
            flag = "--authfile" if "--authfile" in argv else "--src-authfile"
            authfile = argv[argv.index(flag) + 1]
            seen.append((argv, json.loads(open(authfile).read()), stat.S_IMODE(os.stat(authfile).st_mode)))
            return run(argv, **kwargs)

        monkeypatch.setattr(backup.subprocess, "run", watched_run)
        with backup.skopeo(settings) as tool:
            state, reason = tool.digest(target)
            assert state == backup.MISSING, reason
            assert tool.digest(f"{bk.address}/other/never:1")[0] == backup.MISSING
            done, reason = tool.copy(source, target)
            assert done, reason
            assert tool.digest(target) == (backup.HELD, digest)
            path = tool.authfile
        assert bk.manifest_digest(f"{upstream.address.replace(':', '_')}/bcm11/a", "1") == digest
        # without the logins, the registries refuse: the auth file is what let skopeo in
        refused = run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{source}"],
                      capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "unauthorized" in refused.stderr.lower(), refused.stderr
    assert path is not None and not path.exists()
    assert len(seen) == 4
    for argv, auths, mode in seen:
        assert not any(BACKUP_PASSWORD in arg or "upstream secret" in arg for arg in argv)
        assert set(auths["auths"]) == {upstream.address, bk.address} and mode == 0o600


# -- on a real cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bk(tmp_path_factory):
    """A 3-node cluster, its workers, and a second docker-registry with a login as the backup."""
    from conftest import Deployment

    from testcluster.cluster import Cluster
    from testcluster.install import ensure_system_packages
    from testcluster.registry import Registry

    ensure_system_packages()
    workdir = tmp_path_factory.mktemp("backup")
    password_file = workdir / "backup-password"
    password_file.write_text(BACKUP_PASSWORD + "\n")
    with Cluster(workdir / "cluster", nodes=3) as cluster, \
            Registry(workdir / "backup-registry", login=("bkuser", BACKUP_PASSWORD)) as registry:
        d = Deployment(cluster, workdir)
        d.backup = registry
        reg = cluster.registry_address
        with d.services:
            d.configure(max_parallel=2, transfer=False, exclude=[f"{reg}/bcm11/scratch"], backup={
                "registry": f"{registry.address}/bk", "username": "bkuser", "password_file": str(password_file),
                "insecure": True, "insecure_sources": [reg]})
            d.start()
            close_all()  # the tests that restore in this process: no transport to another cluster's node
            yield d
            close_all()


def _bk_repo(d, image):
    """The backup registry's repository for a test image, such as ``bk/127.0.0.1_PORT/bcm11/app``."""
    return f"bk/{d.cluster.registry_address.replace(':', '_')}/{image}"


def _backup_done(d, run_id):
    return wait_for(lambda: (d.history(run_id).get("backup") or {}).get("status") == "done" and d.history(run_id),
                    60, f"the backup of run {run_id}")["backup"]


def _secrets_shown(d):
    texts = [p.read_text(errors="replace") for p in d.cluster.log_dir.rglob("*.log")]
    texts += [p.read_text(errors="replace") for p in d.services.workdir.glob("*.log")]
    return [text for text in texts if BACKUP_PASSWORD in text]


@pytest.mark.cluster
def test_a_run_fills_the_backup_by_digest_from_upstream_or_a_node_and_honours_exclude(bk):
    d, c = bk, bk.cluster
    c.seed({"node-1": ["bcm11/app:1", "bcm11/lib:1", "bcm11/scratch:1", "bcm11/local:1"]})
    c.registry.delete_image("bcm11/local", "1")  # only node-1 has it now
    result = d.cli("sync", "--node", "node-2", "--wait")
    run_id = started_run(result)
    record = _backup_done(d, run_id)
    by_image = {r["image"].rsplit("/", 1)[1]: r for r in record["results"]}
    assert {k: (r["status"], r["source"]) for k, r in by_image.items()} == {
        "app:1": ("backed-up", c.registry_address), "lib:1": ("backed-up", c.registry_address),
        "local:1": ("backed-up", "node-1")}
    for image in ("app", "lib", "local"):
        assert d.backup.manifest_digest(_bk_repo(d, f"bcm11/{image}"), "1") == c.digests[c.ref(f"bcm11/{image}:1")]
    # excluded: neither synced nor backed up
    assert c.ref("bcm11/scratch:1") not in d.held("node-2")
    assert d.backup.tags(_bk_repo(d, "bcm11/scratch")) == []
    assert c.ref("bcm11/app:1") in d.held("node-2")
    backup_log = "".join(p.read_text() for p in c.log_dir.glob("*/backup_images.log"))
    line = next(line for line in backup_log.splitlines() if f"image={c.ref('bcm11/local:1')} " in line)
    assert "status=backed-up" in line and line.endswith("source=node-1")
    shown = d.cli("history", run_id, env={"COLUMNS": "1000"})
    assert "backup done: 3 images, 0 already held; 3 backed-up" in shown.stdout

    # a tag in the backup that points elsewhere is refreshed; what it holds is left alone
    d.backup.push_image(_bk_repo(d, "bcm11/lib"), "1", size=2048)
    status = d.cli("status", "--backup", "--json")
    states = {i["image"].rsplit("/", 1)[1]: i["state"] for i in json.loads(status.stdout)["images"]}
    assert status.returncode == 1 and states == {"app:1": "held", "lib:1": "stale", "local:1": "held"}
    again = _backup_done(d, started_run(d.cli("sync", "--node", "node-2", "--wait")))
    assert (again["held"], [(r["image"].rsplit("/", 1)[1], r["status"]) for r in again["results"]]) == (
        2, [("lib:1", "backed-up")])
    assert d.backup.manifest_digest(_bk_repo(d, "bcm11/lib"), "1") == c.digests[c.ref("bcm11/lib:1")]
    status = d.cli("status", "--backup")
    assert status.returncode == 0 and "3 of 3 images held" in status.stdout, status.stdout + status.stderr

    # the backup's password: not in config show, the logs, or any command imagesync runs on this host
    shown = d.cli("config", "show", env={"COLUMNS": "1000"})
    assert shown.returncode == 0 and BACKUP_PASSWORD not in shown.stdout and "backup-password" in shown.stdout
    assert _secrets_shown(d) == []


@pytest.mark.cluster
def test_an_image_deleted_upstream_reaches_a_new_node_from_the_backup_under_its_original_name(bk):
    d, c = bk, bk.cluster
    c.seed({"node-1": ["bcm11/kept:1"]})
    _backup_done(d, started_run(d.cli("sync", "--node", "node-2", "--wait")))
    ref = c.ref("bcm11/kept:1")
    c.registry.delete_image("bcm11/kept", "1")
    result = d.cli("sync", "--node", "node-3", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    run = d.history(started_run(result))
    restored = {r["image"]: r for r in run["results"] if r["status"] == "restored"}
    assert restored[ref]["source"] == f"{d.backup.address}/bk"
    measured("restore of a 1 KiB image from the backup", f"{restored[ref]['duration']:.2f} s")
    held = c.node("node-3").images()
    assert held[ref] == c.digests[ref]
    assert not any(name.startswith(d.backup.address) for name in held)  # the backup name is gone
    # the kubelet finds it by its original name (the CRI's ImageStatus)
    with c.node("node-3").image_client() as client:
        image, _ = client.status(ref)
    assert image is not None and ref in image.repo_tags
    assert f"{ref} restored from {d.backup.address}/bk" in d.services.log("worker-node-3")


@pytest.mark.cluster
def test_a_backup_that_is_down_fails_its_copies_and_the_run_still_completes(bk):
    d, c = bk, bk.cluster
    c.seed({"node-1": ["nvidia/fresh:1"]})
    d.backup.stop()
    try:
        result = d.cli("sync", "--node", "node-2", "--wait")
        run_id = started_run(result)
        run = d.history(run_id)
        assert run["status"] == "completed"
        assert c.ref("nvidia/fresh:1") in d.held("node-2")
        record = _backup_done(d, run_id)
        failed = {r["image"]: r["reason"] for r in record["results"] if r["status"] == "failed"}
        assert c.ref("nvidia/fresh:1") in failed
        assert all("cannot ask the backup registry" in reason and "connection refused" in reason
                   for reason in failed.values()), failed
        shown = d.cli("history", run_id, env={"COLUMNS": "1000"}).stdout
        assert f"backup of {c.ref('nvidia/fresh:1')} failed: cannot ask the backup registry" in shown
        assert "backup done" in d.services.log("control")
        # status --backup: what the backup holds is unknown, with the reason, and it exits 1
        status = d.cli("status", "--backup", "--json")
        images = json.loads(status.stdout)["images"]
        assert status.returncode == 1 and c.ref("nvidia/fresh:1") in {i["image"] for i in images}, status.stderr
        assert {i["state"] for i in images} == {"unknown"}, images
        assert all("connection refused" in i["reason"] for i in images), images
        table = d.cli("status", "--backup", env={"COLUMNS": "1000"})
        assert table.returncode == 1 and "unknown: " in table.stdout and "0 of " in table.stdout, table.stdout
    finally:
        d.backup.start()


@pytest.mark.cluster
def test_a_restore_refuses_a_backup_that_holds_another_digest_than_the_cluster_runs(bk):
    """docs/configuration.md: the node "refuses it if it is not the digest the cluster runs"."""
    d, c = bk, bk.cluster
    c.seed({"node-1": ["bcm11/swapped:1"]})
    ref = c.ref("bcm11/swapped:1")
    _backup_done(d, started_run(d.cli("sync", "--node", "node-2", "--wait")))
    other = d.backup.push_image(_bk_repo(d, "bcm11/swapped"), "1", size=2048)  # the backup's tag, elsewhere
    c.registry.delete_image("bcm11/swapped", "1")
    run_id = started_run(d.cli("sync", "--node", "node-3", "--wait"))
    _backup_done(d, run_id)  # (it then pushes node-1's image back into the backup)
    outcome = next(r for r in d.history(run_id)["results"] if r["image"] == ref)
    assert outcome["status"] == "failed", outcome
    assert f"the backup holds {other}, not the digest the cluster runs ({c.digests[ref]})" in outcome["reason"]
    held = c.node("node-3").images()
    assert ref not in held and not any(name.startswith(d.backup.address) for name in held)


@pytest.mark.cluster
def test_a_restore_never_runs_a_forged_digest_on_the_node(bk, tmp_path):
    """Route fields arrive in a task's arguments: a digest such as ``$(touch FILE)`` must not
    reach the node's shell. The restore line refuses it where it is built, with the reason,
    and the node runs nothing."""
    from imagesync.attempt import Attempt
    from imagesync.planning.plan import BACKUP, Route
    from imagesync.restore import from_backup

    d, c = bk, bk.cluster
    d.backup.push_image(_bk_repo(d, "bcm11/forged"), "1")  # the backup holds it: the pull would succeed
    marker = tmp_path / "forged-digest-ran"
    settings = load_settings(d.config_path)
    forged = Route(sources=(BACKUP,), digest=f"$(touch {marker})")
    outcome, retry = from_backup(Attempt(settings, settings.node("node-3"), c.ref("bcm11/forged:1"), forged))
    assert not marker.exists()
    assert (outcome.status, retry) == ("failed", False), outcome
    assert outcome.reason == "refused: not a content digest (algorithm:hex, e.g. sha256:...)", outcome.reason
    assert c.ref("bcm11/forged:1") not in c.node("node-3").images()


@pytest.mark.cluster
def test_a_multi_platform_index_is_backed_up_whole(bk, tmp_path):
    """docs/configuration.md: skopeo "keeps every platform of an index and its digest"."""
    from testcluster.image import write_oci_index

    d, c = bk, bk.cluster
    layout = tmp_path / "index"
    digest = write_oci_index(layout, "bcm11/multi", "1", ["linux/amd64", "linux/arm64", "linux/arm/v7"])
    subprocess.run(["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:1",
                    f"docker://{c.registry_address}/bcm11/multi:1"], check=True, capture_output=True, timeout=60)
    ref = c.ref("bcm11/multi:1")
    c.node("node-1").pull(ref)  # the node takes its platform's manifest, and reports the index's digest
    assert c.node("node-1").images()[ref] == digest
    record = _backup_done(d, started_run(d.cli("sync", "--node", "node-2", "--wait")))
    assert {r["image"]: r["status"] for r in record["results"]}.get(ref) == "backed-up", record
    login = ("bkuser", BACKUP_PASSWORD)
    backed_up = f"{d.backup.address}/{_bk_repo(d, 'bcm11/multi')}"
    raw = _skopeo_raw(f"{backed_up}:1", login)
    assert _digest_of(raw) == digest  # the index itself, byte for byte
    upstream = json.loads((layout / "blobs/sha256" / digest.split(":")[1]).read_text())["manifests"]
    assert json.loads(raw)["manifests"] == upstream
    for entry in upstream:  # every platform's manifest, not only the nodes' own
        assert _digest_of(_skopeo_raw(f"{backed_up}@{entry['digest']}", login)) == entry["digest"]


@pytest.mark.cluster
def test_on_a_crictl_only_node_the_backup_source_fails_with_its_reason(tmp_path):
    """docs/configuration.md: a crictl-only node "could pull the backup name but the CRI has no
    call that renames an image, so there the backup source fails with that reason". node-2 is
    served by its agent, on the node, whose PATH has crictl and no ctr."""
    from conftest import Deployment

    from testcluster.cluster import Cluster
    from testcluster.install import ensure_system_packages
    from testcluster.registry import Registry

    ensure_system_packages()
    without_ctr = tmp_path / "bin-without-ctr"
    without_ctr.mkdir()
    for folder in ("/usr/sbin", "/usr/bin"):
        for tool in sorted(Path(folder).iterdir()):
            if tool.name != "ctr" and not (without_ctr / tool.name).exists():
                (without_ctr / tool.name).symlink_to(tool)
    with Cluster(tmp_path / "cluster", nodes=2) as cluster, Registry(tmp_path / "backup-registry") as registry:
        cluster.seed({"node-1": ["bcm11/app:1"]})
        ref = cluster.ref("bcm11/app:1")
        node = cluster.node("node-2")
        node.stop_sshd()  # the agent's node: no SSH
        d = Deployment(cluster, tmp_path)
        d.configure(nodes=["node-1"], agents=True, transfer=False, backup={
            "registry": f"{registry.address}/bk", "insecure": True, "insecure_sources": [cluster.registry_address]})
        environment = {**node.environment, "NODE_NAME": "node-2", "PATH": f"{node.bin_dir}:{without_ctr}"}
        with d.services:
            d.services.start_control(wait=False)
            d.services.start_worker("node-1", wait=False)
            d.services.start_agent("node-2", environment, "--endpoint", f"unix://{node.socket}", wait=False)
            for name in ("control", "worker-node-1", "agent-node-2"):
                d.services.wait_ready(name)
            _backup_done(d, started_run(d.cli("sync", "--node", "node-1", "--wait")))
            cluster.registry.delete_image("bcm11/app", "1")
            run_id = started_run(d.cli("sync", "--node", "node-2", "--wait"))
            outcome = next(r for r in d.history(run_id)["results"] if r["image"] == ref)
            assert outcome["status"] == "failed", outcome
            assert ("ctr is not installed on node-2: a crictl-only node can pull the backup name but cannot "
                    "give the image its original name back; install containerd's ctr") in outcome["reason"]
            assert ref not in node.images()


@pytest.mark.cluster
def test_a_push_asked_of_a_node_without_its_worker_leaves_the_backup_abandoned_not_running(bk):
    """Upstream lost an image only node-1 holds: the backup asks node-1 to push it, on node-1's
    queue, but node-1's worker is gone. Past the record's deadline (moved here once the record
    is seen running), ``history`` shows the backup abandoned, naming node-1, not running for ever."""
    from redis import Redis

    d, c = bk, bk.cluster
    c.seed({"node-1": ["bcm11/orphan:1"]})
    c.registry.delete_image("bcm11/orphan", "1")
    d.services.stop("worker-node-1")
    try:
        run_id = started_run(d.cli("sync", "--node", "node-2", "--wait"))

        def waiting_for_the_push():
            record = d.history(run_id).get("backup") or {}
            return record.get("status") == "running" and record["expected"] - len(record["results"]) == 1 and record

        record = wait_for(waiting_for_the_push, 60, "the backup to wait for node-1's push")
        assert record["deadline"] > record["started"]
        redis = Redis.from_url(c.redis.url)
        redis.hset(keys.run_backup(run_id), "deadline", server_time(redis) - 1)
        shown = d.cli("history", run_id, env={"COLUMNS": "1000"})
        assert "backup abandoned: no outcome by its deadline for 1 of " in shown.stdout, shown.stdout
        assert "(pushes from node-1): that worker stopped or never took them" in shown.stdout, shown.stdout
        assert d.history(run_id)["backup"]["status"] == "abandoned"
    finally:
        d.services.start_worker("node-1")
