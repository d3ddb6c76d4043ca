"""A real registry for the test cluster: Debian's ``docker-registry`` (CNCF distribution 2.8).

Images are pushed with the registry's HTTP API (no Docker, no skopeo): each blob
is one ``POST /v2/<repo>/blobs/uploads/`` and one ``PUT <location>&digest=``,
then ``PUT /v2/<repo>/manifests/<tag>``, over one keep-alive connection per
thread, which makes a small image cost a few milliseconds.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from .image import MANIFEST_TYPE, Blob, build_image
from .process import ClusterError, ServerProcess, free_port, start_server


class RegistryError(ClusterError):
    """The registry answered a push or delete with an unexpected status."""


class Registry:
    """``docker-registry serve`` on a free 127.0.0.1 port, storing under ``workdir``."""

    def __init__(self, workdir: str | Path, port: int | None = None,
                 login: tuple[str, str] | None = None, notify: tuple[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        #: (username, password) the registry demands (htpasswd), for pulls and pushes alike
        self.login = login
        #: (url, secret): a notification endpoint the registry calls on every push,
        #: with ``Authorization: secret`` (``notifications: endpoints``)
        self.notify = notify
        self.port = port or free_port()
        self._port_fixed = port is not None  # and once started
        self._process: ServerProcess | None = None
        self._local = threading.local()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _write_config(self) -> Path:
        config = self.workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n"
            "  level: warn\n"
            "  accesslog:\n"
            "    disabled: true\n"
            "storage:\n"
            "  filesystem:\n"
            f"    rootdirectory: {self.workdir / 'data'}\n"
            "  delete:\n"
            "    enabled: true\n"
            "  cache:\n"
            "    blobdescriptor: inmemory\n"
            "http:\n"
            f"  addr: {self.address}\n"
            "  secret: imagesync-test-cluster\n"
            + self._auth_config()
            + self._notifications_config()
        )
        return config

    def _notifications_config(self) -> str:
        if self.notify is None:
            return ""
        url, secret = self.notify
        return ("notifications:\n"
                "  endpoints:\n"
                "    - name: imagesync\n"
                f"      url: {json.dumps(url)}\n"
                "      headers:\n"
                f"        Authorization: [{json.dumps(secret)}]\n"
                "      timeout: 2s\n"
                "      threshold: 3\n"
                "      backoff: 1s\n"
                "      ignore:\n"
                "        actions: [pull]\n"
                "        mediatypes: [application/octet-stream]\n")

    def _auth_config(self) -> str:
        if self.login is None:
            return ""
        import bcrypt  # paramiko's own dependency; the registry reads only bcrypt hashes

        user, password = self.login
        digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        htpasswd = self.workdir / "htpasswd"
        htpasswd.write_text(f"{user}:{digest}\n")
        return f"auth:\n  htpasswd:\n    realm: imagesync-test\n    path: {htpasswd}\n"

    def start(self, timeout: float = 15.0) -> Registry:
        self.workdir.mkdir(parents=True, exist_ok=True)

        self._process = start_server(
            "docker-registry", lambda: ["docker-registry", "serve", str(self._write_config())],
            self.workdir / "registry.log", lambda _: self._answers(), timeout, self._port_fixed, self._move)
        self._port_fixed = True
        return self

    def _answers(self) -> bool:
        # a short timeout of its own: whoever else holds the port may never answer
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status in (200, 401)
        finally:
            conn.close()

    def _move(self) -> None:
        self.port = free_port()
        self._local = threading.local()  # connections to the old port

    def stop(self) -> None:
        if self._process:
            self._process.stop()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self._local.conn = conn
        return conn

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        if self.login is not None:
            token = base64.b64encode(":".join(self.login).encode()).decode()
            headers.setdefault("Authorization", f"Basic {token}")
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (http.client.HTTPException, OSError):
                # a kept-alive connection the server closed: one retry on a new one
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _upload(self, repo: str, blob: Blob) -> None:
        status, _, _ = self._request("HEAD", f"/v2/{repo}/blobs/{blob.digest}")
        if status == 200:
            return
        status, headers, body = self._request("POST", f"/v2/{repo}/blobs/uploads/", b"")
        if status != 202:
            raise RegistryError(f"starting upload to {repo}: HTTP {status} {body[:200]!r}")
        location = urlsplit(headers["location"])
        query = f"{location.query}&" if location.query else ""
        status, _, body = self._request(
            "PUT", f"{location.path}?{query}digest={blob.digest}", blob.data,
            {"Content-Type": "application/octet-stream"},
        )
        if status != 201:
            raise RegistryError(f"uploading {blob.digest} to {repo}: HTTP {status} {body[:200]!r}")

    def push_image(self, repo: str, tag: str, size: int = 1024, layers: int = 1, variant: str = "",
                   user: str | None = None, layer_seeds: Sequence[str] | None = None) -> str:
        """Build and push ``repo:tag`` (see ``image.build_image``); returns the manifest digest."""
        image = build_image(repo, tag, size=size, layers=layers, variant=variant, user=user, layer_seeds=layer_seeds)
        for blob in image.blobs:
            self._upload(repo, blob)
        status, headers, body = self._request(
            "PUT", f"/v2/{repo}/manifests/{tag}", image.manifest, {"Content-Type": MANIFEST_TYPE}
        )
        if status != 201:
            raise RegistryError(f"pushing manifest {repo}:{tag}: HTTP {status} {body[:200]!r}")
        return headers.get("docker-content-digest", image.digest)

    def manifest_digest(self, repo: str, tag: str) -> str | None:
        """The digest ``repo:tag`` points at, or None if the registry does not have it."""
        status, headers, _ = self._request("HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_TYPE})
        return headers.get("docker-content-digest") if status == 200 else None

    def delete_image(self, repo: str, tag: str) -> None:
        """Delete the manifest ``repo:tag`` points at (and so every tag of it): a later
        pull fails with the registry's ``not found``. Blobs stay until garbage collection."""
        digest = self.manifest_digest(repo, tag)
        if digest is None:
            raise RegistryError(f"{repo}:{tag} is not in the registry")
        status, _, body = self._request("DELETE", f"/v2/{repo}/manifests/{digest}")
        if status != 202:
            raise RegistryError(f"deleting {repo}:{tag}: HTTP {status} {body[:200]!r}")

    def tags(self, repo: str) -> list[str]:
        status, _, body = self._request("GET", f"/v2/{repo}/tags/list")
        if status != 200:
            return []
        return list(json.loads(body).get("tags") or [])
