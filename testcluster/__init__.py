"""The real test cluster: real Redis, registry, containerd and sshd processes on loopback.

Used by the tests, by ``make demo`` and by the benchmarks::

    python -m testcluster install               # apt-get what is missing
    python -m testcluster up --dir DIR --nodes 3
    python -m testcluster down --dir DIR

Modules, one noun each: ``redis`` (RedisServer), ``registry`` (Registry, pushes
over its HTTP API), ``image`` (deterministic images without Docker), ``proxy``
(RegistryProxy, fault injection in front of the registry), ``node`` (Node:
containerd + sshd), ``crictl`` (a crictl-compatible CRI client), ``cluster``
(Cluster, all of it plus an imagesync config), ``process`` (child processes),
``measure`` (concurrency from recorded intervals), ``install``.
"""

from .cluster import Cluster, toml_dumps
from .crictl import CRIError, ImageClient
from .install import InstallError, ensure_system_packages
from .measure import max_concurrency
from .node import Node, PullRecord
from .process import ClusterError, ProcessInfo
from .proxy import ProxyRequest, RegistryProxy
from .redis import RedisServer
from .registry import Registry, RegistryError

__all__ = [
    "CRIError",
    "Cluster",
    "ClusterError",
    "ImageClient",
    "InstallError",
    "Node",
    "ProcessInfo",
    "ProxyRequest",
    "PullRecord",
    "RedisServer",
    "Registry",
    "RegistryError",
    "RegistryProxy",
    "ensure_system_packages",
    "max_concurrency",
    "toml_dumps",
]
