"""Time limits and stop requests, decided with no sockets and no clock of their own.

The side that supervises a worker (the local pool's I/O thread) tells a
``TaskControl`` what happens, a task began on a worker, a stop was asked, a result
came back, a worker died, and asks it what is due::

    began(task, worker) ---+                  due(now) --> [("soft", watch), ("kill", watch)]
    stop(task, worker) ----+--> watches --->  next_due() --> when to look again
    finished(task id) / lost(worker) ---> the watch, to word the outcome (outcome_of)

A stop is two steps: a soft one (the worker turns a signal into ``TaskInterrupted``
raised in the task, so its ``finally`` blocks run), then, if the task still holds its
worker once the grace is over, the worker is killed and replaced. The deadline is kept
here, on the supervisor's side, never in the task's own process: a task stuck in C
code, ignoring signals or holding the GIL is stopped all the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import TaskStopped, TaskTimeout

__all__ = ["DEFAULT_GRACE", "INTERRUPT_GRACE", "OPTION_NAMES", "TaskControl", "TaskOptions",
           "Watch", "check_task_options", "outcome_of", "retries_after_loss",
           "retry_after_stop"]

# Seconds a stopped task has between the soft stop and the kill, unless told.
DEFAULT_GRACE = 3.0
# The grace of the running tasks Ctrl-C stops (and terminate_workers on the daemons).
INTERRUPT_GRACE = 1.0
TIMED_OUT = "timeout"
STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Options applied to each task an ``Executor.options(...)`` view submits."""

    timeout: float | None = None  # seconds of running, then the task is stopped
    retries: int | None = None  # runs again after a loss or a time limit (None: the executor's)
    grace: float | None = None  # seconds between the soft stop and the kill
    priority: int = 0  # higher first within one client's queue

    def stop_grace(self) -> float:
        return DEFAULT_GRACE if self.grace is None else self.grace


def _seconds(name: str, value: Any, *, zero_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    from .protocol import MAX_SECONDS

    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok) or value > MAX_SECONDS:
        wanted = "zero or more" if zero_ok else "more than zero"
        raise ValueError(f"{name} must be a finite number of seconds, {wanted}, not {value!r}")
    return float(value)


OPTION_NAMES = ("timeout", "retries", "grace", "priority")


