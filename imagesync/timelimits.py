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
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

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


@dataclass(order=True)
class _Task:
    due: float
    kind: str = field(compare=False)  # "soft" (interrupt) or "hard" (log)
    thread: int = field(compare=False)
    run: int = field(compare=False)  # which began() of the thread: a task id may run again
    task_id: str = field(compare=False)
    name: str = field(compare=False)
    hard: float = field(compare=False)


class Watchdog:
    """Keeps the time limits of the tasks that run in this process's threads.

    ``began`` and ``ended`` are called in the thread that runs the task (Celery's
    ``task_prerun`` and ``task_postrun``). ``interrupt`` is the exception raised in
    a task that outlives the middle of its soft and hard limits.
    """

    def __init__(self, interrupt: type[BaseException]) -> None:
        self.interrupt = interrupt
        self._running: dict[int, tuple[int, bool]] = {}  # thread -> (its run, interrupted)
        self._runs = itertools.count()
        self._due: list[_Task] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="imagesync-time-limits", daemon=True)
        self._thread.start()

    def began(self, task_id: str, name: str, soft: float | None, hard: float | None) -> None:
        """The current thread starts ``task_id``, with its limits in seconds (None: no limit)."""
        if soft is None and hard is None:
            return
        now, thread = time.monotonic(), threading.get_ident()
        soft = soft if soft is not None else hard
        hard = hard if hard is not None else soft
        assert soft is not None and hard is not None
        _local.deadline = now + soft
        with self._wake:
            run = next(self._runs)
            self._running[thread] = (run, False)
            middle, hard = now + (soft + max(soft, hard)) / 2, max(soft, hard)
            heapq.heappush(self._due, _Task(middle, "soft", thread, run, task_id, name, hard))
            heapq.heappush(self._due, _Task(now + hard, "hard", thread, run, task_id, name, hard))
            self._wake.notify()

    def ended(self) -> None:
        """The current thread's task has ended: nothing of its limits may reach the next task."""
        _local.deadline = None
        thread = threading.get_ident()
        with self._wake:
            _, interrupted = self._running.pop(thread, (-1, False))
            if interrupted:  # not delivered yet, if the task ended first: cancelled
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), None)

    def _watch(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                while self._due and self._due[0].due <= now:
                    self._expire(heapq.heappop(self._due))
                self._wake.wait(self._due[0].due - now if self._due else None)

    def _expire(self, task: _Task) -> None:
        running = self._running.get(task.thread)
        if running is None or running[0] != task.run:
            return  # ended in time
        if task.kind == "soft":
            log.warning("task %s[%s] runs past its time limit: interrupted", task.name, task.task_id)
            self._running[task.thread] = (task.run, True)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(task.thread), ctypes.py_object(self.interrupt))
        else:
            log.error("task %s[%s] still runs past its hard time limit (%g s) although interrupted: a thread "
                      "cannot be killed; restart the worker if it stays stuck", task.name, task.task_id, task.hard)
