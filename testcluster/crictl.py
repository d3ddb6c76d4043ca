"""A crictl-compatible command for the test cluster (crictl is not packaged in Debian).

It speaks containerd's CRI image API (``runtime.v1.ImageService``) over grpcio,
with message classes built at run time from a hand-written descriptor (no
protoc step), and prints what crictl 1.26 prints for the image commands that
imagesync uses::

    crictl [-r|--runtime-endpoint EP] [-i|--image-endpoint EP] [-t|--timeout 2s]
           images [-q] [-o json|table] [--digests] [--no-trunc] [REPO[:TAG]]
           pull REF
           inspecti [-o json|table] REF...
           rmi REF...
           ps [-a] [-q] [-o json|table]

Endpoints come from the flags, then ``IMAGE_SERVICE_ENDPOINT`` /
``CONTAINER_RUNTIME_ENDPOINT``, then containerd's default socket. Errors are
printed the way crictl's logrus does (``time=... level=fatal msg="..."`` on
stderr) with exit status 1.

When ``CRICTL_PULL_LOG`` names a file, every pull appends ``start <wall> <ref>
<pid>`` and ``end <wall> <ref> <pid> <ok|error|killed>`` lines to it, so that a
test can measure how many pulls ran at once on a node.

``ImageClient`` is the same client as a library; the cluster harness uses it to
list, pull and remove images on a node without going through SSH.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DEFAULT_ENDPOINT = "unix:///run/containerd/containerd.sock"
DEFAULT_TIMEOUT = 2.0
PULL_LOG_ENV = "CRICTL_PULL_LOG"

_F = descriptor_pb2.FieldDescriptorProto

# (message, [(field, number, type, label, type_name)]) -- the subset of
# k8s.io/cri-api runtime/v1/api.proto that the image commands need; field
# numbers as in the upstream proto.
_MESSAGES: list[tuple[str, list[tuple[str, int, int, int, str]]]] = [
    # the CRI's own wrapper, not google.protobuf.Int64Value (same wire form, but
    # crictl's JSON shows it as {"value": "0"}, not as a bare number)
    ("Int64Value", [("value", 1, _F.TYPE_INT64, _F.LABEL_OPTIONAL, "")]),
    ("ImageSpec", [
        ("image", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("annotations", 2, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".runtime.v1.ImageSpec.AnnotationsEntry"),
    ]),
    ("ImageFilter", [("image", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.ImageSpec")]),
    ("ListImagesRequest", [("filter", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.ImageFilter")]),
    ("Image", [
        ("id", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("repo_tags", 2, _F.TYPE_STRING, _F.LABEL_REPEATED, ""),
        ("repo_digests", 3, _F.TYPE_STRING, _F.LABEL_REPEATED, ""),
        ("size", 4, _F.TYPE_UINT64, _F.LABEL_OPTIONAL, ""),
        ("uid", 5, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.Int64Value"),
        ("username", 6, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("spec", 7, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.ImageSpec"),
        ("pinned", 8, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, ""),
    ]),
    ("ListImagesResponse", [("images", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".runtime.v1.Image")]),
    ("AuthConfig", [
        ("username", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("password", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("auth", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("server_address", 4, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("identity_token", 5, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("registry_token", 6, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
    ]),
    # sandbox_config (3) is a PodSandboxConfig; never sent here, so left out.
    ("PullImageRequest", [
        ("image", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.ImageSpec"),
        ("auth", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.AuthConfig"),
    ]),
    ("PullImageResponse", [("image_ref", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, "")]),
    ("RemoveImageRequest", [("image", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.ImageSpec")]),
    ("RemoveImageResponse", []),
    ("ImageStatusRequest", [
        ("image", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.ImageSpec"),
        ("verbose", 2, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, ""),
    ]),
    ("ImageStatusResponse", [
        ("image", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.Image"),
        ("info", 2, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".runtime.v1.ImageStatusResponse.InfoEntry"),
    ]),
    # RuntimeService.ListContainers, for `ps`; a container's labels (8) and annotations (9) are left out
    ("ContainerMetadata", [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("attempt", 2, _F.TYPE_UINT32, _F.LABEL_OPTIONAL, ""),
    ]),
    ("Container", [
        ("id", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("pod_sandbox_id", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("metadata", 3, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.ContainerMetadata"),
        ("image", 4, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".runtime.v1.ImageSpec"),
        ("image_ref", 5, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("state", 6, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),  # the ContainerState enum
        ("created_at", 7, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
    ]),
    # the filter (1) is never sent: every container, as `ps -a` asks
    ("ListContainersRequest", []),
    ("ListContainersResponse", [
        ("containers", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".runtime.v1.Container"),
    ]),
]
#: ContainerState as crictl's JSON spells it
_STATES = {0: "CONTAINER_CREATED", 1: "CONTAINER_RUNNING", 2: "CONTAINER_EXITED", 3: "CONTAINER_UNKNOWN"}
_MAPS = {"ImageSpec": "AnnotationsEntry", "ImageStatusResponse": "InfoEntry"}


def _build_messages() -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="imagesync/cri_image.proto",
        package="runtime.v1",
        syntax="proto3",
    )
    for name, fields in _MESSAGES:
        msg = proto.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
        if name in _MAPS:  # map<string, string> is a repeated nested entry message
            entry = msg.nested_type.add(name=_MAPS[name])
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
            entry.field.add(name="value", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    # A private pool, so a generated runtime.v1 module elsewhere cannot clash.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"runtime.v1.{name}"))
        for name, _ in _MESSAGES
    }


MESSAGES = _build_messages()

# gRPC status codes as Go's codes.Code.String() spells them in error messages.
_GO_CODES = {
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}


class CRIError(Exception):
    """A failed CRI call, worded as Go's gRPC client words it."""

    def __init__(self, code: str, desc: str) -> None:
        self.code = code
        self.desc = desc
        super().__init__(f"rpc error: code = {code} desc = {desc}")


