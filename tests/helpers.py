"""Helpers of the real-cluster tests: waiting for a condition, reporting a figure,
the CLI in the background, and run records."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from imagesync import keys
from imagesync.redisvalues import as_text

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something true, and return that; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def measured(what: str, value: object) -> None:
    """A figure the test measured, shown with ``pytest -s``."""
    print(f"measured: {what}: {value}")


def start_cli(d, *args: str) -> subprocess.Popen:
    """``imagesync ARGS`` in the background, its lines unwrapped; ``finish()`` it for its result."""
    return subprocess.Popen([sys.executable, "-m", "imagesync.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "IMAGESYNC_CONFIG": str(d.config_path), "COLUMNS": "1000"})


def finish(process: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def started_run(result: subprocess.CompletedProcess) -> str:
    """The id of the run that ``imagesync sync`` started (or found nothing to do for)."""
    for line in result.stdout.splitlines():
        if line.startswith("run ") and (" started" in line or "every node already holds" in line):
            return line.split()[1].rstrip(":")
    raise AssertionError(f"no run started:\n{result.stdout}\n{result.stderr}")


def run_status(d, run_id: str) -> str | None:
    with d.cluster.redis.client() as client:
        status = client.hget(keys.run(run_id), "status")
    return status.decode() if status else None


def wait_for_run_end(d, run_id: str, timeout: float):
    """The run record once the run is no longer running (polled in Redis, read with the CLI)."""
    wait_for(lambda: run_status(d, run_id) not in (None, "running"), timeout, f"end of run {run_id}")
    return d.history(run_id)


def reported(d, run_id: str) -> int:
    """How many pulls of the run have reported an outcome (read in Redis, no CLI started)."""
    with d.cluster.redis.client() as client:
        return int(client.hlen(keys.run_results(run_id)))


def runs_with_status(d, status: str) -> list[str]:
    """Ids of the runs in history with ``status``, newest first (read in Redis, no CLI started)."""
    with d.cluster.redis.client() as client:
        ids = [as_text(run_id) for run_id in client.lrange(keys.HISTORY, 0, -1)]
        return [run_id for run_id in ids if as_text(client.hget(keys.run(run_id), "status")) == status]
