"""``make demo``: imagesync end to end on this machine, left running.

Starts a three-node test cluster whose nodes hold different images, imagesync's
control worker, one worker per node, beat and Flower, shows the node x image
matrix, runs a sync with its progress bar, shows the matrix again, and leaves
everything running with Flower's address and the command that stops it all.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from .process import kill_pid
from .services import Services

#: what each demo node holds before the first sync; ``other/`` lies outside every prefix
DEMO_IMAGES = {
    "node-1": ["bcm11/hpc/openfoam:v11", "bcm11/hpc/lammps:2024.02", "nvidia/pytorch:24.01-py3"],
    "node-2": ["bcm11/hpc/gromacs:2024.1", "nvidia/tritonserver:24.01-py3", "other/debug-tools:1"],
    "node-3": ["nvidia/cuda:12.4.1-base"],
}
#: bytes per demo image: big enough for a visible pull, small enough for a laptop
DEMO_IMAGE_SIZE = 8 * 1024 * 1024
SERVICES_STATE = "services.json"


def _cli(config: Path, *args: str) -> int:
    env = {**os.environ, "IMAGESYNC_CONFIG": str(config)}
    return subprocess.call([sys.executable, "-m", "imagesync.cli", *args], env=env)


def _command() -> str:
    """How to type ``imagesync`` here: the venv's script when this Python is a venv's."""
    script = Path(sys.executable).with_name("imagesync")
    if sys.prefix != sys.base_prefix and script.exists():
        here = Path.cwd()
        return str(script.relative_to(here) if script.is_relative_to(here) else script)
    return "imagesync"


def run_demo(directory: Path, state: dict) -> int:
    """The demo, on a cluster already up in ``directory`` (see ``up --seed demo``)."""
    config = Path(state["config"])
    nodes = [node["name"] for node in state["nodes"]]
    services = Services(config, directory / "services")
    user, password = "admin", secrets.token_urlsafe(12)
    print(f"starting imagesync: control worker, {len(nodes)} node workers, beat, Flower ...", flush=True)
    services.start_all(nodes)
    services.start_beat()
    services.start_flower(user, password)
    (directory / SERVICES_STATE).write_text(json.dumps(
        {name: process.pid for name, process in services.processes.items()}, indent=2) + "\n")

    print("\nbefore the sync:", flush=True)
    _cli(config, "status")
    print(flush=True)
    code = _cli(config, "sync", "--wait")
    print("\nafter the sync:", flush=True)
    _cli(config, "status")
    here = Path.cwd()
    shown = directory.relative_to(here) if directory.is_relative_to(here) else directory
    print(f"""
Everything is still running:
  Flower       http://127.0.0.1:{services.flower_port}/   user {user}, password {password}
  config       {config}
  logs         {state['workdir']}/logs/  (workers: {directory / 'services'}/)
  try          IMAGESYNC_CONFIG={config} {_command()} plan | status | history | sync --wait
  stop it all  make demo-down   (or: python -m testcluster down --dir {shown})""", flush=True)
    return code


def stop_services(directory: Path) -> list[str]:
    """Stop the Celery processes a demo left running; returns what was stopped."""
    path = directory / SERVICES_STATE
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    stopped = []
    for name, pid in pids.items():
        if kill_pid(pid, "imagesync", timeout=20):
            stopped.append(name)
        try:
            os.killpg(pid, 9)  # prefork children left by a worker that had to be killed
        except (ProcessLookupError, PermissionError):
            pass
    path.unlink(missing_ok=True)
    return stopped
