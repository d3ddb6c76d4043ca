"""A fault-injecting HTTP proxy in front of the registry.

Nodes pull through it, so a test can make the registry slow, silent, failing or
rude at run time, and can see every request the nodes made::

    proxy.passthrough()         forward everything (the default)
    proxy.delay(2.0)            hold each layer GET 2 s before forwarding it
    proxy.hold()                hold each layer GET until ``release()`` (or ``passthrough()``)
    proxy.hang()                read requests, never answer (until the client gives up)
    proxy.error(503)            answer with that status and a registry-style error body
    proxy.reset()               close connections at once (TCP RST), the open ones too

Each mode takes ``match=``: a substring of the path, so only some images or only
blobs are affected and the rest pass through. ``requests`` lists what was
asked, with monotonic and wall start/end times and the client's port, and
``measure.max_concurrency`` turns those into "how many pulls ran at once".

containerd fetches an image's config blob and then its layers, one after the
other, so delaying every blob would make a one-layer pull take twice the delay.
The proxy reads the manifests it forwards to learn which blobs are configs, and
``delay`` holds only layers (and blobs it has not seen named): a one-layer pull
then takes the delay plus a few milliseconds, and each pull makes exactly one
delayed request per layer, which is what concurrency is measured on.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from select import select
from typing import Any

from .process import free_port, retry_if_port_taken

# Headers that belong to one connection, not to the request (RFC 9110 7.6.1).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
               "te", "trailer", "transfer-encoding", "upgrade"}
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class ProxyRequest:
    """One request the proxy saw. ``status`` is None if it was hung or reset."""

    method: str
    path: str
    kind: str  # manifest | config | layer | upload | other
    client_port: int
    mode: str
    status: int | None
    start: float  # time.monotonic()
    end: float
    wall_start: float  # time.time()
    wall_end: float

    @property
    def is_layer_get(self) -> bool:
        return self.method == "GET" and self.kind == "layer"

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class _Mode:
    name: str = "passthrough"
    match: str | None = None
    seconds: float = 0.0
    status: int = 0
    #: "hold": set when the held requests may go on
    gate: threading.Event = field(default_factory=threading.Event, compare=False)

    def applies_to(self, method: str, path: str, kind: str) -> bool:
        if self.name == "passthrough" or (self.match is not None and self.match not in path):
            return False
        if self.name in ("delay", "hold"):  # only layer downloads, so a pull takes a known time
            return method == "GET" and kind == "layer"
        return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYNs of a burst of connections (a
    # plan's registry questions, a node's parallel layer downloads), and each dropped one
    # costs its client the kernel's 1 s SYN retransmit: a registry listens with a larger one
    request_queue_size = 128
    proxy: RegistryProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that go away mid-answer are normal here (timeouts, resets)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.proxy._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass  # the connection was aborted on purpose (reset) or by the client
        finally:
            if self._upstream is not None:
                self._upstream.close()
            self.server.proxy._closed(self.connection)

    def _handle(self) -> None:
        proxy = self.server.proxy
        mode = proxy._mode
        start, wall_start = time.monotonic(), time.time()
        status: int | None = None
        kind = proxy._kind(self.path)
        name = mode.name if mode.applies_to(self.command, self.path, kind) else "passthrough"
        try:
            body = self._read_body()
            if proxy._latency and proxy._stopping.wait(proxy._latency):
                self.close_connection = True
                return
            if name == "hang":
                self._hang()
            elif name == "reset":
                _abort(self.connection)
                self.close_connection = True
            elif name == "error":
                status = mode.status
                self._send_error(status)
            else:
                if name == "delay" and proxy._stopping.wait(mode.seconds):
                    self.close_connection = True
                    return
                if name == "hold" and not self._held(mode.gate):
                    self.close_connection = True
                    return
                status = self._forward(body)
        finally:
            proxy._record(ProxyRequest(self.command, self.path, kind, self.client_address[1], name, status,
                                       start, time.monotonic(), wall_start, time.time()))

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _held(self, gate: threading.Event) -> bool:
        """Wait for ``gate``; False if the proxy stopped first."""
        proxy = self.server.proxy
        with proxy._lock:
            proxy._held_now += 1
        try:
            while not gate.wait(0.1):
                if proxy._stopping.is_set():
                    return False
            return True
        finally:
            with proxy._lock:
                proxy._held_now -= 1

    def _hang(self) -> None:
        """Answer nothing until the client closes or the proxy stops."""
        proxy = self.server.proxy
        while not proxy._stopping.is_set():
            readable, _, _ = select([self.connection], [], [], 0.2)
            if readable:
                try:
                    if not self.connection.recv(65536, socket.MSG_PEEK):
                        break  # client closed
                    self.connection.recv(65536)  # discard pipelined requests
                except OSError:
                    break
        self.close_connection = True

    def _send_error(self, status: int) -> None:
        body = (b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the imagesync test proxy",'
                b'"detail":null}]}')
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes | None) -> int:
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            if key.lower() not in _HOP_BY_HOP:
                # a header sent on several lines (skopeo's Accept) is one list (RFC 9110 5.3)
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if body is not None:
            headers["Content-Length"] = str(len(body))
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(self.server.proxy.upstream, timeout=60)
        try:
            self._upstream.request(self.command, self.path, body=body, headers=headers)
            resp = self._upstream.getresponse()
        except (OSError, http.client.HTTPException):
            self._upstream.close()
            self._upstream = None
            self._send_error(502)
            return 502
        self.send_response_only(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        data = b""
        is_manifest = "/manifests/" in self.path and resp.status == 200
        if self.command != "HEAD" and (length is None or is_manifest):
            # chunked or close-delimited: buffer, then send with a length;
            # manifests: small, and read to learn which blobs are configs
            data = resp.read()
            length = str(len(data))
            if is_manifest:
                self.server.proxy._learn(data)
        for key, value in resp.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            if data:
                self.server.proxy._pace(len(data))
                self.wfile.write(data)
            else:
                while chunk := resp.read(_CHUNK):
                    self.server.proxy._pace(len(chunk))
                    self.wfile.write(chunk)
        resp.close()
        if resp.will_close:
            self._upstream.close()
            self._upstream = None
        return resp.status


def _abort(sock: socket.socket) -> None:
    """Close with RST instead of FIN, as a crashed or firewalled server would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class RegistryProxy:
    """A threaded HTTP forwarding proxy on a free 127.0.0.1 port in front of ``upstream``."""

    def __init__(self, upstream: str, port: int | None = None) -> None:
        self.upstream = upstream
        self.port = port or free_port()
        self._port_fixed = port is not None  # and once started
        self._mode = _Mode()
        self._lock = threading.Lock()
        self._requests: list[ProxyRequest] = []
        self._connections: set[socket.socket] = set()
        self._configs: set[str] = set()  # config blob digests, learnt from manifests
        self._stopping = threading.Event()
        self._held_now = 0
        #: bytes of response bodies sent so far (see ``throttle``)
        self.bytes_sent = 0
        self._rate: float | None = None
        self._next_send = 0.0
        self._latency = 0.0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode.name

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> RegistryProxy:
        self._stopping.clear()

        def bind() -> None:
            self._server = _Server(("127.0.0.1", self.port), _Handler)

        def move() -> None:
            self.port = free_port()

        if self._port_fixed:
            bind()
        else:
            retry_if_port_taken(bind, move)
            self._port_fixed = True
        assert self._server is not None
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"registry-proxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, release hung and delayed requests, close every connection."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread:
            self._thread.join(5)
        self._server = None

    def __enter__(self) -> RegistryProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- modes -----------------------------------------------------------------------

    def _switch(self, mode: _Mode) -> None:
        """The new mode applies to new requests; those held by ``hold`` go on."""
        held, self._mode = self._mode, mode
        held.gate.set()

    def passthrough(self) -> None:
        self._switch(_Mode())

    def throttle(self, bytes_per_second: float | None) -> None:
        """Send response bodies at ``bytes_per_second`` in all, over every connection
        (a registry behind one slow link); None: as fast as they come. Independent of the mode."""
        with self._lock:
            self._rate = bytes_per_second
            self._next_send = 0.0

    def latency(self, seconds: float) -> None:
        """Answer every request ``seconds`` late, manifests and blobs alike (a registry one
        round trip of ``seconds`` away); 0: at once. Independent of the mode."""
        self._latency = seconds

    def _pace(self, size: int) -> None:
        """Count ``size`` bytes sent, and wait for their turn on the throttled link."""
        with self._lock:
            self.bytes_sent += size
            if not self._rate:
                return
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + size / self._rate
        if start > now:
            self._stopping.wait(start - now)

    def delay(self, seconds: float, match: str | None = None) -> None:
        self._switch(_Mode("delay", match, seconds=seconds))

    def hold(self, match: str | None = None) -> None:
        """Hold each layer GET until ``release()``: pulls stay under way for as long as a test needs,
        however fast or slow this machine is."""
        self._switch(_Mode("hold", match))

    def release(self) -> None:
        """The held requests go on, and everything passes through from now."""
        self.passthrough()

    def hang(self, match: str | None = None) -> None:
        self._switch(_Mode("hang", match))

    def error(self, status: int = 503, match: str | None = None) -> None:
        self._switch(_Mode("error", match, status=status))

    def reset(self, match: str | None = None) -> None:
        """Reset new requests, and abort the connections open right now."""
        self._switch(_Mode("reset", match))
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _abort(conn)

    # -- records ---------------------------------------------------------------------

    @property
    def requests(self) -> list[ProxyRequest]:
        """Finished requests, in the order they finished."""
        with self._lock:
            return list(self._requests)

    def layer_gets(self) -> list[ProxyRequest]:
        """Finished layer downloads: one per layer per pull, the requests ``delay`` holds."""
        return [r for r in self.requests if r.is_layer_get]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def held(self) -> int:
        """Requests waiting at the proxy right now for ``release()`` (see ``hold``)."""
        with self._lock:
            return self._held_now

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def _learn(self, manifest: bytes) -> None:
        try:
            config = json.loads(manifest).get("config", {}).get("digest")
        except (ValueError, AttributeError):
            return
        if isinstance(config, str):
            with self._lock:
                self._configs.add(config)

    def _kind(self, path: str) -> str:
        if "/manifests/" in path:
            return "manifest"
        if "/blobs/uploads/" in path:
            return "upload"
        if "/blobs/" in path:
            digest = path.split("/blobs/", 1)[1].split("?", 1)[0]
            with self._lock:
                return "config" if digest in self._configs else "layer"
        return "other"

    def _record(self, request: ProxyRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def _closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

