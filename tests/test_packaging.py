"""The wheel ships the product only: ``imagesync/`` and its dist-info, never the test cluster.

Builds the wheel from a copy of the checkout (a ``build/`` left in the checkout by
an earlier build would otherwise leak stale modules into it). With setuptools>=77
installed (the build requirement) the build runs offline, without build isolation;
with an older one, pip builds in an isolated environment, fetching setuptools
from its index.
"""

from __future__ import annotations

import ast
import configparser
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
DIST_INFO = f"imagesync-{VERSION}.dist-info"


def _setuptools_is_recent() -> bool:
    try:
        major = int(metadata.version("setuptools").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


def _copy_checkout(target: Path) -> None:
    """What setuptools sees at the root: the top-level files and every top-level package."""
    target.mkdir()
    for entry in REPO.iterdir():
        if entry.is_file():
            shutil.copy2(entry, target / entry.name)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            shutil.copytree(entry, target / entry.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    tmp = tmp_path_factory.mktemp("packaging")
    source, out = tmp / "src", tmp / "dist"
    _copy_checkout(source)
    assert (source / "testcluster" / "__init__.py").is_file(), "the copy must hold the test cluster, to leave it out"
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
            "-w", str(out), str(source)]
    if _setuptools_is_recent():
        argv.insert(4, "--no-build-isolation")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}"
    (built,) = out.glob(f"imagesync-{VERSION}-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def test_wheel_holds_only_the_product(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert [n for n in names if not n.startswith(("imagesync/", f"{DIST_INFO}/"))] == []
    assert [n for n in names if "testcluster" in n or n.startswith("imagesync/cluster")] == []
    assert f"{DIST_INFO}/RECORD" in names


def test_wheel_holds_every_product_module(wheel: zipfile.ZipFile) -> None:
    source = {p.relative_to(REPO).as_posix() for p in (REPO / "imagesync").rglob("*.py")
              if "__pycache__" not in p.parts}
    shipped = {n for n in wheel.namelist() if n.startswith("imagesync/") and n.endswith(".py")}
    assert shipped == source


def test_wheel_declares_the_console_script(wheel: zipfile.ZipFile) -> None:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(f"{DIST_INFO}/entry_points.txt").decode())
    assert entry_points["console_scripts"]["imagesync"].strip() == "imagesync.cli:main"
    assert wheel.read(f"{DIST_INFO}/top_level.txt").decode().split() == ["imagesync"]


def test_the_product_never_imports_the_test_cluster() -> None:
    offenders = []
    for path in sorted((REPO / "imagesync").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            if any(m == "testcluster" or m.startswith("testcluster.") for m in modules):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
