"""Log files, day by day as the seed tool keeps them.

Under ``log_dir`` each day has its own folder, holding the seed's three files::

    log_dir/2026-11-22/image-sync.log       everything
    log_dir/2026-11-22/success_images.log   one line per image that a node now holds
    log_dir/2026-11-22/failed_images.log    one line per image a node could not get

and a fourth, ``pruned_images.log``: one line per retired image that ``imagesync
prune`` removed from a node or kept there, and why (a removal that failed goes to
``failed_images.log``).

Several processes (one worker per node, beat, the CLI) append to the same
files, so every line is written with a single ``write`` on a file opened with
O_APPEND, and a file is never rotated under a writer: a new day is a new folder.
Day folders older than ``log_keep_days`` are removed by :func:`prune`, which the
periodic housekeeping task runs; nothing else under ``log_dir`` is ever touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .outcomes import Outcome

MAIN_LOG = "image-sync.log"
SUCCESS_LOG = "success_images.log"
FAILED_LOG = "failed_images.log"
PRUNED_LOG = "pruned_images.log"

FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(message)s"


#: the name of a day folder, as :func:`day_dir` makes it
DAY_NAME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def day_dir(log_dir: Path, when: float | None = None) -> Path:
    return Path(log_dir) / time.strftime("%Y-%m-%d", time.localtime(when))


def prune(log_dir: Path, keep_days: int, now: float | None = None) -> list[str]:
    """Remove the day folders of ``log_dir`` older than ``keep_days`` days; 0 keeps them all.

    A day folder is one whose name is a date (``2026-11-22``) and which is a
    folder, not a link to one; anything else under ``log_dir`` stays (beat's
    schedule file, an operator's notes). A folder goes once its date is more than
    ``keep_days`` days before today, in local time as :func:`day_dir` names
    them: today's folder, the one being written to, and any dated later (a
    writer whose clock runs ahead) always stay. Returns the names removed; a
    folder that cannot be removed is said once in the log and left.
    """
    if keep_days <= 0:
        return []
    today = date.fromtimestamp(time.time() if now is None else now)
    try:
        entries = sorted(os.scandir(log_dir), key=lambda entry: entry.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        _say_once(f"list {log_dir}", "log_dir: cannot list %s to remove old day folders (%s)",
                  log_dir, exc.strerror or exc)
        return []
    removed = []
    for entry in entries:
        if not DAY_NAME.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            day = date.fromisoformat(entry.name)
        except ValueError:  # 2026-13-45: not a date, not ours
            continue
        if (today - day).days <= keep_days:
            continue
        try:
            shutil.rmtree(entry.path)
        except OSError as exc:
            _say_once(f"prune {log_dir}", "log_dir: cannot remove the old day folder %s (%s): "
                      "remove it by hand or fix the folder's permissions", entry.path, exc.strerror or exc)
            continue
        removed.append(entry.name)
    if removed:
        logging.getLogger("imagesync").info(
            "log_dir: removed %d day folders older than %d days from %s: %s",
            len(removed), keep_days, log_dir, ", ".join(removed))
    return removed


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
_said: set[str] = set()


def _say_once(key: str, message: str, *args: object) -> None:
    """An error, logged once per process for ``key``: a housekeeping task runs every 30 s."""
    if key not in _said:
        _said.add(key)
        logging.getLogger("imagesync").error(message, *args)


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
    # "not applicable" is not a failure: it goes with the successes, its reason said
    append(log_dir, FAILED_LOG if outcome.failed else SUCCESS_LOG, _line(run_id, outcome), outcome.finished)


def record_prune(log_dir: Path, run_id: str, outcome: Outcome) -> None:
    """One line in pruned_images.log (removed, or kept and why) or failed_images.log for an
    image a prune judged retired on a node."""
    append(log_dir, FAILED_LOG if outcome.failed else PRUNED_LOG, _line(run_id, outcome), outcome.finished)


def _line(run_id: str, outcome: Outcome) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(outcome.finished))
    line = (
        f"{stamp} run={run_id} node={outcome.node} image={outcome.image} "
        f"status={outcome.status} duration={outcome.duration:.1f}s attempts={outcome.attempts}"
        + (f" source={outcome.source}" if outcome.source else "")
        + (f" replaced={outcome.replaced} digest={outcome.digest}" if outcome.replaced else "")
    )
    if outcome.reason:
        reason = outcome.reason.replace("\n", " ").replace('"', "'")
        line += f' reason="{reason}"'
    return line