@dataclass(frozen=True)
class Image:
    """One entry of ListImages, as the CRI returns it."""

    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    size: int
    uid: int | None
    username: str
    spec: dict[str, Any] | None
    pinned: bool

    def to_json(self) -> dict[str, Any]:
        """crictl's JSON form (jsonpb with EmitDefaults: camelCase, int64 as string)."""
        return {
            "id": self.id,
            "repoTags": self.repo_tags,
            "repoDigests": self.repo_digests,
            "size": str(self.size),
            "uid": None if self.uid is None else {"value": str(self.uid)},
            "username": self.username,
            "spec": self.spec,
            "pinned": self.pinned,
        }


def _image(msg: Any) -> Image:
    spec = None
    if msg.HasField("spec"):
        spec = {"image": msg.spec.image, "annotations": dict(msg.spec.annotations)}
    return Image(
        id=msg.id,
        repo_tags=list(msg.repo_tags),
        repo_digests=list(msg.repo_digests),
        size=msg.size,
        uid=msg.uid.value if msg.HasField("uid") else None,
        username=msg.username,
        spec=spec,
        pinned=msg.pinned,
    )


def _socket_path(endpoint: str) -> str:
    return endpoint.removeprefix("unix://") if endpoint.startswith("unix://") else endpoint


def _translate(err: grpc.RpcError, endpoint: str) -> CRIError:
    code = _GO_CODES.get(err.code(), str(err.code()))
    desc = err.details() or ""
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        # grpcio's wording differs from grpc-go's; say what crictl says.
        path = _socket_path(endpoint)
        reason = "no such file or directory" if not os.path.exists(path) else "connection refused"
        desc = f'connection error: desc = "transport: Error while dialing dial unix {path}: connect: {reason}"'
    return CRIError(code, desc)


