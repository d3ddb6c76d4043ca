"""Log retention: day folders older than log_keep_days go, nothing else does."""

from __future__ import annotations

import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest

from imagesync import logs
from imagesync.config import Settings, load_settings
from imagesync.errors import ConfigError
from imagesync.outcomes import Outcome

#: noon, so that no test depends on the hour it runs at
NOW = datetime(2026, 11, 22, 12, 0).timestamp()
TODAY = date(2026, 11, 22)


def day(offset: int) -> str:
    return (TODAY - timedelta(days=offset)).isoformat()


def make_day(log_dir: Path, name: str) -> Path:
    folder = log_dir / name
    folder.mkdir(parents=True)
    (folder / logs.MAIN_LOG).write_text("a line\n")
    (folder / logs.SUCCESS_LOG).write_text("a line\n")
    return folder


def test_day_folders_older_than_the_limit_go_and_everything_else_stays(tmp_path):
    log_dir = tmp_path / "logs"
    for offset in (-1, 0, 1, 29, 30, 31, 32, 400):
        make_day(log_dir, day(offset))
    outside = tmp_path / "elsewhere"
    make_day(outside, day(100))
    # what is not a day folder of ours: files, other folders, a link, non-dates
    (log_dir / "beat-schedule").write_text("beat's own file")
    (log_dir / day(100)).write_text("a file named like a date")
    (log_dir / day(101)).symlink_to(outside / day(100))
    (log_dir / "2025-13-45").mkdir()
    (log_dir / "2025-01-01.old").mkdir()
    (log_dir / "notes").mkdir()
    (log_dir / "notes" / day(200)).mkdir()
    before = sorted(p.name for p in log_dir.iterdir())

    removed = logs.prune(log_dir, 30, now=NOW)

    assert removed == [day(400), day(32), day(31)]  # by name, oldest first
    assert sorted(p.name for p in log_dir.iterdir()) == sorted(set(before) - set(removed))
    for offset in (-1, 0, 1, 29, 30):
        assert (log_dir / day(offset) / logs.MAIN_LOG).read_text() == "a line\n"
    assert (log_dir / day(100)).read_text() == "a file named like a date"
    assert (log_dir / day(101)).is_symlink() and (outside / day(100) / logs.MAIN_LOG).exists()
    assert (log_dir / "notes" / day(200)).is_dir()
    # a second pass has nothing left to do
    assert logs.prune(log_dir, 30, now=NOW) == []


def test_zero_keeps_everything_and_a_missing_log_dir_is_no_error(tmp_path):
    make_day(tmp_path, day(5000))
    assert logs.prune(tmp_path, 0, now=NOW) == []
    assert (tmp_path / day(5000)).is_dir()
    assert logs.prune(tmp_path / "missing", 30, now=NOW) == []


