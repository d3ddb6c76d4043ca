"""Container runtime adapters: the commands run on a node, and their output parsed.

Two runtimes are supported, chosen per node:

* ``crictl`` talks to the kubelet's CRI image service (containerd, CRI-O):
  ``crictl images -o json`` and ``crictl pull``.
* ``ctr`` talks to containerd directly: ``ctr -n k8s.io images ls`` and
  ``ctr -n k8s.io images pull`` (honouring the node's registry hosts dir).

This package is the one place that builds command lines for a node: here the
listings, the pulls, and ``ctr``'s copy between nodes (export, import, a
presence check), restore from the backup registry and push into it; in
:mod:`.removal`, prune's (which images containers use, and a removal); in :mod:`.peercopy`,
the copy a node runs itself from a peer (``peer_ssh``). Every argument that is not a constant
is shell-quoted, and image references and digests are only ever passed after
:mod:`imagesync.references` has accepted them: some arrive in a task's
arguments, and the lines run as root. Every command but a listing or a version
query runs whole under the node's own ``timeout``, so that nothing of it stays on the node when
the task that started it gives up or is killed (closing an SSH channel stops
nothing there), even when containerd hangs.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .. import references
from ..budgets import KILL_AFTER

if TYPE_CHECKING:
    from ..config import Node
    from ..transport import CommandResult

#: exit codes of coreutils ``timeout``: the command timed out, or was killed after it
TIMEOUT_EXIT_CODES = {124, 137}
#: exit code of a shell for a command that does not exist
COMMAND_NOT_FOUND = 127


@dataclass(frozen=True)
class Image:
    """One image as a node's runtime reports it (names as reported, unvalidated)."""

    id: str
    tags: tuple[str, ...] = ()
    digests: tuple[str, ...] = ()
    size: int = 0
    pinned: bool = False
    #: the other names the runtime keeps it under: containerd's CRI names each image
    #: ``sha256:<config digest>`` too (the crictl id), which ``ctr images ls`` lists as a row
    aliases: tuple[str, ...] = ()


#: (username, password) for a private registry
Login = tuple[str, str]


@dataclass(frozen=True)
class PullCommand:
    command: str
    #: the seconds the node-side ``timeout`` allows the runtime
    seconds: int


class Runtime(Protocol):
    @property
    def name(self) -> str: ...

    def list_command(self) -> str: ...

    def parse_list(self, output: str) -> list[Image]: ...

    def pull_command(
        self, reference: str, time_out: int, login: Login | None = None, check: bool = False,
        platform: str | None = None, also_as: str | None = None, pin: bool = False, expect: str | None = None,
    ) -> PullCommand: ...

    def version_command(self) -> str: ...


#: the label containerd's CRI (1.7 and later) keeps an image under, out of the kubelet's image GC
PINNED_LABEL = "io.cri-containerd.pinned=pinned"
#: what a checked pull prints instead of pulling when the node already holds the image
PRESENT_MARKER = "imagesync: already present"
#: the first line of an export (the digest exported) and the last of an import (what it did)
EXPORT_MARKER, IMPORT_MARKER = "imagesync-export", "imagesync-import"
#: exit status of an import whose image arrived under another digest than the source's
WRONG_DIGEST = 65
#: what a restore prints last: the digest pulled from the backup, and the one the original name now has
RESTORED_MARKER = "imagesync-restored"


def _pull_under_timeout(pull: str, time_out: int, presence_test: str | None = None) -> PullCommand:
    """``pull`` under the node's ``timeout``; with ``presence_test``, one command that
    asks first and pulls only if the answer is no.

    The question and the pull share one SSH round trip and one time budget, so
    the task's time limits cover the whole of it. ``exec`` makes the pull the
    process that ``timeout`` signals.
    """
    if presence_test is not None:
        script = f"if {presence_test}; then echo {shlex.quote(PRESENT_MARKER)}; exit 0; fi; exec {pull}"
        pull = f"sh -c {shlex.quote(script)}"
    return PullCommand(f"timeout -k {KILL_AFTER} {int(time_out)} {pull}", int(time_out))


