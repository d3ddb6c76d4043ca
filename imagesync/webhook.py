"""``imagesync webhook``: registry push notifications start a sync of the pushed image.

A registry calls it on every push: a CNCF distribution registry (its
``notifications: endpoints``) or Harbor (a webhook policy on ``Artifact
pushed``). The receiver checks the shared secret in the ``Authorization``
header, keeps the pushed images that are valid references under a configured
prefix (or declared), and adds them to a Redis set (``keys.WEBHOOK_PENDING``).

A loop in the same process starts the runs: once no push has arrived for
``QUIET`` seconds and no run holds the lock, it sends one ``imagesync.sync``
(``trigger="webhook"``) with every pending image. A run removes them from the
set only once it has sent their pulls (:mod:`imagesync.pending`): a run that
fails before leaves them pending, and the loop sends them again, backing off
while runs keep failing; a push that arrives during a run stays in the set and
is run as soon as the lock frees.

A process of its own, like the exporter: a prefork worker's main process
should not serve HTTP, and a registry's notification must never wait behind a
sync task. It is served with tornado, which Flower already brings.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import tornado.httpserver
import tornado.ioloop
import tornado.web
from redis import Redis
from redis.exceptions import RedisError

from . import keys, references
from .errors import RefusedReference
from .pending import Pending

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("imagesync")

#: the largest notification accepted; a registry's envelopes are a few KiB
MAX_BODY = 1 << 20
#: seconds without a new push before the pending images are run (a burst is one run)
QUIET = 1.0
#: how often the loop looks at the pending images, in seconds
TICK = 0.5
#: seconds after which a sync task sent and never answered no longer holds back the next
SENT_PATIENCE = 120.0
#: after a run that left its images pending: wait this long before the next, doubled each time, capped
RETRY_BASE, RETRY_CAP = 5.0, 300.0

#: Harbor's event type for a push
HARBOR_PUSH = "PUSH_ARTIFACT"


class BadPayload(ValueError):
    """A body that is not a notification this receiver understands."""


@dataclass
class Pushed:
    """What one notification said was pushed, and what was kept of it."""

    kept: list[str] = field(default_factory=list)
    #: (name, reason) for names that failed the reference grammar
    refused: list[tuple[str, str]] = field(default_factory=list)
    #: valid names outside every prefix and not declared
    outside: list[str] = field(default_factory=list)
    #: events that were not an image push (blobs, pulls, pushes by digest only)
    ignored: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.kept, "refused": [{"reference": n, "reason": r} for n, r in self.refused],
                "outside": self.outside, "ignored": self.ignored}


def _is_manifest(media_type: str) -> bool:
    return "manifest" in media_type or "image.index" in media_type


def pushed_names(payload: Any) -> tuple[list[str], int]:
    """The image names a notification says were pushed, in order, once each; and
    how many events it ignored. Raises BadPayload for anything else."""
    if not isinstance(payload, dict):
        raise BadPayload("not a JSON object")
    names: list[str] = []
    ignored = 0
    if isinstance(payload.get("events"), list):  # CNCF distribution envelope
        for event in payload["events"]:
            if not isinstance(event, dict):
                raise BadPayload("an event that is not an object")
            target: dict[str, Any] = event["target"] if isinstance(event.get("target"), dict) else {}
            request: dict[str, Any] = event["request"] if isinstance(event.get("request"), dict) else {}
            tag, repo = target.get("tag"), target.get("repository")
            media_type = str(target.get("mediaType") or "")
            # A manifest list is one push by tag and one push by digest for each
            # of its manifests: only the push by tag counts. Blobs have no tag.
            if (event.get("action") != "push" or not isinstance(tag, str) or not tag or not isinstance(repo, str)
                    or (media_type and not _is_manifest(media_type))):
                ignored += 1
                continue
            host = request.get("host") or urlsplit(str(target.get("url") or "")).netloc
            if not isinstance(host, str) or not host:
                ignored += 1
                continue
            names.append(f"{host}/{repo}:{tag}")
    elif payload.get("type") is not None:  # Harbor
        if payload.get("type") != HARBOR_PUSH:
            return [], 1
        data = payload.get("event_data")
        if not isinstance(data, dict) or not isinstance(data.get("resources"), list):
            raise BadPayload("a Harbor event without event_data.resources")
        for resource in data["resources"]:
            if not isinstance(resource, dict) or not isinstance(resource.get("resource_url"), str):
                ignored += 1
                continue
            url, tag, digest = resource["resource_url"], resource.get("tag"), resource.get("digest")
            # resource_url is host/project/repo:tag (or @digest when pushed by digest)
            base = url.split("@", 1)[0]
            last = base.rsplit("/", 1)[-1]
            repo = base.rsplit(":", 1)[0] if ":" in last else base
            if isinstance(tag, str) and tag:
                names.append(f"{repo}:{tag}")
            elif isinstance(digest, str) and digest:
                names.append(f"{repo}@{digest}")
            else:
                names.append(url)
    else:
        raise BadPayload("neither a registry notification envelope (events) nor a Harbor event (type)")
    return list(dict.fromkeys(names)), ignored


def judge(names: list[str], prefixes: list[str], declared: list[str]) -> Pushed:
    """Normalize each name as every other name is; keep those under a prefix or declared."""
    exact = references.normalized(declared)
    pushed = Pushed()
    for text in names:
        try:
            ref = references.parse(text)
        except RefusedReference as exc:
            pushed.refused.append((exc.reference, exc.reason))
            continue
        name = str(ref)
        if name in exact or references.matches_any(ref, tuple(prefixes)):
            if name not in pushed.kept:
                pushed.kept.append(name)
        else:
            pushed.outside.append(name)
    return pushed


def authorized(header: str | None, secret: str) -> bool:
    """Whether ``header`` carries ``secret``, bare or as ``Bearer SECRET`` (in constant time)."""
    if not header:
        return False
    value = header.strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return hmac.compare_digest(value.encode("utf-8", "surrogateescape"), secret.encode())


class Receiver:
    """The state of one ``imagesync webhook`` process: settings, Redis, the last push."""

    def __init__(self, settings: Settings, redis: Redis, secret: str, send: Any = None) -> None:
        self.settings = settings
        self.redis = redis
        self.secret = secret
        self.last_push = 0.0  # time.monotonic() of the last push kept
        self.pending = Pending(redis)
        #: (task id, when sent, its images -> their push counts) of the sync task sent and not answered yet
        self.sent: tuple[str, float, dict[str, str]] | None = None
        #: runs in a row that left their images pending (they failed before sending
        #: their pulls): the next is sent no sooner than ``retry_at``
        self.failures = 0
        self.retry_at = 0.0
        self._send = send

    def receive(self, body: bytes) -> Pushed:
        """Read one notification and add what it pushed to the pending set."""
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadPayload(f"not JSON ({exc})") from None
        names, ignored = pushed_names(payload)
        pushed = judge(names, self.settings.prefixes, self.settings.declared_images())
        pushed.ignored = ignored
        for name, reason in pushed.refused:
            log.warning("webhook: refused image name %r (%s): dropped", name, reason)
        for name in pushed.outside:
            log.info("webhook: %s lies under no configured prefix: not synced", name)
        if pushed.kept:
            self.pending.add(pushed.kept)
            self.last_push = time.monotonic()
            self.retry_at = 0.0  # a new push is worth a run at once
            log.info("webhook: pushed %s: pending", ", ".join(pushed.kept))
        return pushed

    def send(self, images: list[str]) -> str:
        if self._send is not None:
            return str(self._send(images))
        from .celery import app
        from .celeryconfig import CONTROL_QUEUE

        result = app.send_task("imagesync.sync", kwargs={"trigger": "webhook", "images": images},
                               queue=CONTROL_QUEUE)
        return str(result.id)

    def _answered(self, task_id: str) -> bool:
        from .celery import app

        return bool(app.AsyncResult(task_id).ready())

    def tick(self, now: float | None = None) -> str | None:
        """Send a sync task for the pending images if the time has come; its id, or None."""
        now = time.monotonic() if now is None else now
        if self.sent is not None:
            task_id, when, images = self.sent
            if self._send is None and not self._answered(task_id) and now - when < SENT_PATIENCE:
                return None
            self.sent = None
            self._after_run(images, now)
        if now - self.last_push < QUIET or now < self.retry_at:
            return None
        if self.redis.exists(keys.LOCK):
            return None  # a run is in progress: its end frees the lock, and the next tick runs these
        pending = self.pending.images()
        if not pending:
            return None
        counts = self.pending.take(pending)
        task_id = self.send(pending)
        self.sent = (task_id, now, counts)
        log.info("webhook: sync sent for %d image(s): %s (task %s)", len(pending), ", ".join(pending), task_id)
        return task_id

    def _after_run(self, sent: dict[str, str], now: float) -> None:
        """Back off while runs leave their images pending: a run that failed before it sent
        their pulls (its summary says why) is tried again, but not in a tight loop. An image
        pushed again since is not the run's failure: it runs at once."""
        left = [image for image, count in self.pending.take(sent).items() if sent[image] == count]
        if not left:
            self.failures = 0
            return
        self.failures += 1
        delay = min(RETRY_CAP, RETRY_BASE * 2 ** (self.failures - 1))
        self.retry_at = now + delay
        log.warning("webhook: the last run did not send the pulls of %s (see 'imagesync history'); "
                    "still pending, tried again in %.0f s", ", ".join(left), delay)

    def safe_tick(self) -> None:
        try:
            self.tick()
        except Exception as exc:  # Redis or the broker away: try again at the next tick
            log.warning("webhook: cannot start a run for the pending images yet: %s", exc)


