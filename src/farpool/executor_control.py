"""The task-control half of ``farpool.Executor``: per-task options, stopping a task,
ending the workers (Python 3.14's API) and Ctrl-C. What they decide is in
``task_control``; the backends carry it out (``backends.base.ControlledBackend``)."""

from __future__ import annotations

import signal
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Literal

from .task_control import TaskOptions, check_task_options

if TYPE_CHECKING:
    import threading

    from .backends.base import Backend
    from .client import Executor

__all__ = ["TaskControlMethods"]


class TaskControlMethods:
    """Mixed into ``farpool.Executor`` (the names below are its own)."""

    if TYPE_CHECKING:
        address: str
        _backend: Backend
        _task_options: TaskOptions | None
        _shutdown: bool
        _shutdown_lock: threading.Lock
        _waiting: set[Future]
        _waiting_lock: threading.Lock

        @property
        def _root(self) -> Executor: ...
        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...

    def options(self, *, timeout: float | None = None, retries: int | None = None,
                grace: float | None = None, priority: int | None = None) -> Executor:
        """An executor that shares this one's workers and applies these options to
        every task it submits (``submit`` and ``map``), so code that takes any
        ``concurrent.futures.Executor`` gets them too.

        ``timeout``: seconds a task may run (queueing not counted); then it is
        interrupted (``farpool.TaskInterrupted`` raised inside it), and if it still
        runs after ``grace`` seconds (default 3) its worker is killed and replaced.
        Its future fails with ``farpool.TaskTimeout``. ``retries``: how often a task
        runs again after its worker died or its time ran out (default: the
        executor's). ``priority``: higher first within this client's queue (default 0;
        fairness between clients is unchanged). An option the backend cannot honour
        is a ``ValueError`` here.
        """
        from .backends import scheme_of

        given = {name: value for name, value in
                 (("timeout", timeout), ("retries", retries), ("grace", grace),
                  ("priority", priority))
                 if value is not None}
        merged = check_task_options(given, self._task_options)
        supported: frozenset[str] = getattr(self._root._backend, "task_options", frozenset())
        refused = sorted(set(given) - supported)
        if refused:
            scheme = scheme_of(self.address)
            takes = ", ".join(sorted(supported)) or "none"
            raise ValueError(f"the {scheme} backend cannot honour the task option"
                             f"{'s' if len(refused) > 1 else ''} {', '.join(refused)} "
                             f"(it takes: {takes}; processes and the daemons take timeout, "
                             "retries, grace and priority)")
        from .client import _OptionsView

        return _OptionsView(self._root, merged)

    def stop(self, future: Future, grace: float | None = None) -> bool:
        """Stop ``future``'s task: cancelled if it is queued; if it runs, interrupted
        (``farpool.TaskInterrupted`` raised inside it), and killed with its worker if
        it still runs after ``grace`` seconds (default: the options' grace, else 3).
        A stopped running task's future fails with ``farpool.TaskStopped``, a
        ``CancelledError``. Returns whether the task was queued or running."""
        if not isinstance(future, Future):
            raise TypeError(f"stop() takes a Future, not {type(future).__name__}")
        if grace is None:
            grace = (self._task_options or TaskOptions()).stop_grace()
        else:
            grace = check_task_options({"grace": grace}).stop_grace()
        stop = getattr(self._root._backend, "stop", None)
        if stop is not None:
            return bool(stop(future, grace))
        if future.cancel():
            return True
        if future.done():
            return False
        from .backends import scheme_of

        raise ValueError(f"the {scheme_of(self.address)} backend cannot stop a running "
                         "task (processes can)")

    def terminate_workers(self) -> None:
        """As Python 3.14's ``ProcessPoolExecutor.terminate_workers``: shut down
        without waiting, cancel queued tasks, send SIGTERM to every worker process.
        Running tasks' futures fail with ``farpool.ProcessPoolBroken`` (a
        ``BrokenProcessPool``); the executor takes no more tasks."""
        self._end_workers(signal.SIGTERM)

    def kill_workers(self) -> None:
        """As ``terminate_workers``, with SIGKILL."""
        self._end_workers(signal.SIGKILL)

    def _end_workers(self, signum: int) -> None:
        root = self._root
        end = getattr(root._backend, "end_workers", None)
        if end is None:
            from .backends import scheme_of

            raise NotImplementedError(f"the {scheme_of(self.address)} backend has no "
                                      "terminate_workers or kill_workers (processes has)")
        with root._shutdown_lock:
            root._shutdown = True
        with root._waiting_lock:
            waiting = list(root._waiting)
        for future in waiting:
            future.cancel()
        end(signum)

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> Literal[False]:
        """As the stdlib's ``with`` block: shutdown(wait=True). Except on Ctrl-C (a
        KeyboardInterrupt leaving the block): queued tasks are cancelled and running
        ones stopped (on processes: interrupted, killed after 1 s) instead of waited
        for."""
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            root = self._root
            interrupt = getattr(root._backend, "interrupt", None)
            if interrupt is not None:
                # First, before anything closes the backend: once closing, a remote
                # client whose map's futures were all cancelled (the iterator cancels
                # what it leaves) would exit before it sent the stop.
                interrupt()
            root.shutdown(wait=False, cancel_futures=True)
            if interrupt is not None:
                root._backend.shutdown(True, True)  # what runs is being stopped
            return False
        self.shutdown(wait=True)
        return False