def under_timeout(script: str, seconds: int) -> str:
    """``script`` as one ``sh`` under the node's ``timeout``, which signals the whole process
    group: the shell and every ``ctr`` it started end when time is up."""
    return f"timeout -k {KILL_AFTER} {int(seconds)} sh -c {shlex.quote(script)}"


def found_present(result: CommandResult) -> bool:
    """Whether a checked pull found the image already there (and pulled nothing)."""
    return result.ok and PRESENT_MARKER in result.stdout


def checked(reference: str) -> str:
    """The reference, shell-quoted, after the grammar has accepted it."""
    references.parse(reference)
    return shlex.quote(reference)


@dataclass(frozen=True)
class Crictl:
    """``crictl`` against the CRI image service (the endpoint from the node's env by default)."""

    endpoint: str | None = None
    name: str = field(default="crictl", init=False)

    def _base(self) -> str:
        if self.endpoint:
            return f"crictl --image-endpoint {shlex.quote(self.endpoint)}"
        return "crictl"

    def list_command(self) -> str:
        return f"{self._base()} images -o json"

    def version_command(self) -> str:
        return f"{self._base()} --version"

    def pull_command(
        self, reference: str, time_out: int, login: Login | None = None, check: bool = False,
        platform: str | None = None, also_as: str | None = None, pin: bool = False, expect: str | None = None,
    ) -> PullCommand:
        """``crictl pull``; with ``check``, first the CRI's ImageStatus (``inspecti``),
        which exits 0 only if the node holds the image (with ``expect``, under that digest:
        a moved tag held under its old digest is not present).

        The CRI has neither a platform to choose (the runtime pulls its own)
        nor a way to tag or label: ``platform``, ``also_as`` and ``pin`` are not used.
        """
        creds = f" --creds {shlex.quote(':'.join(login))}" if login else ""
        ref = checked(reference)
        found = f"| grep -qF {shlex.quote(references.parse_digest(expect))}" if expect else ">/dev/null"
        presence = f"{self._base()} inspecti -q {ref} 2>/dev/null {found}" if check else None
        return _pull_under_timeout(f"{self._base()} pull{creds} {ref}", time_out, presence)

    def parse_list(self, output: str) -> list[Image]:
        """Parse ``crictl images -o json``."""
        try:
            document = json.loads(output or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"crictl images printed something that is not JSON: {exc}") from exc
        images = []
        for item in document.get("images") or []:
            images.append(
                Image(
                    id=str(item.get("id", "")),
                    tags=tuple(str(tag) for tag in item.get("repoTags") or ()),
                    digests=tuple(str(d) for d in item.get("repoDigests") or ()),
                    size=_int(item.get("size")),
                    pinned=bool(item.get("pinned", False)),
                )
            )
        return images


