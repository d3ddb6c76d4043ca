"""Task time limits in a worker whose pool is threads, where Celery enforces none.

A prefork worker stops a pull at its limits: SIGUSR1 raises
SoftTimeLimitExceeded in the pool process at the soft limit, and the process
is killed at the hard one. A thread can be neither signalled nor killed, so a
worker whose pool is threads (``imagesync worker --all-nodes``) keeps the
limits itself, in two ways:

* **At the soft limit, every command of the task gives up.** The task's
  deadline is kept per thread (:func:`left`); an SSH command the task runs
  waits for its channel no longer than that (:func:`clamp`, in
  ``SSHTransport.run``), then closes the channel and raises CommandTimedOut,
  which the pull reports as timed out. The node-side ``timeout`` has ended the
  command on the node by then: it is shorter than the soft limit
  (imagesync.budgets).
* **Halfway to the hard limit, a task still running is interrupted:** the
  watchdog raises the soft-limit exception in its thread
  (``PyThreadState_SetAsyncExc``), as the prefork pool's signal does, for
  whatever waits outside an SSH command. Python delivers it at the thread's
  next bytecode, so a call blocked in C (a socket read without a timeout)
  gets it when that call returns; every network call of imagesync has a
  timeout. At the hard limit a task still running is logged, once: unlike a
  process, a thread cannot be killed.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("imagesync")

_local = threading.local()


def left() -> float | None:
    """Seconds left before the soft limit of the task this thread runs; None without one."""
    deadline = getattr(_local, "deadline", None)
    return None if deadline is None else deadline - time.monotonic()


def clamp(timeout: float) -> float:
    """``timeout``, cut to what is left of this thread's task (at least 1 ms: a wait that gives up at once)."""
    remaining = left()
    return timeout if remaining is None else max(0.001, min(timeout, remaining))


@dataclass
class _Task:
    """A task running in a thread, and when its limits fall due."""

    task_id: str
    name: str
    soft_due: float  # halfway from the soft to the hard limit: interrupted
    hard_due: float  # logged
    hard: float
    interrupted: bool = False

    def due(self) -> float:
        return self.hard_due if self.interrupted else self.soft_due


class Watchdog:
    """Keeps the time limits of the tasks that run in this process's threads.

    ``began`` and ``ended`` are called in the thread that runs the task (Celery's
    ``task_prerun`` and ``task_postrun``). ``interrupt`` is the exception raised in
    a task that outlives the middle of its soft and hard limits. It holds one
    entry per running task, nothing of those that ended.
    """

    def __init__(self, interrupt: type[BaseException]) -> None:
        self.interrupt = interrupt
        self._running: dict[int, _Task] = {}  # thread -> its task
        self._next: float | None = None  # when the watchdog looks next
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="imagesync-time-limits", daemon=True)
        self._thread.start()

    def began(self, task_id: str, name: str, soft: float | None, hard: float | None) -> None:
        """The current thread starts ``task_id``, with its limits in seconds (None: no limit)."""
        if soft is None and hard is None:
            return
        now = time.monotonic()
        soft = soft if soft is not None else hard
        hard = max(soft or 0.0, hard if hard is not None else 0.0)
        assert soft is not None
        _local.deadline = now + soft
        task = _Task(task_id, name, now + (soft + hard) / 2, now + hard, hard)
        with self._wake:
            self._running[threading.get_ident()] = task
            if self._next is None or task.due() < self._next:
                self._wake.notify()

    def ended(self) -> None:
        """The current thread's task has ended: nothing of its limits may reach the next task."""
        _local.deadline = None
        thread = threading.get_ident()
        with self._wake:
            task = self._running.pop(thread, None)
            if task is not None and task.interrupted:  # not delivered yet, if the task ended first: cancelled
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), None)

    def _watch(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                for thread, task in list(self._running.items()):
                    if task.due() <= now:
                        self._expire(thread, task)
                dues = [task.due() for task in self._running.values() if task.due() > now]
                self._next = min(dues) if dues else None
                self._wake.wait(None if self._next is None else self._next - now)

    def _expire(self, thread: int, task: _Task) -> None:
        if not task.interrupted:
            log.warning("task %s[%s] runs past its time limit: interrupted", task.name, task.task_id)
            task.interrupted = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(self.interrupt))
        else:
            log.error("task %s[%s] still runs past its hard time limit (%g s) although interrupted: a thread "
                      "cannot be killed; restart the worker if it stays stuck", task.name, task.task_id, task.hard)
            del self._running[thread]  # logged once
