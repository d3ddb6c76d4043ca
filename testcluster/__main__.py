"""``python -m testcluster install | up --dir DIR --nodes N | down --dir DIR``.

``up`` starts a detached ``serve`` process that owns the cluster (the proxy is a
thread of it), waits until everything answers, prints what runs where and
exits; ``down`` asks ``serve`` to stop it all (SIGTERM) and then makes sure, by
the pids in ``DIR/cluster.json``, that nothing is left.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .cluster import RUNTIMES, Cluster
from .demo import DEMO_IMAGE_SIZE, DEMO_IMAGES, run_demo, stop_services
from .install import InstallError, ensure_system_packages
from .process import cmdline, find_processes, kill_pid, tail

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def _state(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / "cluster.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def _serve_alive(state: dict[str, Any] | None) -> bool:
    pid = (state or {}).get("serve_pid")
    line = cmdline(pid) if isinstance(pid, int) else None
    return line is not None and "testcluster" in line


def cmd_install(args: argparse.Namespace) -> int:
    try:
        installed = ensure_system_packages()
    except InstallError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"installed: {' '.join(installed)}" if installed else "all packages the test cluster needs are present")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    directory = Path(args.dir).absolute()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with Cluster(directory, nodes=args.nodes, runtime=args.runtime) as cluster:
        if args.seed == "demo":
            cluster.seed({n: i for n, i in DEMO_IMAGES.items() if n in {x.name for x in cluster.nodes}},
                         size=DEMO_IMAGE_SIZE)
        config = cluster.write_config(None, **({"schedule": 300} if args.seed == "demo" else {}))
        state = {**cluster.state, "serve_pid": os.getpid(), "config": str(config),
                 "startup_seconds": round(cluster.startup_seconds or 0.0, 2)}
        (directory / "cluster.json").write_text(json.dumps(state, indent=2) + "\n")
        while not stop:
            time.sleep(0.2)
    return 0


def _describe(state: dict[str, Any]) -> str:
    kh, key = state["known_hosts"], state["key_file"]
    lines = [
        f"redis     {state['redis']['url']}  (pid {state['redis']['pid']})",
        f"registry  {state['registry']['address']}  (pid {state['registry']['pid']}); "
        f"nodes pull through the proxy at {state['proxy']['address']}",
    ]
    for node in state["nodes"]:
        ssh = f"ssh -p {node['ssh_port']} -i {key} -o UserKnownHostsFile={kh} {node['ssh_user']}@127.0.0.1"
        pids = ", ".join(f"{k} {v}" for k, v in node["pids"].items())
        lines.append(f"{node['name']:<9} {ssh}  ({pids})")
    lines += [
        f"config    {state['config']}",
        f"started in {state['startup_seconds']} s by pid {state['serve_pid']}; "
        f"stop with: python -m testcluster down --dir {shlex.quote(state['workdir'])}",
    ]
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    directory = Path(args.dir).absolute()
    if _serve_alive(_state(directory)):
        print(f"error: a cluster is already up in {directory}; run `down --dir {directory}` first", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster.json").unlink(missing_ok=True)
    log = directory / "serve.log"
    path = filter(None, [str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH")])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "testcluster", "serve", "--dir", str(directory),
             "--nodes", str(args.nodes), "--runtime", args.runtime, "--seed", args.seed],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        state = _state(directory)
        if state and state.get("serve_pid") == proc.pid:
            print(_describe(state))
            return 0
        if proc.poll() is not None:
            print(f"error: the cluster did not start (exit {proc.returncode}); end of {log}:\n{tail(log)}",
                  file=sys.stderr)
            return 1
        time.sleep(0.1)
    proc.terminate()
    print(f"error: the cluster was not up after {args.timeout:g} s; see {log}", file=sys.stderr)
    return 1


def cmd_demo(args: argparse.Namespace) -> int:
    """``make demo``: a seeded cluster, imagesync's processes, one sync; left running."""
    directory = Path(args.dir).absolute()
    if cmd_install(args) != 0:
        return 1
    if _serve_alive(_state(directory)):
        print(f"a demo is already running in {directory}; stopping it first", flush=True)
        cmd_down(args)
    args.seed, args.runtime = "demo", "crictl"
    print(f"starting a {args.nodes}-node cluster in {directory} ...", flush=True)
    if cmd_up(args) != 0:
        return 1
    return run_demo(directory, _state(directory) or {})


def cmd_down(args: argparse.Namespace) -> int:
    directory = Path(args.dir).absolute()
    stopped = stop_services(directory)
    if stopped:
        print(f"stopped imagesync: {', '.join(stopped)}")
    state = _state(directory)
    if state is None:
        print(f"nothing to stop: no cluster.json in {directory}")
        return 0
    pid = state.get("serve_pid")
    if _serve_alive(state):
        os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while cmdline(pid) is not None and time.monotonic() < deadline:  # type: ignore[arg-type]
            time.sleep(0.1)
    # Whatever the serve process could not stop (it was killed, say): by pid, checked.
    leftovers = [(state["redis"]["pid"], "redis-server"), (state["registry"]["pid"], "docker-registry")]
    for node in state["nodes"]:
        leftovers += [(p, name) for name, p in node["pids"].items()]
        leftovers += [(p.pid, "") for p in find_processes(".", f"CONTAINERD_ADDRESS={node['socket']}")]
    if pid:
        leftovers.append((pid, "testcluster"))
    killed = [f"{what or 'session'} {p}" for p, what in leftovers if p and kill_pid(p, what)]
    (directory / "cluster.json").unlink(missing_ok=True)
    print("stopped" + (f"; also had to stop: {', '.join(killed)}" if killed else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testcluster",
                                     description="Run the imagesync test cluster on this machine.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="apt-get install the packages the cluster needs").set_defaults(run=cmd_install)
    for name, run, helptext in (("up", cmd_up, "start a cluster in the background"),
                                ("serve", cmd_serve, "run a cluster in the foreground until SIGTERM")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--dir", required=True)
        p.add_argument("--nodes", type=int, default=3)
        p.add_argument("--runtime", choices=RUNTIMES, default="crictl")
        p.add_argument("--timeout", type=float, default=60.0)
        p.add_argument("--seed", choices=["none", "demo"], default="none",
                       help="images to preload on the nodes (demo: different images per node)")
        p.set_defaults(run=run)
    demo = sub.add_parser("demo", help="cluster + imagesync workers, beat, Flower; sync once; leave running")
    demo.add_argument("--dir", required=True)
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--timeout", type=float, default=120.0)
    demo.set_defaults(run=cmd_demo)
    down = sub.add_parser("down", help="stop the cluster started with up")
    down.add_argument("--dir", required=True)
    down.set_defaults(run=cmd_down)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
