"""The backup registry: every synced image kept in a registry you control, and restored from it.

Names: an image is kept as ``<backup>/<original registry>/<path>:<tag>``
(:func:`imagesync.references.backup_name`), so one backup holds images of
many registries, and a restored image gets its original name back.

* **Restore** (:func:`from_backup`, the ``backup`` source of a pull's route,
  tried after the registry and before other nodes): the node pulls the backup
  name with ``ctr``, checks its digest, tags it with the original name and
  removes the backup name. A node without ``ctr`` (a crictl-only node) cannot
  do it: the CRI pulls, but has no call that gives an image another name.
* **Keeping the backup complete** (:func:`back_up`, the ``imagesync.backup``
  task sent on the control queue when a run completes): for every wanted image
  the run's plan recorded, it asks the backup for the digest of the backup name
  and copies what is missing or points elsewhere, registry to registry with
  ``skopeo`` on the control host, by the digest the nodes hold. When upstream
  no longer has that digest, a node that holds it pushes it
  (:func:`push_from_node`, the ``imagesync.backup_push`` task on that node's
  queue, under its ``time_out`` and ``max_parallel``).

Why skopeo: it is Debian's registry-to-registry copier (containers/image),
copies an index with all its platforms without unpacking anything
(``--all --preserve-digests``), reads credentials from a file (``--authfile``)
rather than the command line, and needs no daemon.

The outcomes of a run's backup (``backed-up``, ``failed``) go into a record
beside the run record (:class:`BackupStore`), ``backup_images.log`` of the
day's log folder, the log, and ``imagesync history RUN``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import keys, logs, references, runtimes
from .attempt import Attempt
from .budgets import KILL_AFTER, SSH_GRACE
from .errors import CommandTimedOut, NodeError, RefusedReference
from .planning.plan import most_held
from .redisvalues import as_text
from .runs import FAILED, RESTORED, TIMED_OUT, Outcome
from .transport import transport_for

if TYPE_CHECKING:
    from redis import Redis

    from .config import Node, Settings
    from .config.backup import BackupSettings
    from .planning.plan import Plan

log = logging.getLogger("imagesync")

#: outcomes of backing up one image
BACKED_UP, BACKUP_FAILED = "backed-up", "failed"
#: what the backup holds of one image, as ``status --backup`` says it
HELD, MISSING, STALE, UNKNOWN = "held", "missing", "stale", "unknown"
#: the day's log of backup outcomes
BACKUP_LOG = "backup_images.log"
#: what the node prints once the image is restored: the backup's digest and the original's
RESTORED_MARKER = "imagesync-restored"
#: registry answers that mean "no such image" rather than "cannot tell"
_NOT_THERE = re.compile(r"manifest unknown|name unknown|not found|404", re.IGNORECASE)
_SKOPEO_NOISE = re.compile(r'^time="[^"]*" level=\w+ msg="?|"$')


def _ctr(node: Node) -> str:
    """``ctr`` with the node's socket and namespace: the restore and the push need
    containerd's own client, whichever runtime the node lists images with."""
    return runtimes.Ctr(address=node.endpoint, namespace=node.namespace)._base()


def _ctr_registry_flags(backup: BackupSettings) -> str:
    flags = " --plain-http" if backup.insecure else ""
    login = backup.login()
    if login is not None:
        # ctr reads a password only from the command line or a terminal
        flags += f" --user {shlex.quote(':'.join(login))}"
    return flags


# -- restore ------------------------------------------------------------------------------------


def restore_command(node: Node, backup: BackupSettings, image: str, name: str, seconds: int,
                    digest: str | None = None) -> str:
    """One command line that restores ``image`` on ``node`` from its backup ``name``.

    Pull the backup name; with ``digest``, refuse a backup that holds another one;
    tag it with the original name; remove the backup name; print both digests.
    """
    ctr = _ctr(node)
    bk, orig = shlex.quote(name), shlex.quote(image)
    got = f"$({ctr} images ls {shlex.quote('name==' + name)} | awk 'NR==2 {{print $3}}')"
    expected = shlex.quote(digest or "")
    script = "; ".join([
        f"{ctr} images pull{_ctr_registry_flags(backup)} {bk} >/dev/null || exit $?",
        f"got={got}",
        f'if [ -n {expected} ] && [ "$got" != {expected} ]; then {ctr} images rm {bk} >/dev/null 2>&1; '
        f'echo "the backup holds $got, not the digest the cluster runs ({digest})" >&2; exit 3; fi',
        f"{ctr} images tag --force {bk} {orig} >/dev/null; rc=$?",
        f"{ctr} images rm {bk} >/dev/null 2>&1",
        'if [ "$rc" -ne 0 ]; then exit "$rc"; fi',
        f"now=$({ctr} images ls {shlex.quote('name==' + image)} | awk 'NR==2 {{print $3}}')",
        f'echo "{RESTORED_MARKER} $got $now"',
    ])
    return f"timeout -k {KILL_AFTER} {int(seconds)} sh -c {shlex.quote(script)}"


