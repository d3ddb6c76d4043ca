"""Time limits in a worker whose pool is threads (imagesync.timelimits): Celery keeps none there.

The cluster tests (tests/test_shared_worker.py, tests/test_node_timeouts.py) show a pull
stopped at its limit on real nodes; these show the watchdog's rules on plain threads.
"""

from __future__ import annotations

import threading
import time

import pytest

from imagesync import timelimits
from imagesync.timelimits import Watchdog


class Interrupted(Exception):
    pass


@pytest.fixture
def watchdog():
    dog = Watchdog(Interrupted)
    dog.start()
    return dog


def _in_thread(target):
    outcome = {}

    def run():
        try:
            outcome["value"] = target()
        except BaseException as exc:  # what the task saw
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    return outcome


def test_a_task_past_the_middle_of_its_soft_and_hard_limits_is_interrupted(watchdog):
    def task():
        watchdog.began("t1", "imagesync.pull", soft=0.2, hard=0.6)
        try:
            give_up = time.monotonic() + 20
            while time.monotonic() < give_up:  # Python code that never looks at the clock it was given
                pass
            return "ran to the end"
        finally:
            watchdog.ended()

    began = time.monotonic()
    outcome = _in_thread(task)
    assert isinstance(outcome.get("error"), Interrupted), outcome
    assert 0.4 <= time.monotonic() - began < 15


def test_a_task_that_ends_in_time_is_left_alone_and_so_is_the_next_one_on_its_thread(watchdog):
    def tasks():
        watchdog.began("t1", "imagesync.pull", soft=0.2, hard=0.4)
        watchdog.ended()
        # the same thread runs the same task id again (a pull put back in its queue), with longer limits
        watchdog.began("t1", "imagesync.pull", soft=5, hard=10)
        try:
            time.sleep(1)  # well past where the first run would have been interrupted
            return "done"
        finally:
            watchdog.ended()

    assert _in_thread(tasks) == {"value": "done"}


def test_what_is_left_of_a_task_bounds_its_waits():
    assert timelimits.left() is None and timelimits.clamp(30) == 30  # no limit: a prefork worker
    dog = Watchdog(Interrupted)

    def task():
        dog.began("t1", "imagesync.pull", soft=2, hard=3)
        try:
            return timelimits.clamp(30), timelimits.clamp(0.5)
        finally:
            dog.ended()

    long_wait, short_wait = _in_thread(task)["value"]
    assert 1 < long_wait <= 2 and short_wait == 0.5
    assert timelimits.left() is None  # another thread's deadline is not this one's
