"""Log files, day by day as the seed tool keeps them.

Under ``log_dir`` each day has its own folder, holding the seed's three files::

    log_dir/2026-11-22/image-sync.log       everything
    log_dir/2026-11-22/success_images.log   one line per image that a node now holds
    log_dir/2026-11-22/failed_images.log    one line per image a node could not get

Several processes (one worker per node, beat, the CLI) append to the same
files, so every line is written with a single ``write`` on a file opened with
O_APPEND, and a file is never rotated under a writer: a new day is a new folder.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .runs import Outcome

MAIN_LOG = "image-sync.log"
SUCCESS_LOG = "success_images.log"
FAILED_LOG = "failed_images.log"

FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(message)s"


def day_dir(log_dir: Path, when: float | None = None) -> Path:
    return Path(log_dir) / time.strftime("%Y-%m-%d", time.localtime(when))


def append(log_dir: Path, name: str, line: str, when: float | None = None) -> None:
    folder = day_dir(log_dir, when)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode("utf-8", "replace"))
    finally:
        os.close(fd)


class DailyFileHandler(logging.Handler):
    """Appends records to ``log_dir/<today>/image-sync.log``."""

    def __init__(self, log_dir: Path, name: str = MAIN_LOG) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        self.name_ = name

    def emit(self, record: logging.LogRecord) -> None:
        try:
            append(self.log_dir, self.name_, self.format(record), record.created)
        except OSError as exc:
            # Not a traceback per line on a full disk: one error, through the
            # other handlers (stderr, the journal).
            if record.name != "imagesync" or not record.getMessage().startswith("log_dir:"):
                report_unwritable(self.log_dir, exc)
        except Exception:
            self.handleError(record)


def check_log_dir(log_dir: Path) -> None:
    """Fail early, with one line, if ``log_dir`` cannot be written."""
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(log_dir) / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            [f"log_dir: cannot write to {log_dir} ({exc.strerror}): create it with the right "
             "owner or set log_dir to a writable folder"]
        ) from exc


def file_handler(log_dir: Path) -> DailyFileHandler:
    handler = DailyFileHandler(log_dir)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def setup(log_dir: Path | None, level: int = logging.INFO, stderr: bool = True) -> None:
    """The one logging setup of a CLI process: stderr and the day's image-sync.log."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if stderr:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        console.setLevel(logging.WARNING)
        root.addHandler(console)
    if log_dir is not None:
        root.addHandler(file_handler(log_dir))
    for noisy in ("paramiko", "invoke", "fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_unwritable: set[str] = set()


def report_unwritable(log_dir: Path, error: OSError) -> None:
    """Say once per process and folder, loudly, that pull lines cannot be written.

    The outcome itself is safe in the run record (``imagesync history``).
    """
    if str(log_dir) in _unwritable:
        return
    _unwritable.add(str(log_dir))
    logging.getLogger("imagesync").error(
        "log_dir: cannot write pull lines to %s (%s): outcomes are kept in Redis (imagesync history); "
        "free space or fix the folder's permissions", log_dir, error.strerror or error)


def record_pull(log_dir: Path, run_id: str, outcome: Outcome) -> None:
    """One line in success_images.log or failed_images.log for a finished pull."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(outcome.finished))
    line = (
        f"{stamp} run={run_id} node={outcome.node} image={outcome.image} "
        f"status={outcome.status} duration={outcome.duration:.1f}s attempts={outcome.attempts}"
    )
    if outcome.succeeded:
        append(log_dir, SUCCESS_LOG, line, outcome.finished)
    else:
        reason = outcome.reason.replace("\n", " ").replace('"', "'")
        append(log_dir, FAILED_LOG, f'{line} reason="{reason}"', outcome.finished)