def from_backup(attempt: Attempt) -> tuple[Outcome, bool]:
    """Restore the attempt's image on its node from the backup registry, under its original name.

    The outcome is ``restored`` with the backup registry as its source; a
    failure is permanent unless the node or the backup may answer later.
    """
    settings, node = attempt.settings, attempt.node
    started = time.monotonic()
    backup = settings.backup

    def outcome(status: str, reason: str = "") -> Outcome:
        return Outcome(node.name, attempt.image, status, round(time.monotonic() - started, 3), reason,
                       source=backup.registry if backup is not None and status == RESTORED else "")

    if backup is None:
        return outcome(FAILED, "no backup registry is configured ([backup] registry)"), False
    try:
        image = references.normalize(attempt.image)
        name = references.backup_name(backup.registry, image)
    except RefusedReference as exc:
        return outcome(FAILED, f"refused: {exc.reason}"), False
    if name is None:
        return outcome(FAILED, "the backup keeps tagged images only: this one has no tag"), False
    seconds = max(1, min(settings.time_out, attempt.remaining()))
    command = restore_command(node, backup, image, name, seconds, attempt.route.digest)
    try:
        result = transport_for(settings, node).run(command, timeout=seconds + KILL_AFTER + SSH_GRACE)
    except CommandTimedOut as exc:
        return outcome(TIMED_OUT, exc.message), False
    except NodeError as exc:
        return outcome(FAILED, exc.message), exc.transient
    if result.exit_code in runtimes.TIMEOUT_EXIT_CODES:
        reason = f"restore from the backup did not finish within {seconds} s; stopped on the node"
        return outcome(TIMED_OUT, reason), False
    if result.exit_code == runtimes.COMMAND_NOT_FOUND:
        return outcome(FAILED, f"ctr is not installed on {node.name}: a crictl-only node can pull the backup name "
                               "but cannot give the image its original name back; install containerd's ctr"), False
    if not result.ok:
        reason = "backup: " + runtimes.failure_reason(result.stderr, result.stdout)
        return outcome(FAILED, reason), runtimes.is_transient(reason)
    line = next((line for line in result.stdout.splitlines() if line.startswith(RESTORED_MARKER)), "")
    digests = line.split()[1:]
    if len(digests) != 2 or not digests[0] or digests[0] != digests[1]:
        return outcome(FAILED, f"restored from {name}, but {image} does not point at the digest pulled "
                               f"({' vs '.join(digests) or 'no digest'})"), False
    return outcome(RESTORED), False


# -- what the backup should hold ----------------------------------------------------------------


def candidates(settings: Settings, plan: Plan) -> dict[str, dict[str, Any]]:
    """The wanted images of ``plan`` the backup keeps: image -> its backup name, the
    digest most nodes hold (None when no node reports one) and the nodes that hold
    that digest and can push it (they have ``ctr``)."""
    backup = settings.backup
    if backup is None:
        return {}
    chosen: dict[str, dict[str, Any]] = {}
    for image in plan.wanted:
        name = references.backup_name(backup.registry, image)
        if name is None or not backup.wants(image):
            continue
        by_digest = plan.by_digest(image)
        digest = most_held(by_digest) if by_digest else None
        holders = [node for node in by_digest.get(digest or "", [])
                   if node in plan.facts and plan.facts[node].ctr]
        chosen[image] = {"name": name, "digest": digest, "holders": holders}
    return chosen


# -- the registries, through skopeo --------------------------------------------------------------