@dataclass(frozen=True)
class Ctr:
    """``ctr`` against containerd, in the kubelet's namespace by default."""

    address: str | None = None
    namespace: str = "k8s.io"
    hosts_dir: str | None = None
    name: str = field(default="ctr", init=False)

    def _base(self) -> str:
        parts = ["ctr"]
        if self.address:
            parts += ["--address", shlex.quote(self.address.removeprefix("unix://"))]
        parts += ["--namespace", shlex.quote(self.namespace)]
        return " ".join(parts)

    def list_command(self) -> str:
        return f"{self._base()} images ls"

    def version_command(self) -> str:
        return "ctr --version"

    def pull_command(
        self, reference: str, time_out: int, login: Login | None = None, check: bool = False,
        platform: str | None = None, also_as: str | None = None, pin: bool = False, expect: str | None = None,
    ) -> PullCommand:
        """``ctr images pull``; with ``check``, first ``ctr images ls -q name==REF``,
        which prints the reference only if the node holds it (with ``expect``, the
        listing must name that digest: a moved tag held under its old digest is not present).

        ``platform`` (``os/arch[/variant]``) pulls that platform's manifest
        rather than the node's own; ``also_as`` names the pulled image a
        second time (``ctr images tag``), as a per-architecture entry's ``ref``;
        ``pin`` labels it ``io.cri-containerd.pinned=pinned``, which the
        kubelet's image GC skips (containerd 1.7 and later honour it).
        """
        hosts = f" --hosts-dir {shlex.quote(self.hosts_dir)}" if self.hosts_dir else ""
        user = f" --user {shlex.quote(':'.join(login))}" if login else ""
        chosen = f" --platform {shlex.quote(platform)}" if platform else ""
        ref = checked(reference)
        presence = None
        if check:
            quiet = "" if expect else " -q"  # the digest is a column of the full listing
            listing = f"{self._base()} images ls{quiet} {shlex.quote('name==' + reference)} 2>/dev/null"
            presence = (f"{listing} | grep -qF {shlex.quote(references.parse_digest(expect))}" if expect
                        else f'[ -n "$({listing})" ]')
        pull = f"{self._base()} images pull{hosts}{user}{chosen} {ref}"
        steps = []
        if also_as:
            steps.append(f"{self._base()} images tag --force {ref} {checked(also_as)} >/dev/null")
        if pin:
            for name in (ref, checked(also_as)) if also_as else (ref,):
                steps.append(f"{self._base()} images label {name} {PINNED_LABEL} >/dev/null")
        if steps:
            # one process for timeout to signal; the tag and label only after a pull that succeeded
            script = " && ".join([pull, *steps])
            pull = f"sh -c {shlex.quote(script)}"
        return _pull_under_timeout(pull, time_out, presence)

    def _digest_of(self, reference: str) -> str:
        """A shell expression: the manifest digest the node holds ``reference`` under ("" if none).

        Its ``ctr`` has no timeout of its own: every command that uses it runs under one."""
        checked(reference)
        listing = f"{self._base()} images ls {shlex.quote('name==' + reference)} 2>/dev/null"
        return f"$({listing} | awk 'NR==2 {{print $3}}')"

    def presence_command(self, reference: str, time_out: int) -> str:
        """Prints the digest the node holds ``reference`` under (an empty line if none), under
        the node's ``timeout``: exits 0 either way, 124 or 137 when containerd did not answer."""
        return under_timeout(f'echo "{self._digest_of(reference)}"', time_out)

    def export_command(self, reference: str, time_out: int, platform: str | None = None) -> str:
        """First a line ``EXPORT_MARKER DIGEST`` (the digest the node holds ``reference``
        under, empty if none), then ``ctr images export`` of it as a tar, on stdout;
        both under the node's ``timeout``."""
        ref = checked(reference)
        only = f" --platform {shlex.quote(platform)}" if platform else ""
        script = f'echo "{EXPORT_MARKER} {self._digest_of(reference)}"; exec {self._base()} images export{only} - {ref}'
        return under_timeout(script, time_out)

    def import_command(self, reference: str, digest: str, time_out: int, platform: str | None = None) -> str:
        """``ctr images import`` of a tar on stdin, under the node's ``timeout``, then a check that
        ``reference`` arrived under ``digest``: a name the import left under any other digest, or
        left behind by a failed import, is removed. Prints ``IMPORT_MARKER STATUS BEFORE AFTER
        REMOVED`` last; exits with the import's status, or 65 when the digest was wrong. The checks
        and the removal run under a ``timeout`` :data:`~imagesync.budgets.KILL_AFTER` s longer."""
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ValueError(f"not a manifest digest: {digest!r}")
        return under_timeout(self.import_script(reference, shlex.quote(digest), time_out, platform),
                             int(time_out) + KILL_AFTER)

    def import_script(self, reference: str, digest_word: str, time_out: int, platform: str | None = None) -> str:
        """The shell lines of :meth:`import_command`, the digest given as a shell word: a
        quoted digest, or the variable a copy the node runs itself sets (:mod:`.peercopy`)."""
        ref = checked(reference)
        only = f" --platform {shlex.quote(platform)}" if platform else ""
        imported = _pull_under_timeout(f"{self._base()} images import{only} -", time_out).command
        return (
            f"before={self._digest_of(reference)}; {imported}; status=$?; "
            f"after={self._digest_of(reference)}; removed=0; "
            f'if [ -n "$after" ] && [ "$after" != "$before" ] && '
            f'{{ [ $status -ne 0 ] || [ "$after" != {digest_word} ]; }}; then '
            f"{self._base()} images rm {ref} >/dev/null 2>&1; removed=1; fi; "
            f'echo "{IMPORT_MARKER} $status ${{before:--}} ${{after:--}} $removed"; '
            f'if [ $status -eq 0 ] && [ "$after" != {digest_word} ]; then exit {WRONG_DIGEST}; fi; exit $status'
        )

    def restore_command(self, name: str, image: str, seconds: int, digest: str | None = None,
                        insecure: bool = False, login: Login | None = None) -> str:
        """One command line that restores ``image`` from its backup ``name`` (another registry).

        Pull the backup name; with ``digest``, refuse a backup that holds another one;
        tag it with the original name; remove the backup name; print
        ``RESTORED_MARKER PULLED NOW``, the digest pulled and the one ``image`` now has.
        Both names must pass the OCI grammar and ``digest`` the digest grammar
        (:class:`~imagesync.errors.RefusedReference` otherwise): they may come from a
        task's arguments, and the line runs as root on the node.
        """
        ctr = self._base()
        bk, orig = checked(name), checked(image)
        got = f"$({ctr} images ls {shlex.quote('name==' + name)} | awk 'NR==2 {{print $3}}')"
        expected = shlex.quote("" if digest is None else references.parse_digest(digest))
        script = "; ".join([
            _to_registry(f"{ctr} images pull{self._registry_flags(login)}", bk, insecure),
            f"got={got}; want={expected}",
            f'if [ -n "$want" ] && [ "$got" != "$want" ]; then {ctr} images rm {bk} >/dev/null 2>&1; '
            'echo "the backup holds $got, not the digest the cluster runs ($want)" >&2; exit 3; fi',
            f"{ctr} images tag --force {bk} {orig} >/dev/null; rc=$?",
            f"{ctr} images rm {bk} >/dev/null 2>&1",
            'if [ "$rc" -ne 0 ]; then exit "$rc"; fi',
            f"now=$({ctr} images ls {shlex.quote('name==' + image)} | awk 'NR==2 {{print $3}}')",
            f'echo "{RESTORED_MARKER} $got $now"',
        ])
        return under_timeout(script, seconds)

    def push_command(self, name: str, image: str, seconds: int, insecure: bool = False,
                     login: Login | None = None) -> str:
        """``ctr images push NAME IMAGE``: the node's own copy of ``image`` pushed as ``name``."""
        push = _to_registry(f"{self._base()} images push{self._registry_flags(login)}",
                            f"{checked(name)} {checked(image)}", insecure)
        return under_timeout(push, seconds)

    def _registry_flags(self, login: Login | None) -> str:
        """How ``ctr`` reaches a registry other than the node's own (a restore's, a push's):
        through the node's hosts dir, where a CA or a mirror for it may be configured."""
        flags = f" --hosts-dir {shlex.quote(self.hosts_dir)}" if self.hosts_dir else ""
        if login is not None:
            # ctr reads a password only from the command line or a terminal
            flags += f" --user {shlex.quote(':'.join(login))}"
        return flags

    def parse_list(self, output: str) -> list[Image]:
        """Parse ``ctr images ls``: one row per reference, grouped here by manifest digest.

        Rows are ``REF TYPE DIGEST SIZE PLATFORMS LABELS`` with a two-word
        size (``2.7 MiB``). containerd's CRI plugin also keeps ``sha256:<id>``
        rows (image ids) and ``repo@sha256:...`` rows (repo digests).
        """
        by_digest: dict[str, dict[str, list[str] | int]] = {}
        for line in output.splitlines()[1:]:
            columns = line.split()
            if len(columns) < 5:
                continue
            ref, digest = columns[0], columns[2]
            entry = by_digest.setdefault(digest, {"tags": [], "digests": [], "aliases": [], "size": 0})
            entry["size"] = _size(columns[3], columns[4])
            if re.fullmatch(r"sha256:[0-9a-f]{64}", ref):
                entry["aliases"].append(ref)  # type: ignore[union-attr]
                continue
            if "@" in ref:
                entry["digests"].append(ref)  # type: ignore[union-attr]
            else:
                entry["tags"].append(ref)  # type: ignore[union-attr]
                repo = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
                entry["digests"].append(f"{repo}@{digest}")  # type: ignore[union-attr]
        images = []
        for digest, entry in by_digest.items():
            tags = tuple(entry["tags"])  # type: ignore[arg-type]
            digests = tuple(dict.fromkeys(entry["digests"]))  # type: ignore[arg-type]
            if tags or digests:
                images.append(Image(id=digest, tags=tags, digests=digests, size=int(entry["size"]),  # type: ignore[arg-type]
                                    aliases=tuple(entry["aliases"])))  # type: ignore[arg-type]
        return images


