"""An agent node copies an image from another agent node: its containerd pulls it from the
holder's agent (:mod:`imagesync.peerserve`) as from a registry mirror.

The pull runs on the target node, by its own agent: ``ctr images pull --hosts-dir DIR``,
where ``DIR`` holds one ``hosts.toml`` for the image's registry that names the holder's
agent as its only host (plain HTTP on the fleet's network, the fleet's token in a
``header`` entry). The holder's server is also the ``server`` of that file, so a holder
that fails is never silently replaced by the registry: the copy fails, and the pull
hands over to the next holder, then to the registry, as for any copy
(:func:`imagesync.transfer.from_peers`). The file lives in a private temporary
directory of the agent for the length of the pull: the token never appears in a
command line.

The image is pulled by digest, the one the plan says its holders hold (else the one
the holder names for the tag), and then tagged with its name: containerd checks the
manifest and every blob against that digest, so a holder that holds the tag under
another digest, or sends other bytes, fails the copy; one that holds the layers the
target already has is asked only for the others. The bytes go from the holder's
node to the target's containerd, through no imagesync process on any other machine.
"""

from __future__ import annotations

import re
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import keys, references, runtimes
from .attempt import Attempt
from .budgets import KILL_AFTER, SSH_GRACE
from .errors import CommandTimedOut, NodeError, RefusedReference
from .peerserve import fleet_token
from .redisvalues import as_text
from .transport import transport_for

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis import Redis

#: seconds the holder's agent has to say which digest it holds a tag under
ASK_TIMEOUT = 10.0
#: seconds between two refreshes of the holder's serving slot while the pull runs
REFRESH = 10.0
#: what an agent registers as its server's address: host or [IPv6]:port
ADDRESS = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")


@dataclass
class Mirrored:
    """How one copy from one holder's agent ended (what :class:`imagesync.transfer.Copied` says)."""

    ok: bool
    reason: str = ""
    transient: bool = False
    size: int = 0


def peer_of(redis: Redis, name: str) -> str:
    """``host:port`` where the agent of node ``name`` serves its images ("" if it does not,
    or registered something else: it goes into a URL and a TOML file)."""
    address = as_text(redis.hget(keys.agent(name), "peer") or b"")
    return address if ADDRESS.fullmatch(address) else ""


def serving_agents(redis: Redis) -> set[str]:
    """The registered agents that serve their node's images to peers."""
    names = [as_text(name) for name in redis.zrange(keys.AGENTS, 0, -1)]  # type: ignore[union-attr]
    with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hget(keys.agent(name), "peer")
        peers = pipe.execute()
    return {name for name, peer in zip(names, peers, strict=True) if peer}


def hosts_toml(address: str, token: str) -> str:
    """A ``hosts.toml`` whose only host is the holder's agent at ``address``: as the mirror,
    and as the server containerd tries after it (each with the token: containerd 1.6 takes
    a top-level ``header`` table only beside a ``host`` one)."""
    url = f"http://{address}"
    return (f'server = "{url}"\n\n'
            '[header]\n'
            f'  Authorization = "Bearer {token}"\n\n'
            f'[host."{url}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            f'  [host."{url}".header]\n'
            f'    Authorization = "Bearer {token}"\n')


def holder_digest(address: str, token: str, image: str, timeout: float = ASK_TIMEOUT) -> str:
    """The manifest digest the holder's agent serves ``image`` (``host/repo:tag``) under.
    :class:`LookupError` with the reason if it does not answer with one."""
    parsed = references.parse(image)
    url = f"http://{address}/v2/{parsed.path}/manifests/{parsed.tag or 'latest'}?ns={parsed.domain}"
    request = urllib.request.Request(url, method="HEAD", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - http to a peer
            digest = answer.headers.get("Docker-Content-Digest", "")
    except urllib.error.HTTPError as exc:
        raise LookupError(f"its agent answered {exc.code} {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise LookupError(f"its agent at {address} does not answer ({exc})") from None
    if not digest:
        raise LookupError("its agent named no digest")
    return digest


def mirror_copy(attempt: Attempt, source: str, image: str, progress: Callable[[], object] | None = None
                ) -> Mirrored:
    """Pull ``image`` onto the attempt's node from ``source``'s agent; see the module's docstring."""
    node, route, redis = attempt.node, attempt.route, attempt.redis
    if redis is None:
        return Mirrored(False, "no Redis to find the holder's agent in")
    address = peer_of(redis, source)
    if not address:
        return Mirrored(False, f"the agent of {source} serves no copies (no agent_peer_port), or is gone")
    token = fleet_token(redis)
    digest = route.digest
    if digest is None:
        try:
            digest = holder_digest(address, token, image, min(ASK_TIMEOUT, max(1, attempt.remaining())))
        except LookupError as exc:
            return Mirrored(False, str(exc))
    try:
        by_digest = f"{references.parse(image).repository}@{references.parse_digest(digest)}"
    except RefusedReference as exc:
        return Mirrored(False, f"the holder's digest is refused: {exc.reason}")
    seconds = max(1, attempt.remaining())
    with tempfile.TemporaryDirectory(prefix="imagesync-peer-") as hosts:
        directory = Path(hosts) / references.parse(image).domain
        directory.mkdir(mode=0o700)
        (directory / "hosts.toml").write_text(hosts_toml(address, token))
        ctr = replace(runtimes.ctr_for(node), hosts_dir=hosts)
        command = ctr.pull_command(by_digest, seconds, platform=route.platform, also_as=image, pin=route.pin)
        return _pull(attempt, command.command, seconds, progress, address)


def _pull(attempt: Attempt, command: str, seconds: int, progress: Callable[[], object] | None,
          address: str) -> Mirrored:
    """Run the pull on the node, keeping the holder's serving slot while it runs."""
    done = threading.Event()
    if progress is not None:
        def keep() -> None:
            while not done.wait(REFRESH):
                progress()
        threading.Thread(target=keep, name="serving slot", daemon=True).start()
    try:
        result = transport_for(attempt.settings, attempt.node).run(
            command, timeout=seconds + KILL_AFTER + SSH_GRACE)
    except CommandTimedOut:
        return Mirrored(False, f"copy did not finish within time_out ({attempt.settings.time_out} s)")
    except NodeError as exc:
        return Mirrored(False, exc.message, exc.transient)
    finally:
        done.set()
    if result.ok:
        return Mirrored(True)
    if result.exit_code in runtimes.TIMEOUT_EXIT_CODES:
        return Mirrored(False, f"the pull from {address} did not finish within time_out")
    reason = runtimes.failure_reason(result.stderr, result.stdout)
    return Mirrored(False, f"the pull from {address} failed (exit {result.exit_code}): {reason}",
                    runtimes.is_transient(reason))
