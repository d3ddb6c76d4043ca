"""Deterministic container images made without Docker.

An image is one or more gzip'd layer tars, each holding one file of pseudo-random
bytes seeded by ``repo:tag`` (and ``variant``), a config JSON (amd64/linux, the
layers' diff_ids) and an OCI image manifest. The same arguments always give the
same digests; a different ``variant`` gives the same tag different content (tag
drift). Random bytes do not compress, so the size on the wire is about ``size``:
gzip runs at level 0 (stored blocks, still valid gzip) because compressing
200 MB of noise at level 1 costs ~6 s for nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return digest_of(self.data)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


@dataclass(frozen=True)
class BuiltImage:
    """Everything a registry needs for one image; ``digest`` is the manifest digest."""

    config: Blob
    layers: list[Blob]
    manifest: bytes

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def blobs(self) -> list[Blob]:
        return [*self.layers, self.config]


def _layer(seed: str, size: int, index: int) -> tuple[Blob, str]:
    """A gzip'd tar with one file of ``size`` seeded bytes; returns (blob, diff_id)."""
    content = random.Random(f"{seed}#{index}").randbytes(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"imagesync/layer-{index}.bin")
        info.size = size
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    raw = buf.getvalue()
    return Blob(LAYER_TYPE, gzip.compress(raw, compresslevel=0, mtime=0)), digest_of(raw)


def build_image(repo: str, tag: str, size: int = 1024, layers: int = 1, variant: str = "",
                user: str | None = None, platform: str = "linux/amd64",
                layer_seeds: Sequence[str] | None = None) -> BuiltImage:
    """Build the image ``repo:tag``: ``size`` bytes of content split over ``layers``
    layers. ``user`` sets the config's ``User`` (crictl shows a numeric one as uid);
    ``platform`` (``os/arch[/variant]``) the config's platform. ``layer_seeds`` (one per
    layer) makes layers of other images: layer i of two images with the same seed i is
    the same blob (an update that changes only its top layer)."""
    if layers < 1:
        raise ValueError("an image needs at least one layer")
    os_name, arch, *arch_variant = platform.split("/")
    seed = f"{repo}:{tag}:{variant}" + ("" if platform == "linux/amd64" else f":{platform}")
    base, extra = divmod(max(size, 0), layers)
    seeds = list(layer_seeds) if layer_seeds is not None else [seed] * layers
    if len(seeds) != layers:
        raise ValueError("give one layer seed per layer")
    built = [_layer(seeds[i], base + (1 if i < extra else 0), i) for i in range(layers)]
    config: dict[str, object] = {
        "architecture": arch,
        "os": os_name,
        **({"variant": arch_variant[0]} if arch_variant else {}),
        "config": {"Labels": {"org.imagesync.test": seed}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in built]},
    }
    if user is not None:
        config["config"] = {**config["config"], "User": user}  # type: ignore[dict-item]
    config_blob = Blob(CONFIG_TYPE, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": config_blob.descriptor(),
        "layers": [blob.descriptor() for blob, _ in built],
    }
    return BuiltImage(config_blob, [blob for blob, _ in built], json.dumps(manifest, sort_keys=True).encode())


def write_oci_layout(built: BuiltImage, directory: str | Path, tag: str) -> Path:
    """Write ``built`` as an OCI image layout in ``directory``, its manifest named ``tag``
    (for ``skopeo copy oci:DIRECTORY:TAG ...``)."""
    root = Path(directory)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for blob in [*built.blobs, Blob(MANIFEST_TYPE, built.manifest)]:
        (blobs / blob.digest.removeprefix("sha256:")).write_bytes(blob.data)
    manifest = {**Blob(MANIFEST_TYPE, built.manifest).descriptor(),
                "annotations": {"org.opencontainers.image.ref.name": tag}}
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))
    return root


INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


def write_oci_index(directory: str | Path, repo: str, tag: str, platforms: list[str], size: int = 1024) -> str:
    """Write an OCI layout at ``directory`` whose ``tag`` is an image index with one
    image per platform (``["linux/arm64"]``: an index with an arm64 manifest only),
    for ``skopeo copy --all oci:DIR:TAG docker://...``; returns the index's digest."""
    root = Path(directory)
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def store(data: bytes) -> None:
        (root / "blobs" / "sha256" / digest_of(data).split(":", 1)[1]).write_bytes(data)

    entries = []
    for platform in platforms:
        image = build_image(repo, tag, size=size, platform=platform)
        for blob in image.blobs:
            store(blob.data)
        store(image.manifest)
        os_name, arch, *variant = platform.split("/")
        described = {"os": os_name, "architecture": arch, **({"variant": variant[0]} if variant else {})}
        entries.append({"mediaType": MANIFEST_TYPE, "digest": image.digest, "size": len(image.manifest),
                        "platform": described})
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": entries}, sort_keys=True).encode()
    store(index)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": INDEX_TYPE, "digest": digest_of(index), "size": len(index),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return digest_of(index)
