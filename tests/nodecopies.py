"""What the tests of node-to-node copies share: an image only nodes hold, and an export
that stalls or is killed mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess

from testcluster.image import build_image, write_oci_layout


def make_local_image(d, name: str, nodes: list[str], size: int = 1024 * 1024, variant: str = "local") -> str:
    """An image no registry has, ``ctr import``ed on ``nodes`` from a tar made here; its full ref.
    Another ``variant`` makes other content under the same name."""
    ref = d.cluster.ref(name)
    repo, _, tag = name.rpartition(":")
    directory = d.workdir / f"oci-{repo}-{tag}-{variant}".replace("/", "-")
    layout = write_oci_layout(build_image(repo, tag, size=size, variant=variant), directory, "t")
    tar = layout.with_suffix(".tar")
    subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:t", f"docker-archive:{tar}:{ref}"],
                   check=True, capture_output=True, timeout=60)
    for name_ in nodes:
        node = d.cluster.node(name_)
        node.run(["ctr", "-a", node.socket, "-n", "k8s.io", "images", "import", str(tar)])
    return ref


def stall_exports(node, flag, after: int = 1024 * 1024) -> None:
    """Put a wrapper in front of ``node``'s ctr: an export sends ``after`` bytes, then
    creates ``flag`` and stalls while it exists. Everything else goes to the real ctr."""
    wrapper = node.bin_dir / "ctr"
    wrapper.write_text(f"""#!/bin/sh
case "$*" in
  *"images export"*)
    /usr/bin/ctr "$@" | {{ head -c {after}; touch {flag}; while [ -e {flag} ]; do sleep 0.1; done; exec cat; }} ;;
  *) exec /usr/bin/ctr "$@" ;;
esac
""")
    wrapper.chmod(0o755)


def unstall(node) -> None:
    (node.bin_dir / "ctr").unlink(missing_ok=True)


def kill_export(node, what: str) -> None:
    """SIGKILL the export on ``node`` (``ctr``: every process of it), or the sshd session that runs it."""
    procs = node.processes(r"images export")
    assert procs, "no export running on the node"
    if what == "sshd":
        sessions = set()
        for proc in procs:
            pid = proc.pid
            while pid > 1:
                try:
                    with open(f"/proc/{pid}/stat") as handle:
                        stat = handle.read().rsplit(")", 1)[1].split()
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        cmdline = handle.read().split(b"\0")[0]
                except OSError:
                    break
                if os.path.basename(cmdline.decode()).startswith("sshd"):
                    sessions.add(pid)
                    break
                pid = int(stat[1])
        assert sessions, "no sshd session above the export"
        pids = sessions
    else:
        pids = {proc.pid for proc in procs}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