class ImageClient:
    """A client of ``runtime.v1.ImageService`` on one endpoint (``unix:///...`` or a path)."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not endpoint.startswith("unix:"):
            endpoint = "unix://" + endpoint
        self.endpoint = endpoint
        self.timeout = timeout
        self._channel = grpc.insecure_channel(endpoint)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ImageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, response: str, timeout: float | None,
              service: str = "ImageService") -> Any:
        stub = self._channel.unary_unary(
            f"/runtime.v1.{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=MESSAGES[response].FromString,
        )
        try:
            return stub(request, timeout=timeout)
        except grpc.RpcError as err:
            raise _translate(err, self.endpoint) from None

    def list(self, image: str = "") -> list[Image]:
        request = MESSAGES["ListImagesRequest"]()
        request.filter.image.image = image
        reply = self._call("ListImages", request, "ListImagesResponse", self.timeout)
        return [_image(m) for m in reply.images]

    def status(self, image: str, verbose: bool = False) -> tuple[Image | None, dict[str, str]]:
        request = MESSAGES["ImageStatusRequest"](verbose=verbose)
        request.image.image = image
        reply = self._call("ImageStatus", request, "ImageStatusResponse", self.timeout)
        return (_image(reply.image) if reply.HasField("image") else None), dict(reply.info)

    def pull(self, image: str, timeout: float | None = None, creds: str | None = None) -> str:
        """Pull ``image``; returns the image id. Like crictl, no deadline unless given.

        ``creds`` is crictl's ``--creds USERNAME[:PASSWORD]``, sent as the CRI's AuthConfig.
        """
        request = MESSAGES["PullImageRequest"]()
        request.image.image = image
        if creds:
            username, _, password = creds.partition(":")
            request.auth.username = username
            request.auth.password = password
        return str(self._call("PullImage", request, "PullImageResponse", timeout).image_ref)

    def remove(self, image: str) -> None:
        request = MESSAGES["RemoveImageRequest"]()
        request.image.image = image
        self._call("RemoveImage", request, "RemoveImageResponse", self.timeout)

    def containers(self) -> list[dict[str, Any]]:
        """Every container the CRI knows (``RuntimeService.ListContainers``), in crictl's JSON form."""
        reply = self._call("ListContainers", MESSAGES["ListContainersRequest"](), "ListContainersResponse",
                           self.timeout, service="RuntimeService")
        return [{
            "id": c.id,
            "podSandboxId": c.pod_sandbox_id,
            "metadata": {"name": c.metadata.name, "attempt": c.metadata.attempt},
            "image": {"image": c.image.image, "annotations": dict(c.image.annotations)},
            "imageRef": c.image_ref,
            "state": _STATES.get(c.state, "CONTAINER_UNKNOWN"),
            "createdAt": str(c.created_at),
            "labels": {},
            "annotations": {},
        } for c in reply.containers]


# -- the command -------------------------------------------------------------------


class Fatal(Exception):
    """An error crictl would report with logrus.Fatal."""


def _parse_duration(text: str) -> float:
    """A Go duration (``2s``, ``500ms``, ``1m30s``) or plain seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f'time: invalid duration "{text}"')
    return sum(float(n) * units[u] for n, u in parts)


def _human_size(size: int) -> str:
    """docker/go-units HumanSizeWithPrecision(size, 3): decimal units, %.3g."""
    units = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"]
    value = float(size)
    i = 0
    while value >= 1000 and i < len(units) - 1:
        value /= 1000
        i += 1
    return f"{value:.3g}{units[i]}"


def _table(rows: list[list[str]]) -> str:
    """Go's tabwriter as crictl sets it up: minwidth 20, padding 3, last cell unpadded."""
    if not rows:
        return ""
    widths = [0] * (max(len(r) for r in rows) - 1)
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell) + 3, 20)
    lines = ["".join(c.ljust(widths[i]) for i, c in enumerate(r[:-1])) + r[-1] for r in rows]
    return "\n".join(lines) + "\n"


def _truncate(value: str) -> str:
    return value.removeprefix("sha256:")[:13]