class Skopeo:
    """``skopeo`` on this host, with the logins of the configuration in a private auth file."""

    def __init__(self, settings: Settings, authfile: Path | None) -> None:
        assert settings.backup is not None
        self.settings = settings
        self.backup = settings.backup
        self.authfile = authfile

    def _run(self, args: list[str]) -> tuple[int, bytes, str]:
        """(exit code, stdout as bytes, stderr): a manifest's digest is that of its exact bytes."""
        seconds = self.settings.time_out
        argv = ["skopeo", "--command-timeout", f"{seconds}s", *args]
        try:
            result = subprocess.run(argv, capture_output=True, timeout=seconds + 10, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return 124, b"", f"skopeo did not finish within time_out ({seconds} s)"
        except FileNotFoundError:
            return 127, b"", "skopeo is not installed on the control host: apt-get install skopeo"
        return result.returncode, result.stdout, result.stderr.decode(errors="replace")

    def _auth(self) -> list[str]:
        return ["--authfile", str(self.authfile)] if self.authfile else []

    def _tls(self, host: str, flag: str) -> list[str]:
        insecure = self.backup.insecure if host == self.backup.host else host in self.backup.insecure_sources
        return [f"{flag}=false"] if insecure else []

    def digest(self, reference: str) -> tuple[str, str]:
        """(HELD, digest), (MISSING, reason) or (UNKNOWN, reason) for ``reference`` in its registry."""
        host = references.parse(reference).domain
        code, stdout, stderr = self._run(["inspect", "--raw", *self._tls(host, "--tls-verify"), *self._auth(),
                                          f"docker://{reference}"])
        if code == 0:
            return HELD, "sha256:" + hashlib.sha256(stdout).hexdigest()
        reason = skopeo_reason(stderr)
        return (MISSING if _NOT_THERE.search(reason) else UNKNOWN), reason

    def copy(self, source: str, target: str) -> tuple[bool, str]:
        """Copy ``source`` to ``target``, every platform, digests kept; (done, reason)."""
        src_host, dst_host = references.parse(source).domain, references.parse(target).domain
        auth = ["--src-authfile", str(self.authfile), "--dest-authfile", str(self.authfile)] if self.authfile else []
        code, _, stderr = self._run(["copy", "--all", "--preserve-digests", "--quiet",
                                     *self._tls(src_host, "--src-tls-verify"),
                                     *self._tls(dst_host, "--dest-tls-verify"),
                                     *auth, f"docker://{source}", f"docker://{target}"])
        return code == 0, skopeo_reason(stderr)


def skopeo_reason(stderr: str) -> str:
    """skopeo's reason, without its log prefix."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "no output"
    return _SKOPEO_NOISE.sub("", text).replace('\\"', '"').strip()[:500]


@contextmanager
def skopeo(settings: Settings) -> Iterator[Skopeo]:
    """A :class:`Skopeo` whose auth file (mode 0600, removed afterwards) holds the backup's
    login and every ``[registries]`` login: never a password on a command line."""
    assert settings.backup is not None
    auths: dict[str, dict[str, str]] = {}
    for host in settings.registries:
        login = settings.login_for(host)
        if login is not None:
            auths[host] = {"auth": base64.b64encode(":".join(login).encode()).decode()}
    backup_login = settings.backup.login()
    if backup_login is not None:
        auths[settings.backup.host] = {"auth": base64.b64encode(":".join(backup_login).encode()).decode()}
    if not auths:
        yield Skopeo(settings, None)
        return
    with tempfile.TemporaryDirectory(prefix="imagesync-auth-") as folder:  # mode 0700
        path = Path(folder) / "auth.json"
        path.touch(mode=0o600)
        path.write_text(json.dumps({"auths": auths}))
        yield Skopeo(settings, path)


@dataclass
class Check:
    """What the backup holds of one wanted image."""

    image: str
    name: str
    #: the digest the nodes hold (None when none reports one)
    digest: str | None
    state: str
    backup_digest: str | None = None
    reason: str = ""
    holders: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(settings: Settings, wanted: Mapping[str, Mapping[str, Any]], tool: Skopeo) -> list[Check]:
    """Ask the backup about every image of ``wanted`` (see :func:`candidates`), in parallel."""

    def one(image: str) -> Check:
        entry = wanted[image]
        state, answer = tool.digest(entry["name"])
        found = Check(image, entry["name"], entry["digest"], state, holders=list(entry.get("holders", ())))
        if state == HELD:
            found.backup_digest = answer
            if entry["digest"] and answer != entry["digest"]:
                found.state = STALE
        else:
            found.reason = answer
        return found

    images = sorted(wanted)
    if not images:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(images))) as pool:
        return list(pool.map(one, images))


# -- the record of a run's backup ---------------------------------------------------------------

# An outcome reports; returns 0 if the backup is not running, 2 if this outcome
# completed it, 1 otherwise. An outcome reported twice counts once (HSET).
_RECORD = """
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HLEN', KEYS[2]) >= tonumber(redis.call('HGET', KEYS[1], 'expected')) then
    redis.call('HSET', KEYS[1], 'status', 'done', 'finished', ARGV[3])
    return 2
end
return 1
"""


@dataclass
class BackupOutcome:
    """What backing up one image did."""

    image: str
    name: str
    status: str
    #: where the copy came from: the upstream registry, or the node that pushed it
    source: str = ""
    reason: str = ""
    duration: float = 0.0
    finished: float = field(default_factory=time.time)

    def describe(self) -> str:
        return self.status + (f" from {self.source}" if self.source else "")


class BackupStore:
    """The backup record of each run, beside its run record."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._record = redis.register_script(_RECORD)

    def remember(self, run_id: str, wanted: Mapping[str, Mapping[str, Any]]) -> None:
        """What the run's backup is to check, written when the run is planned."""
        self.redis.hset(keys.run_backup(run_id), mapping={
            "status": "pending", "candidates": json.dumps(wanted, separators=(",", ":"))})

    def candidates(self, run_id: str) -> dict[str, dict[str, Any]] | None:
        raw = self.redis.hget(keys.run_backup(run_id), "candidates")
        return None if raw is None else json.loads(as_text(raw))

    def start(self, run_id: str, expected: int, held: int) -> bool:
        """Mark the backup running with ``expected`` outcomes to come; False if it already started."""
        with self.redis.pipeline() as pipe:
            pipe.hsetnx(keys.run_backup(run_id), "started", repr(time.time()))
            pipe.hset(keys.run_backup(run_id), mapping={"expected": expected, "held": held})
            first = pipe.execute()[0]
        if not first:
            return False
        self.redis.hset(keys.run_backup(run_id), mapping={
            "status": "running" if expected else "done",
            **({} if expected else {"finished": repr(time.time())})})
        return True

    def record(self, run_id: str, outcome: BackupOutcome) -> int:
        return int(self._record(keys=[keys.run_backup(run_id), keys.run_backup_results(run_id)],
                                args=[outcome.image, json.dumps(asdict(outcome)), repr(time.time())]))

    def get(self, run_id: str) -> dict[str, Any] | None:
        """The backup record as ``history`` shows it; None for a run without a backup."""
        raw = self.redis.hgetall(keys.run_backup(run_id))
        if not raw:
            return None
        data = {as_text(k): as_text(v) for k, v in raw.items()}
        results = [json.loads(as_text(v)) for v in self.redis.hvals(keys.run_backup_results(run_id))]
        counts: dict[str, int] = {}
        for result in results:
            counts[result["status"]] = counts.get(result["status"], 0) + 1
        return {
            "status": data.get("status", "pending"),
            "images": len(json.loads(data.get("candidates", "{}"))),
            "held": int(data.get("held", 0)),
            "expected": int(data.get("expected", 0)),
            "counts": counts,
            "started": float(data["started"]) if data.get("started") else None,
            "finished": float(data["finished"]) if data.get("finished") else None,
            "results": sorted(results, key=lambda r: r["image"]),
        }


def summary_lines(run_id: str, record: Mapping[str, Any]) -> list[str]:
    """The backup's part of a run summary: one line, then one per failure."""
    counts = ", ".join(f"{n} {status}" for status, n in sorted(record["counts"].items()))
    lines = [f"run {run_id}: backup {record['status']}: {record['images']} images, {record['held']} already held"
             + (f"; {counts}" if counts else "")]
    for result in record["results"]:
        if result["status"] != BACKED_UP:
            lines.append(f"run {run_id}: backup of {result['image']} {result['status']}: {result['reason']}")
    return lines


def _report(settings: Settings, store: BackupStore, run_id: str, outcome: BackupOutcome) -> None:
    state = store.record(run_id, outcome)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(outcome.finished))
    line = (f"{stamp} run={run_id} image={outcome.image} backup={outcome.name} status={outcome.status}"
            f" duration={outcome.duration:.1f}s" + (f" source={outcome.source}" if outcome.source else ""))
    if outcome.reason:
        line += ' reason="{}"'.format(outcome.reason.replace("\n", " ").replace('"', "'"))
    try:
        logs.append(settings.log_dir, BACKUP_LOG, line, outcome.finished)
    except OSError as exc:
        logs.report_unwritable(settings.log_dir, exc)
    level = logging.INFO if outcome.status == BACKED_UP else logging.WARNING
    log.log(level, "run %s: backup of %s %s in %.1f s%s", run_id, outcome.image, outcome.describe(),
            outcome.duration, f": {outcome.reason}" if outcome.reason else "")
    if state == 2:
        record = store.get(run_id)
        if record is not None:
            for i, text in enumerate(summary_lines(run_id, record)):
                failed = any(r["status"] != BACKED_UP for r in record["results"])
                log.log(logging.WARNING if failed and i else logging.INFO, text)


