"""Install the Debian packages the test cluster runs (``python -m testcluster install``)."""

from __future__ import annotations

import os
import shutil
import subprocess

# command the cluster runs -> the Debian package that ships it
REQUIRED_COMMANDS = {
    "redis-server": "redis-server",
    # tests/test_sentinel.py runs three sentinels in front of a master and a replica
    "redis-sentinel": "redis-sentinel",
    "containerd": "containerd",
    "ctr": "containerd",
    "docker-registry": "docker-registry",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    # images made without Docker (OCI layouts, archives), registry to registry copies
    "skopeo": "skopeo",
    # the bytes a process's TCP connections carried (testcluster.measure.tcp_bytes)
    "ss": "iproute2",
    # the seed's Bash pipeline that bench/ compares imagesync with
    "jq": "jq",
    # Prometheus and promtool: tests/test_exporter.py checks deploy/prometheus/ with them
    "prometheus": "prometheus",
    # tests/test_systemd.py verifies deploy/systemd/ with it
    "systemd-analyze": "systemd",
    "promtool": "prometheus",
    # tests/test_compose.py runs docker-compose.yml with them, on a base image
    # made with debootstrap (Docker Hub is out of reach on the test machines)
    "podman": "podman",
    "podman-compose": "podman-compose",
    "debootstrap": "debootstrap",
}
# file the cluster needs that is not a command -> the Debian package that ships it
REQUIRED_FILES = {
    # service-name DNS inside a podman (CNI) network: without it the compose file's
    # containers cannot resolve "redis" ("Name or service not known"); podman does
    # not depend on it
    "/usr/lib/cni/dnsname": "golang-github-containernetworking-plugin-dnsname",
}
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


class InstallError(RuntimeError):
    """Packages are missing and cannot be installed from here."""


def missing_packages() -> list[str]:
    """Debian packages whose commands or files are not on this machine, sorted."""
    missing = {pkg for cmd, pkg in REQUIRED_COMMANDS.items() if shutil.which(cmd, path=_SEARCH_PATH) is None}
    missing |= {pkg for path, pkg in REQUIRED_FILES.items() if not os.path.exists(path)}
    return sorted(missing)


def ensure_system_packages() -> list[str]:
    """Install what is missing with apt-get; returns the packages installed (none if
    all are present). Not root and something missing: ``InstallError`` naming the
    packages and the command to run."""
    missing = missing_packages()
    if not missing:
        return []
    command = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y " + " ".join(missing)
    if os.geteuid() != 0:
        raise InstallError(f"the test cluster needs {', '.join(missing)}; as root, run: {command}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, stdin=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env,
                   stdin=subprocess.DEVNULL)
    still = missing_packages()
    if still:
        raise InstallError(f"installed {', '.join(missing)} but still missing commands or files "
                           f"from {', '.join(still)}")
    return missing