class NotificationHandler(tornado.web.RequestHandler):
    """POST a notification (any path): 202 with what was kept, 400, 401 or 503."""

    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body) + "\n")

    def get(self, *_: str) -> None:
        self._answer(200, {"service": "imagesync webhook", "pending": "POST registry notifications here"})

    def post(self, *_: str) -> None:
        peer = self.request.remote_ip
        if not authorized(self.request.headers.get("Authorization"), self.receiver.secret):
            log.warning("webhook: notification from %s without the right Authorization header: refused (401)", peer)
            self._answer(401, {"error": "missing or wrong Authorization header"})
            return
        if len(self.request.body) > MAX_BODY:
            log.warning("webhook: notification from %s of %d bytes, over %d: refused (400)",
                        peer, len(self.request.body), MAX_BODY)
            self._answer(400, {"error": f"body over {MAX_BODY} bytes"})
            return
        try:
            pushed = self.receiver.receive(self.request.body)
        except BadPayload as exc:
            log.warning("webhook: malformed notification from %s: %s: refused (400)", peer, exc)
            self._answer(400, {"error": f"malformed notification: {exc}"})
            return
        except RedisError as exc:
            log.warning("webhook: cannot record a push from %s: Redis: %s (503)", peer, exc)
            self._answer(503, {"error": "cannot reach Redis; the registry will retry"})
            return
        self._answer(202, pushed.to_dict())


