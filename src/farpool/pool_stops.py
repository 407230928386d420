"""The process pool's time limits and stops: what ``task_control`` decides, carried
out on the worker processes (the soft stop by signal, the kill by pidfd).

A time limit's clock starts when its task heads its worker's queue (``start_clocks``,
after each send and each result); the I/O loop's timer calls ``act_on_timers``;
``Executor.stop`` reaches ``take_stop_requests``. See docs/architecture.md, "The path
of a time limit".
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from .dispatch import Task, WorkerSlot
from .errors import TaskStopped
from .pool_caller import STOP_ALL
from .task_control import retry_after_stop

if TYPE_CHECKING:
    from collections import deque

    from .dispatch import Dispatcher
    from .pool import FutureSink
    from .spawn import WorkerProcess
    from .task_control import TaskControl

log = logging.getLogger("farpool.pool")

__all__ = ["PoolStops"]


class PoolStops:
    """Mixed into ``ProcessPoolIO`` (the names below are its own)."""

    if TYPE_CHECKING:
        control: TaskControl
        dispatcher: Dispatcher
        sink: FutureSink
        procs: dict[bytes, WorkerProcess]
        retries: int
        timers_changed: bool
        stop_requests: deque[tuple[Any, float]]

    def start_clocks(self, worker: WorkerSlot | None) -> None:
        """Time limits run from when a task heads its worker's queue (task_control)."""
        if worker is None or not worker.held or next(iter(worker.held.values())).options is None:
            return  # (slots is 1 here: the head is the task that runs)
        before = len(self.control.watches)
        self.control.head_began(worker.worker_id, worker.held, worker.slots, time.monotonic())
        if len(self.control.watches) != before:
            self.timers_changed = True

    def retries_for(self, task: Task) -> int:
        options = task.options
        if options is not None and options.retries is not None:
            return int(options.retries)
        return self.retries

    def end_stopped(self, task: Task, error: BaseException) -> None:
        """A task stopped by its time limit runs again while its retries allow;
        otherwise (and always after ``stop``) its future fails with ``error``."""
        if retry_after_stop(task, error, self.retries_for(task)):
            self.dispatcher.requeue([task])
        else:
            self.sink.fail(task, error)

    def act_on_timers(self, now: float) -> None:
        for action, watch in self.control.due(now):
            proc = self.procs.get(watch.worker_id)
            if proc is None:
                continue  # its death is being handled
            if action == "soft":
                proc.interrupt(watch.task.task_id)
            elif proc.running_and_done()[0] != watch.task.task_id:
                # Stopped while handed ahead, and not begun yet: the worker drops it at
                # its start. Never kill the task running before it.
                watch.killed = False
                watch.kill_at = now + watch.grace
            else:
                log.info("killing worker process %s: task %s (%s) still runs %g s after "
                         "it was asked to stop", proc.pid, watch.task.task_id,
                         watch.task.label, watch.grace)
                proc.signal(signal.SIGKILL)

    def take_stop_requests(self) -> None:
        now = time.monotonic()
        while self.stop_requests:
            future, grace = self.stop_requests.popleft()
            if future is STOP_ALL:
                self.stop_all(grace, now)
                continue
            found = self.find_held(future)
            if found is None:
                self.stop_queued(future)
                continue
            worker_id, task = found
            proc = self.procs.get(worker_id)
            if proc is not None:
                self.control.stop(task, worker_id, grace, now)
                proc.interrupt(task.task_id)

    def stop_all(self, grace: float, now: float) -> None:
        """Stop the task each worker runs, or begins next (it skips it at its start).
        What was handed ahead behind it is short by construction (see Dispatcher)."""
        for worker in self.dispatcher.workers.values():
            proc = self.procs.get(worker.worker_id)
            task = next(iter(worker.held.values()), None)
            if proc is not None and task is not None:
                self.control.stop(task, worker.worker_id, grace, now)
                proc.interrupt(task.task_id)

    def find_held(self, future: Any) -> tuple[bytes, Task] | None:
        for worker in self.dispatcher.workers.values():
            for task in worker.held.values():
                if task.context is future:
                    return worker.worker_id, task
        return None

    def stop_queued(self, future: Any) -> None:
        """A running future whose task is queued (requeued after its worker died, or
        for a retry): drop it from the queue; its future fails with TaskStopped."""
        for client, queue in list(self.dispatcher.queues.items()):
            for task in queue:
                if task.context is future:
                    self.dispatcher.cancel(client, {task.task_id})
                    self.sink.fail(task, TaskStopped(
                        f"task {task.task_id} ({task.label}) was stopped before it ran again"))
                    return
