"""What the table commands print when their output is not a terminal (a pipe, a file, a
log), and their ``--json``: the real command in a process of its own, its stdout a pipe,
against a real redis-server.

Off a terminal nothing is cut and nothing wraps: a run id, a trigger, a path or a node's
detail is there whole, to copy, and a row of a table is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from imagesync.outcomes import FAILED, PULLED, Outcome
from imagesync.runs import RunStore
from testcluster.cluster import toml_dumps

pytestmark = pytest.mark.cluster

RUN = "20261204-213015-3f9a1c"
#: longer than a terminal line: the summary line of a failed pull must not wrap
REASON = "registry.test/team/service-with-a-long-name:1.2.3 not found: manifest unknown (the tag was deleted?)"


def _cli(config, *argv: str, columns: str | None = None) -> subprocess.CompletedProcess:
    """``imagesync ARGV`` as an operator's pipe runs it: stdout and stderr are pipes, not a
    terminal; ``columns``: the COLUMNS a shell would export (none by default: 80 columns)."""
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    env["IMAGESYNC_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "imagesync.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def config(redis_server, redis_client, tmp_path):
    # a deep log_dir: `config show`'s value column is wider than 80 columns
    log_dir = tmp_path / "a-log-directory-whose-path-is-longer-than-a-terminal-line" / "imagesync" / "logs"
    path = tmp_path / "imagesync.toml"
    path.write_text(toml_dumps({"prefixes": ["registry.test"], "redis_url": redis_server.url,
                                "log_dir": str(log_dir),
                                "nodes": [{"name": "worker-with-a-long-name-1", "transport": "local",
                                           "runtime": "ctr", "endpoint": str(tmp_path / "no-containerd.sock")}]}))
    return path


@pytest.fixture
def recorded(redis_client):
    """A finished run started by the webhook, with one pull failed, as the history keeps it."""
    store = RunStore(redis_client, stale_after=60, lock_ttl=60, history=50)
    image = "registry.test/team/service-with-a-long-name:1.2.3"
    pulls = [("worker-with-a-long-name-1", image), ("worker-2", "registry.test/a:1")]
    store.create(RUN, trigger="webhook", pulls=pulls, skipped={}, drift=[], refused=[], wanted=2)
    store.record(RUN, Outcome("worker-2", "registry.test/a:1", PULLED, duration=1.5))
    store.record(RUN, Outcome("worker-with-a-long-name-1", image, FAILED, duration=2.0, reason=REASON))
    return RUN


@pytest.mark.parametrize("columns", [None, "40"])
def test_history_to_a_pipe_shows_whole_run_ids_and_triggers_one_line_per_run(config, recorded, columns):
    result = _cli(config, "history", columns=columns)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "┃" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["run", "trigger", "status", "pulls", "ok", "failed",
                                                                  "not run", "skipped nodes", "took"]
    rows = [line for line in lines if "│" in line]
    assert len(rows) == 1, result.stdout  # one line for the one run: no cell wrapped onto a second
    cells = [cell.strip() for cell in rows[0].split("│")[1:-1]]
    assert cells[:6] == [RUN, "webhook", "completed", "2", "1", "1"]
    assert "…" not in result.stdout


def test_history_of_one_run_to_a_pipe_keeps_each_line_whole(config, recorded):
    result = _cli(config, "history", RUN)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"run {RUN} completed in ")
    assert f"  worker-with-a-long-name-1: registry.test/team/service-with-a-long-name:1.2.3 failed: {REASON}" in lines


def test_history_json_is_the_run_records(config, recorded):
    result = _cli(config, "history", "--json")
    assert result.returncode == 0, result.stderr
    [run] = json.loads(result.stdout)
    assert (run["id"], run["trigger"], run["status"], run["counts"]) == (RUN, "webhook", "completed",
                                                                         {PULLED: 1, FAILED: 1})
    result = _cli(config, "history", "--json", RUN)
    assert result.returncode == 0, result.stderr
    one = json.loads(result.stdout)
    assert [(o["node"], o["status"], o["reason"]) for o in one["results"]] == [
        ("worker-2", PULLED, ""), ("worker-with-a-long-name-1", FAILED, REASON)]


def test_config_show_to_a_pipe_shows_whole_values_and_has_json(config):
    result = _cli(config, "config", "show")
    assert result.returncode == 0, result.stderr
    log_dir = str(config.parent / "a-log-directory-whose-path-is-longer-than-a-terminal-line" / "imagesync" / "logs")
    row = next(line for line in result.stdout.splitlines() if "│ log_dir " in line)
    assert [cell.strip() for cell in row.split("│")[1:-1]] == ["log_dir", log_dir, "file"]
    assert str(config) in result.stdout  # the title names the file, whole
    result = _cli(config, "config", "show", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["path"] == str(config)
    rows = {row["key"]: row for row in shown["settings"]}
    assert rows["log_dir"]["value"] == log_dir and rows["log_dir"]["from"].startswith("file")
    assert rows["prefixes"]["value"] == "registry.test"


def test_check_json_has_a_row_per_node_and_the_same_exit_code(config):
    table = _cli(config, "check")
    result = _cli(config, "check", "--json")
    assert result.returncode == table.returncode == 1, result.stderr  # the node's containerd does not answer
    checked = json.loads(result.stdout)
    assert checked["version"].startswith("imagesync ")
    assert checked["configuration"] == str(config)
    [node] = checked["nodes"]
    assert (node["node"], node["ok"], node["ssh"]) == ("worker-with-a-long-name-1", False, "ok")
    assert "FAILED" in (node["runtime"], node["images"]) and node["detail"]
    # the table, to a pipe: the node's row is one line with the detail whole
    row = next(line for line in table.stdout.splitlines() if "worker-with-a-long-name-1" in line)
    assert node["detail"] in row
    assert "imagesync: 1 of 1 nodes failed the check: worker-with-a-long-name-1" in result.stderr


def test_following_a_run_hears_of_its_end_at_once_and_prints_its_summary(config, redis_client, monkeypatch,
                                                                        capsys):
    from concurrent.futures import ThreadPoolExecutor

    from helpers import wait_for

    from imagesync.cli import runs as cli_runs
    from imagesync.config import load_settings
    from imagesync.runs import channel
    from imagesync.runstores import run_store

    # only the run's channel can end the wait in time: a read of the record comes every 60 s
    monkeypatch.setattr(cli_runs, "POLL", 60.0)
    settings = load_settings(config, {})
    store = run_store(settings, redis_client)
    pulls = [("worker-2", "registry.test/a:1"), ("worker-2", "registry.test/b:1")]
    store.create(RUN, trigger="cli", pulls=pulls, skipped={}, drift=[], refused=[], wanted=2)
    with ThreadPoolExecutor(1) as pool:
        following = pool.submit(cli_runs.follow, settings, redis_client, RUN)
        wait_for(lambda: following.done() or redis_client.pubsub_numsub(channel(RUN))[0][1] == 1, 20,
                 "the follower's subscription")
        assert not following.done(), following.result()
        store.record(RUN, Outcome("worker-2", "registry.test/a:1", PULLED, duration=1.0))
        store.record(RUN, Outcome("worker-2", "registry.test/b:1", PULLED, duration=1.0))
        assert following.result(timeout=20) == 0
    assert f"run {RUN} completed" in capsys.readouterr().out