def _sort_key(image: Image) -> tuple[int, str]:
    # crictl sorts by first tag, else first digest, else id
    if image.repo_tags:
        return (0, image.repo_tags[0])
    if image.repo_digests:
        return (1, image.repo_digests[0])
    return (2, image.id)


def _cmd_images(client: ImageClient, args: argparse.Namespace) -> None:
    try:
        images = sorted(client.list(args.filter or ""), key=_sort_key)
    except CRIError as err:
        raise Fatal(f"listing images: {err}") from None
    if args.output == "json":
        print(json.dumps({"images": [i.to_json() for i in images]}, indent=2))
        return
    if args.output not in (None, "", "table"):
        raise Fatal(f"unsupported output format {args.output!r}")
    if args.quiet:
        for image in images:
            print(image.id)
        return
    header = ["IMAGE", "TAG"] + (["DIGEST"] if args.digests else []) + ["IMAGE ID", "SIZE"]
    rows = [header]
    for image in images:
        name, digest = "<none>", "<none>"
        if image.repo_digests:
            name, _, digest = image.repo_digests[0].partition("@")
        image_id = image.id if args.no_trunc else _truncate(image.id)
        if not args.no_trunc:
            digest = _truncate(digest)
        pairs = [t.rsplit(":", 1) for t in image.repo_tags] or [[name, "<none>"]]
        for repo, tag in pairs:
            rows.append([repo, tag] + ([digest] if args.digests else []) + [image_id, _human_size(image.size)])
    sys.stdout.write(_table(rows))


def _append_pull_log(event: str, ref: str, extra: str = "") -> None:
    path = os.environ.get(PULL_LOG_ENV)
    if not path:
        return
    line = f"{event} {datetime.datetime.now().timestamp():.6f} {ref} {os.getpid()}{extra}\n"
    # O_APPEND with one write per line keeps lines whole across processes
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _cmd_pull(client: ImageClient, args: argparse.Namespace) -> None:
    outcome = "killed"
    _append_pull_log("start", args.image)
    try:
        try:
            image_ref = client.pull(args.image, creds=args.creds)
        except CRIError as err:
            outcome = "error"
            raise Fatal(f"pulling image: {err}") from None
        outcome = "ok"
    finally:
        _append_pull_log("end", args.image, f" {outcome}")
    print(f"Image is up to date for {image_ref}")


def _cmd_inspecti(client: ImageClient, args: argparse.Namespace) -> None:
    results = []
    for ref in args.images:
        try:
            image, info = client.status(ref, verbose=not args.quiet)
        except CRIError as err:
            raise Fatal(f"image status for {ref!r} request: {err}") from None
        if image is None:
            raise Fatal(f'no such image "{ref}" present')
        if args.output == "table":
            print(f"ID: {image.id}")
            for tag in image.repo_tags:
                print(f"Tag: {tag}")
            for digest in image.repo_digests:
                print(f"Digest: {digest}")
            print(f"Size: {_human_size(image.size)}")
            continue
        entry: dict[str, Any] = {"status": image.to_json()}
        for key in sorted(info):
            try:
                entry[key] = json.loads(info[key])
            except ValueError:
                entry[key] = info[key]
        results.append(entry)
    if results:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))


def _cmd_rmi(client: ImageClient, args: argparse.Namespace) -> None:
    failed = False
    for ref in args.images:
        try:
            image, _ = client.status(ref)
            if image is None:
                _log("error", f"no such image {ref}")
                failed = True
                continue
            client.remove(ref)
        except CRIError as err:
            _log("error", f"error of removing image {ref!r}: {err}")
            failed = True
            continue
        for name in image.repo_tags or image.repo_digests:
            print(f"Deleted: {name}")
    if failed:
        raise Fatal("unable to remove the image(s)")


