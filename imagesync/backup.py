"""The backup registry kept complete: every synced image copied into a registry you control.

Names: an image is kept as ``<backup>/<original registry>/<path>:<tag>``
(:func:`imagesync.references.backup_name`), so one backup holds images of
many registries, and a restored image gets its original name back. Restoring
from the backup is a source of a pull (:mod:`imagesync.restore`).

Keeping the backup complete (:func:`back_up`, the ``imagesync.backup`` task
sent on the control queue when a run completes): for every wanted image the
run's plan recorded, it asks the backup for the digest of the backup name and
copies what is missing or points elsewhere, registry to registry with
``skopeo`` on the control host, by the digest the nodes hold. When upstream
no longer has that digest, a node that holds it pushes it
(:func:`push_from_node`, the ``imagesync.backup_push`` task on that node's
queue, under its ``time_out`` and ``max_parallel``).

Why skopeo: it is Debian's registry-to-registry copier (containers/image),
copies an index with all its platforms without unpacking anything
(``--all --preserve-digests``), reads credentials from a file (``--authfile``)
rather than the command line, and needs no daemon.

The outcomes of a run's backup (``backed-up``, ``failed``) go into a record
beside the run record, ``backup_images.log`` of the day's log folder, the log,
and ``imagesync history RUN`` (:mod:`imagesync.backupstore`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import references, runtimes
from .backupstore import BACKED_UP, BACKUP_FAILED, BackupOutcome, BackupStore, report
from .budgets import KILL_AFTER, SSH_GRACE, stale_after
from .errors import NodeError, RefusedReference
from .planning.plan import most_held
from .transport import PROGRESS_TAIL, transport_for

if TYPE_CHECKING:
    from redis import Redis

    from .config import Node, Settings
    from .planning.plan import Plan

log = logging.getLogger("imagesync")

#: what the backup holds of one image, as ``status --backup`` says it
HELD, MISSING, STALE, UNKNOWN = "held", "missing", "stale", "unknown"
#: registry answers that mean "no such image" rather than "cannot tell"
_NOT_THERE = re.compile(r"manifest unknown|name unknown|not found|404", re.IGNORECASE)
_SKOPEO_NOISE = re.compile(r'^time="[^"]*" level=\w+ msg="?|"$')
#: seconds skopeo may run past its own --command-timeout before it is killed
SKOPEO_GRACE = 10


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
            result = subprocess.run(argv, capture_output=True, timeout=seconds + SKOPEO_GRACE,
                                    stdin=subprocess.DEVNULL)
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
        if not store.start(run_id, [found.image for found in todo], len(checks) - len(todo),
                           record_deadline(settings, len(todo))):
            return store.get(run_id)  # a redelivered task: the first one did it
        if not todo:
            log.info("run %s: backup holds all %d images", run_id, len(checks))
        with ThreadPoolExecutor(max_workers=min(settings.max_parallel, max(1, len(todo)))) as pool:
            list(pool.map(lambda found: _bring(settings, store, run_id, found, tool, send_push), todo))
    return store.get(run_id)


def record_deadline(settings: Settings, copies: int) -> float:
    """Seconds a backup's record may take to fill once started: its copies, ``max_parallel``
    at a time, each within skopeo's time; then a push from a node, which may wait behind a
    pull in that node's queue (``stale_after``) and takes ``time_out`` with its graces. Past
    it, the record is abandoned (:mod:`imagesync.backupstore`)."""
    rounds = -(-copies // settings.max_parallel)
    push = settings.time_out + KILL_AFTER + SSH_GRACE + stale_after(settings)
    return rounds * (settings.time_out + SKOPEO_GRACE) + push


def _bring(settings: Settings, store: BackupStore, run_id: str, found: Check, tool: Skopeo,
           send_push: SendPush) -> None:
    """Copy one image into the backup: from upstream, else by a push from a node that holds it."""
    started = time.monotonic()

    def done(status: str, source: str = "", reason: str = "") -> None:
        outcome = BackupOutcome(found.image, found.name, status, source, reason,
                                round(time.monotonic() - started, 3))
        report(settings, store, run_id, outcome)

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
        store.pushing(run_id, found.image, found.holders[0])
        send_push(found.holders[0], run_id, found.image, found.name)
        return
    done(BACKUP_FAILED, reason=f"from {ref.domain}: {reason}; no node that holds it can push it (ctr needed)")


def push_from_node(settings: Settings, redis: Redis, run_id: str, node: Node, image: str, name: str) -> BackupOutcome:
    """Push ``image`` from ``node``'s content store to the backup as ``name``, and report it."""
    assert settings.backup is not None
    started = time.monotonic()
    status, reason = BACKED_UP, ""
    try:
        command = runtimes.ctr_for(node).push_command(name, image, settings.time_out, settings.backup.insecure,
                                                       settings.backup.login())
        result = transport_for(settings, node).run(command, timeout=settings.time_out + KILL_AFTER + SSH_GRACE,
                                                   tail=PROGRESS_TAIL)
        if result.exit_code in runtimes.TIMEOUT_EXIT_CODES:
            status, reason = BACKUP_FAILED, f"push did not finish within time_out ({settings.time_out} s)"
        elif not result.ok:
            status, reason = BACKUP_FAILED, "push: " + runtimes.failure_reason(result.stderr, result.stdout)
    except RefusedReference as exc:
        status, reason = BACKUP_FAILED, f"refused: {exc.reason}"
    except NodeError as exc:
        status, reason = BACKUP_FAILED, exc.message
    outcome = BackupOutcome(image, name, status, node.name, reason, round(time.monotonic() - started, 3))
    report(settings, BackupStore(redis), run_id, outcome)
    return outcome