def test_one_day_keeps_today_and_yesterday(tmp_path):
    for offset in (0, 1, 2):
        make_day(tmp_path, day(offset))
    assert logs.prune(tmp_path, 1, now=NOW) == [day(2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [day(1), day(0)]


def test_the_folder_being_written_to_is_never_removed(tmp_path):
    """Writers append to today's folder while housekeeping runs with the tightest limit."""
    old = make_day(tmp_path, (date.today() - timedelta(days=3)).isoformat())
    stop = threading.Event()
    written: list[int] = []

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            logs.record_pull(tmp_path, "r1", Outcome(f"w{n}", f"app:{i}", "pulled", finished=time.time()))
            i += 1
        written.append(i)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in writers:
        thread.start()
    try:
        removed = []
        for _ in range(200):
            removed += logs.prune(tmp_path, 1)
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    assert removed == [old.name]
    today = logs.day_dir(tmp_path)
    lines = (today / logs.SUCCESS_LOG).read_text().splitlines()
    if date.today().isoformat() == today.name:  # not across midnight
        assert len(lines) == sum(written)
    assert all(line.endswith("attempts=1") for line in lines)


def test_a_folder_that_cannot_be_removed_is_left_and_said_once(tmp_path, caplog, monkeypatch):
    make_day(tmp_path, day(40))
    make_day(tmp_path, day(50))

    def refuse(path, *args, **kwargs):
        if path.endswith(day(50)):
            raise PermissionError(13, "Permission denied")
        return real_rmtree(path, *args, **kwargs)

    real_rmtree = logs.shutil.rmtree
    monkeypatch.setattr(logs.shutil, "rmtree", refuse)
    monkeypatch.setattr(logs, "_said", set())
    with caplog.at_level("INFO", logger="imagesync"):
        assert logs.prune(tmp_path, 30, now=NOW) == [day(40)]
        assert logs.prune(tmp_path, 30, now=NOW) == []
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"log_dir: cannot remove the old day folder {tmp_path / day(50)} (Permission denied): "
                      "remove it by hand or fix the folder's permissions"]
    assert (tmp_path / day(50)).is_dir()
    assert f"log_dir: removed 1 day folders older than 30 days from {tmp_path}: {day(40)}" in caplog.messages


# -- the setting ------------------------------------------------------------------------------


def _load(tmp_path, text="", environ=None):
    path = tmp_path / "imagesync.toml"
    path.write_text(f'prefixes = ["bcm11"]\n{text}\n[[nodes]]\nname = "w1"\n')
    return load_settings(path, environ or {})


def test_log_keep_days_defaults_to_30_and_takes_a_file_value_or_the_environment(tmp_path):
    assert Settings.model_fields["log_keep_days"].default == 30
    assert _load(tmp_path).log_keep_days == 30
    assert _load(tmp_path, "log_keep_days = 0").log_keep_days == 0
    settings = _load(tmp_path, "log_keep_days = 7", {"IMAGESYNC_LOG_KEEP_DAYS": "90"})
    assert settings.log_keep_days == 90
    assert settings.sources["log_keep_days"] == "env IMAGESYNC_LOG_KEEP_DAYS"


@pytest.mark.parametrize("value, problem", [
    ("-1", "log_keep_days: -1 is out of range: use at least 0"),
    ('"a month"', "log_keep_days: 'a month' is not a whole number of days"),
    ("1.5", "log_keep_days: 1.5 is not a whole number of days"),
])
def test_log_keep_days_must_be_a_whole_number_of_days(tmp_path, value, problem):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, f"log_keep_days = {value}")
    assert error.value.problems == [problem]


# -- housekeeping on the real cluster ---------------------------------------------------------


@pytest.mark.cluster
def test_beats_housekeeping_prunes_the_log_dir(deploy):
    d = deploy(nodes=1)
    d.configure(log_keep_days=3)
    log_dir = d.cluster.log_dir
    today = date.today()
    old = [make_day(log_dir, (today - timedelta(days=n)).isoformat()) for n in (4, 10)]
    kept = [make_day(log_dir, (today - timedelta(days=n)).isoformat()) for n in (1, 3)]
    (log_dir / "README").write_text("not a day folder")
    d.start()
    # beat sends the housekeeping task every 30 s; its last run dated back, it sends it at once
    d.services.start_beat(due=("finalize-stale-runs",))
    deadline = time.monotonic() + 90
    while any(folder.exists() for folder in old):
        if time.monotonic() > deadline:
            pytest.fail(f"old day folders still there:\n{d.services.log('control')}")
        time.sleep(0.2)
    assert "Sending due task finalize-stale-runs (imagesync.finalize)" in d.services.log("beat")
    assert all(folder.is_dir() for folder in kept)
    assert (log_dir / "README").read_text() == "not a day folder"
    assert (log_dir / "beat-schedule").exists() or any(log_dir.glob("beat-schedule*"))
    assert logs.day_dir(log_dir).is_dir()  # today's, written by the workers
    text = (logs.day_dir(log_dir) / logs.MAIN_LOG).read_text()
    assert f"removed 2 day folders older than 3 days from {log_dir}" in text
