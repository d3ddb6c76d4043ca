"""The CLI imports only what a command needs: ``imagesync sync`` sends a task and reaches no
node itself, so it never loads paramiko or Fabric (a tenth of a second); ``history`` reads
Redis alone, so it never loads Celery either.

Each command runs in a fresh interpreter, as an operator starts it, with no Redis: what
would talk to Redis or the broker is replaced at the edge (the client, the run store,
``send_task``), and the modules loaded by then are what the command imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagesync.config import load_settings
from imagesync.errors import ConfigError
from testcluster.cluster import toml_dumps

#: what SSH costs at import: none of it belongs to a command that reaches no node
SSH_LIBRARIES = ("paramiko", "fabric", "invoke")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A configuration with an SSH node and an SSH client configuration file to read."""
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("Host k8s-worker1\n    HostName 10.0.0.5\n    Port 2222\n")
    path = tmp_path / "imagesync.toml"
    path.write_text(toml_dumps({"prefixes": ["registry.test"], "redis_url": "redis://127.0.0.1:1/0",
                                "log_dir": str(tmp_path / "logs"), "ssh": {"config_file": str(ssh_config)},
                                "nodes": [{"name": "k8s-worker1"}]}))
    return path


def _loaded(config: Path, script: str) -> list[str]:
    """The top-level packages loaded when ``script`` (which prints them as JSON) ends."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGESYNC_")}
    result = subprocess.run([sys.executable, "-c", script], env=env | {"IMAGESYNC_CONFIG": str(config)},
                            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


SYNC = """
import json, sys
import celery.app.base
import imagesync.cli.runs
from imagesync.cli import main

class Sent(Exception):
    pass

def send_task(self, name, **options):
    raise Sent(name)

celery.app.base.Celery.send_task = send_task
imagesync.cli.runs.redis_client = lambda settings, **options: None
try:
    main(["sync", "--wait"])
except Sent:
    print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""

HISTORY = """
import json, sys
import imagesync.cli.runs
import imagesync.runstores
from imagesync.cli import main

class Store:
    def recent(self, limit):
        return []

imagesync.runstores.run_store = lambda settings, redis: Store()
imagesync.cli.runs.redis_client = lambda settings, **options: None
assert main(["history"]) == 0
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_sync_sends_its_task_without_loading_paramiko_or_fabric(config):
    loaded = _loaded(config, SYNC)
    assert "celery" in loaded  # it got as far as the Celery app
    assert [name for name in SSH_LIBRARIES if name in loaded] == []


def test_history_loads_neither_celery_nor_paramiko(config):
    loaded = _loaded(config, HISTORY)
    assert "imagesync" in loaded and "rich" in loaded  # it printed its table
    assert [name for name in ("celery", "kombu", *SSH_LIBRARIES) if name in loaded] == []


def test_settings_read_without_ssh_read_the_ssh_config_when_first_asked(tmp_path):
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("Host k8s-worker1\n    HostName 10.0.0.5\n    Port 2222\n")
    path = tmp_path / "imagesync.toml"
    path.write_text(toml_dumps({"prefixes": ["registry.test"], "ssh": {"config_file": str(ssh_config)},
                                "nodes": [{"name": "k8s-worker1"}]}))
    settings = load_settings(path, {}, ssh=False)
    target = settings.ssh_target(settings.node("k8s-worker1"))
    assert (target.host, target.port) == ("10.0.0.5", 2222)

    # a broken line: one clear problem at load for a command that reaches nodes, at first use otherwise
    ssh_config.write_text("Host k8s-worker1\n    Port abc\n")
    problem = f"ssh config {ssh_config} line 2: Port 'abc' is not a port number: use 1 to 65535"
    with pytest.raises(ConfigError) as at_load:
        load_settings(path, {})
    assert at_load.value.problems == [problem]
    settings = load_settings(path, {}, ssh=False)
    with pytest.raises(ConfigError) as at_use:
        settings.ssh_target(settings.node("k8s-worker1"))
    assert at_use.value.problems == [problem]