#: what Go's HTTP client says when a registry answers HTTPS in plain HTTP
_HTTP_ANSWER = "server gave HTTP response to HTTPS client"


def _to_registry(command: str, target: str, insecure: bool) -> str:
    """Shell lines: ``command TARGET``, its output discarded, exiting with its status if it fails.

    ``insecure`` (``backup.insecure``) means what it means for skopeo: HTTPS without
    verifying the certificate (``--skip-verify``), and plain HTTP (``--plain-http``)
    only when the registry answers in plain HTTP. ctr knows no such fallback.
    """
    if not insecure:
        return f"{command} {target} >/dev/null || exit $?"
    return (f'err=$({command} --skip-verify {target} 2>&1 >/dev/null) || {{ rc=$?; case "$err" in '
            f"*{shlex.quote(_HTTP_ANSWER)}*) {command} --plain-http {target} >/dev/null || exit $?;; "
            '*) echo "$err" >&2; exit "$rc";; esac; }')


_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
          "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}


def _size(number: str, unit: str) -> int:
    try:
        return int(float(number) * _UNITS.get(unit, 1))
    except ValueError:
        return 0


def _int(value: object) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def for_node(node: Node) -> Runtime:
    """The runtime adapter configured for ``node`` (a :class:`imagesync.config.Node`)."""
    if node.runtime == "ctr":
        return ctr_for(node)
    return Crictl(endpoint=node.endpoint)