def make_app(receiver: Receiver) -> tornado.web.Application:
    return tornado.web.Application([(r"/(.*)", NotificationHandler, {"receiver": receiver})])


class _TooLarge(logging.Filter):
    """tornado's own line for a body over max_body_size, said in imagesync's words."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Content-Length too long" in message or "Malformed HTTP message" in message:
            log.warning("webhook: notification refused (400): %s", message)
            return False
        return True


def serve(settings: Settings, redis: Redis, secret: str, address: str | None = None, port: int | None = None) -> None:
    """Receive notifications until SIGTERM or SIGINT."""
    asyncio.run(_serve(settings, redis, secret, address or settings.webhook_address, port or settings.webhook_port))


async def _serve(settings: Settings, redis: Redis, secret: str, address: str, port: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    logging.getLogger("tornado.general").addFilter(_TooLarge())
    receiver = Receiver(settings, redis, secret)
    # tornado answers 400 to a larger body before any handler sees it; the
    # handler checks again for chunked bodies
    server = tornado.httpserver.HTTPServer(make_app(receiver), max_body_size=MAX_BODY)
    server.listen(port, address)
    ticker = tornado.ioloop.PeriodicCallback(receiver.safe_tick, TICK * 1000)
    ticker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"imagesync webhook: receiving registry notifications on http://{address}:{port}/", flush=True)
    await stop.wait()
    ticker.stop()
    server.stop()
