"""Synthetic inventories: what ``crictl images -o json`` would report, without nodes.

Every image has a tag reference and a digest reference, as containerd's CRI
reports a pulled image; names sit under a registry with a port, like the
test cluster's and many private registries'.
"""

from __future__ import annotations

import hashlib

from imagesync.inventory import Inventory
from imagesync.runtimes import Image

REGISTRY = "registry.bench:5000"
PREFIXES = (f"{REGISTRY}/bcm11", "nvcr.io/nvidia")


def image(i: int, variant: str = "") -> Image:
    """The i-th image of the synthetic catalogue (``variant`` changes its digest: tag drift)."""
    repo = f"{REGISTRY}/bcm11/team{i % 40:02d}/app{i:05d}" if i % 5 else f"nvcr.io/nvidia/model{i:05d}"
    digest = "sha256:" + hashlib.sha256(f"{i}{variant}".encode()).hexdigest()
    return Image(id="sha256:" + hashlib.sha256(f"id{i}{variant}".encode()).hexdigest(),
                 tags=(f"{repo}:1.{i % 7}",), digests=(f"{repo}@{digest}",), size=1 << 20)


def catalogue(images: int) -> list[Image]:
    return [image(i) for i in range(images)]


def inventories(nodes: int, images: int, missing_per_node: int) -> dict[str, list[Image]]:
    """``nodes`` nodes over a catalogue of ``images``: node k lacks a different
    ``missing_per_node`` of them (so every image is on some node), plus 20
    images outside the prefixes each."""
    every = catalogue(images)
    outside = [Image(id=f"sha256:{k:064x}", tags=(f"docker.io/library/tool{k}:latest",)) for k in range(20)]
    result = {}
    for n in range(nodes):
        start = (n * missing_per_node) % images
        lacking = {(start + j) % images for j in range(missing_per_node)}
        result[f"node-{n + 1:03d}"] = [im for i, im in enumerate(every) if i not in lacking] + outside
    return result


def inventory_of(nodes: int, images: int, missing_per_node: int) -> Inventory:
    return Inventory(images=inventories(nodes, images, missing_per_node))