# -- a run's backup ------------------------------------------------------------------------------

#: send_push(node, run_id, image, name): queue a push from ``node`` on its own queue
SendPush = Callable[[str, str, str, str], None]


def back_up(settings: Settings, redis: Redis, run_id: str, send_push: SendPush) -> dict[str, Any] | None:
    """Bring the backup up to date with what run ``run_id`` planned; its record (None without a backup).

    Every image the backup lacks, or holds under another digest, is copied from
    upstream by the digest the nodes hold; what upstream no longer has is pushed
    from a node that holds it. A backup that cannot be reached fails each image
    with the reason, and the run it follows is not affected.
    """
    if settings.backup is None:
        return None
    store = BackupStore(redis)
    wanted = store.candidates(run_id)
    if wanted is None:
        return None
    with skopeo(settings) as tool:
        checks = check(settings, wanted, tool)
        todo = [found for found in checks if found.state != HELD]
        if not store.start(run_id, len(todo), len(checks) - len(todo)):
            return store.get(run_id)  # a redelivered task: the first one did it
        if not todo:
            log.info("run %s: backup holds all %d images", run_id, len(checks))
        with ThreadPoolExecutor(max_workers=min(settings.max_parallel, max(1, len(todo)))) as pool:
            list(pool.map(lambda found: _bring(settings, store, run_id, found, tool, send_push), todo))
    return store.get(run_id)