def _cmd_ps(client: ImageClient, args: argparse.Namespace) -> None:
    try:
        containers = client.containers()
    except CRIError as err:
        raise Fatal(f"listing containers: {err}") from None
    if not args.all:
        containers = [c for c in containers if c["state"] == "CONTAINER_RUNNING"]
    if args.output == "json":
        print(json.dumps({"containers": containers}, indent=2))
        return
    if args.quiet:
        for container in containers:
            print(container["id"])
        return
    rows = [["CONTAINER", "IMAGE", "STATE", "NAME", "ATTEMPT", "POD ID"]]
    for c in containers:
        rows.append([_truncate(c["id"]), c["image"]["image"], c["state"].removeprefix("CONTAINER_"),
                     c["metadata"]["name"], str(c["metadata"]["attempt"]), _truncate(c["podSandboxId"])])
    sys.stdout.write(_table(rows))


def _log(level: str, msg: str) -> None:
    """One logrus text line (non-TTY form), as crictl writes to stderr."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"time={json.dumps(now)} level={level} msg={json.dumps(msg)}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crictl", description="client for CRI (image commands only)")
    parser.add_argument("-r", "--runtime-endpoint", default=os.environ.get("CONTAINER_RUNTIME_ENDPOINT", ""))
    parser.add_argument("-i", "--image-endpoint", default=os.environ.get("IMAGE_SERVICE_ENDPOINT", ""))
    parser.add_argument("-t", "--timeout", type=_parse_duration, default=DEFAULT_TIMEOUT)
    parser.add_argument("-D", "--debug", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    images = sub.add_parser("images", aliases=["image", "img"])
    images.add_argument("-q", "--quiet", action="store_true")
    images.add_argument("-o", "--output", default=None)
    images.add_argument("-v", "--verbose", action="store_true")
    images.add_argument("--digests", action="store_true")
    images.add_argument("--no-trunc", action="store_true")
    images.add_argument("filter", nargs="?")
    images.set_defaults(run=_cmd_images)

    pull = sub.add_parser("pull")
    pull.add_argument("--creds", default=None, help="USERNAME[:PASSWORD] for the registry")
    pull.add_argument("image")
    pull.set_defaults(run=_cmd_pull)

    inspecti = sub.add_parser("inspecti")
    inspecti.add_argument("-o", "--output", default="json", choices=["json", "table"])
    inspecti.add_argument("-q", "--quiet", action="store_true")
    inspecti.add_argument("images", nargs="+")
    inspecti.set_defaults(run=_cmd_inspecti)

    rmi = sub.add_parser("rmi")
    rmi.add_argument("images", nargs="+")
    rmi.set_defaults(run=_cmd_rmi)

    ps = sub.add_parser("ps")
    ps.add_argument("-a", "--all", action="store_true")
    ps.add_argument("-q", "--quiet", action="store_true")
    ps.add_argument("-o", "--output", default=None, choices=["json", "table"])
    ps.set_defaults(run=_cmd_ps)
    return parser


def _on_sigterm(signum: int, frame: object) -> None:
    # `timeout` sends SIGTERM: unwind so the pull log gets its end line and the
    # channel closes, which cancels the pull inside containerd.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    endpoint = args.image_endpoint or args.runtime_endpoint or DEFAULT_ENDPOINT
    if args.command == "ps":  # the runtime service, not the image service
        endpoint = args.runtime_endpoint or args.image_endpoint or DEFAULT_ENDPOINT
    timeout = args.timeout if args.timeout > 0 else DEFAULT_TIMEOUT
    try:
        with ImageClient(endpoint, timeout) as client:
            args.run(client, args)
    except Fatal as err:
        _log("fatal", str(err))
        return 1
    except CRIError as err:
        _log("fatal", str(err))
        return 1
    return 0


def iter_pull_log(path: str) -> Iterator[tuple[str, float, str, int, str]]:
    """Lines of a ``CRICTL_PULL_LOG`` file as (event, wall time, ref, pid, outcome)."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4:
                    yield parts[0], float(parts[1]), parts[2], int(parts[3]), (parts[4] if len(parts) > 4 else "")
    except FileNotFoundError:
        return


if __name__ == "__main__":
    sys.exit(main())