def check_task_options(options: Mapping[str, Any], base: TaskOptions | None = None
                       ) -> TaskOptions:
    """Per-task options checked once, at ``Executor.options(...)``: an unknown name is
    a ``TypeError`` naming the known ones; a bad value a ``TypeError`` or
    ``ValueError``. ``base``: the options of the view this one refines."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown task option{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))}; the options are "
                        f"{', '.join(OPTION_NAMES)}")
    from .protocol import MAX_PRIORITY

    priority = options.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise TypeError(f"priority must be an int, not {type(priority).__name__}")
    if priority is not None and not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be from {-MAX_PRIORITY} to {MAX_PRIORITY}, not {priority}")
    merged = {} if base is None else {name: getattr(base, name) for name in OPTION_NAMES}
    merged.update(options)
    timeout, retries, grace = merged.get("timeout"), merged.get("retries"), merged.get("grace")
    if timeout is not None:
        timeout = _seconds("timeout", timeout, zero_ok=False)
    if grace is not None:
        grace = _seconds("grace", grace, zero_ok=True)
    if retries is not None:
        from .backends.options import check_retries

        check_retries(retries)
    return TaskOptions(timeout=timeout, retries=retries, grace=grace,
                       priority=int(merged.get("priority") or 0))


@dataclass(eq=False, slots=True)
class Watch:
    """One task under a time limit, or being stopped."""

    task: Any  # a dispatch.Task (its task_id, label and attempts are read)
    worker_id: bytes
    deadline: float = math.inf  # when its time limit runs out
    grace: float = DEFAULT_GRACE
    limit: float | None = None  # the time limit, for messages
    why: str | None = None  # TIMED_OUT or STOPPED once a stop was asked
    kill_at: float = math.inf
    killed: bool = False


class TaskControl:
    """The watched tasks of one supervisor, by task id."""

    def __init__(self) -> None:
        self.watches: dict[int, Watch] = {}

    def __bool__(self) -> bool:
        return bool(self.watches)

    def began(self, task: Any, worker_id: bytes, limit: float, grace: float,
              now: float) -> None:
        """``task``, with a time limit of ``limit`` seconds, began on ``worker_id``."""
        self.watches[task.task_id] = Watch(task, worker_id, now + limit, grace, limit)

    def head_began(self, worker_id: bytes, held: dict[int, Any], slots: int, now: float
                   ) -> None:
        """The tasks at the head of ``worker_id``'s queue (``held``, in the order it
        runs them; the first ``slots`` run now) have begun: the clocks of the timed
        ones start. Called when tasks go to a worker and when its results come: a
        task handed ahead starts once those before it have answered (late by at most
        a result batch's hold, never early)."""
        for running, task in enumerate(held.values()):
            if running >= slots:
                return
            options = task.options
            if (options is not None and options.timeout is not None
                    and task.task_id not in self.watches):
                self.began(task, worker_id, options.timeout, options.stop_grace(), now)

    def stop(self, task: Any, worker_id: bytes, grace: float, now: float) -> Watch:
        """``Executor.stop`` on a task that ``worker_id`` holds: the soft stop is due
        now (the caller sends it), the kill after ``grace``."""
        watch = self.watches.get(task.task_id)
        if watch is None:
            watch = self.watches[task.task_id] = Watch(task, worker_id, grace=grace)
        if watch.why is None or watch.why == TIMED_OUT:
            watch.why = STOPPED
            if now + grace < watch.kill_at:
                watch.kill_at, watch.grace = now + grace, grace  # the grace its message names
        watch.deadline = math.inf
        return watch

    def due(self, now: float) -> list[tuple[str, Watch]]:
        """What to do now: ``("soft", watch)`` for a limit that ran out (signal the
        worker), ``("kill", watch)`` for a grace that is over (kill the worker)."""
        actions: list[tuple[str, Watch]] = []
        for watch in self.watches.values():
            if watch.deadline <= now:
                watch.deadline = math.inf
                watch.why = TIMED_OUT
                watch.kill_at = now + watch.grace
                actions.append(("soft", watch))
            elif watch.kill_at <= now and not watch.killed:
                watch.killed = True
                actions.append(("kill", watch))
        return actions

    def next_due(self) -> float | None:
        """When ``due`` has something next (a monotonic time), None if never."""
        soonest = math.inf
        for watch in self.watches.values():
            soonest = min(soonest, watch.deadline, math.inf if watch.killed else watch.kill_at)
        return None if soonest == math.inf else soonest

    def finished(self, task_id: int) -> Watch | None:
        """The worker answered ``task_id``: forget it; its watch if it had one."""
        return self.watches.pop(task_id, None)

    def lost(self, worker_id: bytes) -> dict[int, Watch]:
        """``worker_id`` died (killed by us, or on its own): its tasks' watches."""
        gone = {tid: w for tid, w in self.watches.items() if w.worker_id == worker_id}
        for task_id in gone:
            del self.watches[task_id]
        return gone


def retry_after_stop(task: Any, error: BaseException, retries: int) -> bool:
    """Whether a task stopped with ``error`` runs again: after a time limit, while its
    ``retries`` allow (counted in ``attempts``); after ``Executor.stop``, never."""
    if isinstance(error, TaskTimeout) and task.attempts < retries:
        task.attempts += 1
        return True
    return False


def retries_after_loss(watches: dict[int, Watch], task: Any, retries: int) -> int:
    """How often a dead worker's ``task`` may run again (``plan_loss``): none if it
    was being stopped by ``Executor.stop``, else ``retries``."""
    watch = watches.get(task.task_id)
    return 0 if watch is not None and watch.why == STOPPED else retries


def outcome_of(watch: Watch | None, ran: float | None, *, died: bool = False,
               who: str | None = None) -> BaseException | None:
    """The error a watched task's future fails with, or None when its own outcome
    stands: it was never stopped, or it returned within its limit (``ran``: the run
    time its worker measured for a result, not an error; the result was on the way
    when the limit ran out).
    ``died``: its worker is gone (killed after the grace, or died on its own).
    ``who``: how the message names the task (default "task ID (LABEL)"; the
    scheduler gives "" and its client names the task by its own id)."""
    if watch is None or watch.why is None:
        return None
    task = watch.task
    if who is None:
        who = f"task {task.task_id} ({task.label}) "
    if watch.why == TIMED_OUT:
        if not died and ran is not None and watch.limit is not None and 0 <= ran <= watch.limit:
            return None
        how = _how_stopped(watch, died, killed="was killed with its worker after a grace of "
                           f"{watch.grace:g} s", interrupted="was interrupted")
        return TaskTimeout(f"{who}ran past its time limit of {watch.limit:g} s and {how}")
    how = _how_stopped(watch, died, killed=f"its worker was killed after a grace of "
                       f"{watch.grace:g} s", interrupted="it was interrupted")
    return TaskStopped(f"{who}was stopped while running: {how}")


def _how_stopped(watch: Watch, died: bool, *, killed: str, interrupted: str) -> str:
    if not died:
        return interrupted
    return killed if watch.killed else "its worker died while it was being stopped"