def _bring(settings: Settings, store: BackupStore, run_id: str, found: Check, tool: Skopeo,
           send_push: SendPush) -> None:
    """Copy one image into the backup: from upstream, else by a push from a node that holds it."""
    started = time.monotonic()

    def done(status: str, source: str = "", reason: str = "") -> None:
        outcome = BackupOutcome(found.image, found.name, status, source, reason,
                                round(time.monotonic() - started, 3))
        _report(settings, store, run_id, outcome)

    if found.state == UNKNOWN:
        done(BACKUP_FAILED, reason=f"cannot ask the backup registry: {found.reason}")
        return
    ref = references.parse(found.image)
    source = f"{ref.repository}@{found.digest}" if found.digest else found.image
    copied, reason = tool.copy(source, found.name)
    if copied:
        done(BACKED_UP, ref.domain)
        return
    if found.holders:
        log.info("run %s: %s cannot be copied from %s (%s): %s pushes it", run_id, found.image, ref.domain,
                 reason, found.holders[0])
        send_push(found.holders[0], run_id, found.image, found.name)
        return
    done(BACKUP_FAILED, reason=f"from {ref.domain}: {reason}; no node that holds it can push it (ctr needed)")


def push_command(node: Node, backup: BackupSettings, image: str, name: str, seconds: int) -> str:
    """``ctr images push NAME IMAGE``: the node's own copy of ``image`` pushed as ``name``."""
    references.parse(image)
    references.parse(name)
    push = f"{_ctr(node)} images push{_ctr_registry_flags(backup)} {shlex.quote(name)} {shlex.quote(image)}"
    return f"timeout -k {KILL_AFTER} {int(seconds)} {push}"


def push_from_node(settings: Settings, redis: Redis, run_id: str, node: Node, image: str, name: str) -> BackupOutcome:
    """Push ``image`` from ``node``'s content store to the backup as ``name``, and report it."""
    assert settings.backup is not None
    started = time.monotonic()
    status, reason = BACKED_UP, ""
    try:
        command = push_command(node, settings.backup, image, name, settings.time_out)
        result = transport_for(settings, node).run(command, timeout=settings.time_out + KILL_AFTER + SSH_GRACE)
        if result.exit_code in runtimes.TIMEOUT_EXIT_CODES:
            status, reason = BACKUP_FAILED, f"push did not finish within time_out ({settings.time_out} s)"
        elif not result.ok:
            status, reason = BACKUP_FAILED, "push: " + runtimes.failure_reason(result.stderr, result.stdout)
    except RefusedReference as exc:
        status, reason = BACKUP_FAILED, f"refused: {exc.reason}"
    except NodeError as exc:
        status, reason = BACKUP_FAILED, exc.message
    outcome = BackupOutcome(image, name, status, node.name, reason, round(time.monotonic() - started, 3))
    _report(settings, BackupStore(redis), run_id, outcome)
    return outcome