def ctr_for(node: Node) -> Ctr:
    """containerd's own client on ``node``, at its endpoint and in its namespace, whichever
    runtime the node lists images with: a restore, a push and a copy need ``ctr``."""
    return Ctr(address=node.endpoint, namespace=node.namespace, hosts_dir=node.hosts_dir)


# A failed pull's reason decides whether trying again can help. Permanent
# reasons are checked first: "not found" wins over a 5xx in the same text.
_PERMANENT = re.compile(
    r"not found|manifest unknown|name unknown|unauthorized|denied|forbidden|"
    r"\b40[0134]\b|invalid reference|no space left|no match for platform",
    re.IGNORECASE,
)
_TRANSIENT = re.compile(
    r"connection reset|connection refused|broken pipe|i/o timeout|timeout|"
    r"temporary failure|no route to host|unexpected eof|\beof\b|"
    r"\b5\d\d\b|service unavailable|bad gateway|internal server error|too many requests|\b429\b|"
    # the runtime itself restarting under the pull (gRPC's Unavailable)
    r"code = unavailable",
    re.IGNORECASE,
)


def is_transient(reason: str) -> bool:
    """Whether a pull that failed with ``reason`` may succeed if tried again."""
    if _PERMANENT.search(reason):
        return False
    return bool(_TRANSIENT.search(reason))


def failure_reason(stderr: str, stdout: str = "") -> str:
    """The runtime's own reason for a failed pull, on one line."""
    text = (stderr.strip() or stdout.strip()).splitlines()
    # crictl and ctr print the reason last, prefixed with log noise such as
    # 'E1122 10:00:00.000 1234 remote_image.go:171] PullImage ... failed:'
    lines = [line for line in text if line.strip()]
    reason = lines[-1] if lines else "no output"
    reason = re.sub(r"^(?:[EFW]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\]\s*|time=\"[^\"]*\" level=\w+ msg=)", "", reason)
    return reason.strip().strip('"')[:500]
