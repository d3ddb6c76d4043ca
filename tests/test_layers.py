"""The layers of imagesync/ (pyproject.toml, [tool.importlinter]): each module imports only
from its own layer or below, type-only and in-function imports included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root``, with the checkout's contract."""
    return subprocess.run([LINT_IMPORTS, "--no-cache", str(REPO / "pyproject.toml")], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120)


def test_every_module_imports_only_from_its_layer_or_below():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_lower_module_importing_a_higher_one_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "imagesync", tmp_path / "imagesync", ignore=shutil.ignore_patterns("__pycache__"))
    keys = tmp_path / "imagesync" / "keys.py"
    # an import inside a function counts all the same
    keys.write_text(keys.read_text() + "\n\ndef _later() -> None:\n    from .sync import run_store  # noqa: F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "imagesync.keys -> imagesync.sync" in result.stdout, result.stdout


def test_planning_importing_a_node_transport_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "imagesync", tmp_path / "imagesync", ignore=shutil.ignore_patterns("__pycache__"))
    planner = tmp_path / "imagesync" / "planning" / "planner.py"
    planner.write_text(planner.read_text() + "\n\ndef _later() -> None:\n    from .. import transport  # noqa: F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "imagesync.planning is not allowed to import imagesync.transport" in result.stdout, result.stdout
