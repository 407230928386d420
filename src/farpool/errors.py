"""farpool's exceptions, in one tree.

Where a stdlib executor would raise the same thing, farpool's type derives from the
stdlib's, so ``except BrokenExecutor`` (or ``BrokenProcessPool``) keeps working::

    Exception
     └── FarpoolError                       every error farpool raises itself
          ├── WorkerLost                    (+ BrokenProcessPool) a worker died under a task
          ├── ProcessPoolBroken             (+ BrokenProcessPool) the pool cannot run tasks
          │    └── InitializerFailed        the executor's initializer raised on a worker
          ├── ThreadPoolBroken              (+ BrokenThreadPool)  the pool cannot run tasks
          ├── UnpicklingFailed              (+ BrokenProcessPool) a task's payload did not unpickle
          ├── SchedulerLost                 (+ BrokenExecutor) the scheduler went away
          ├── BackendUnavailable            (+ ImportError) an optional engine is missing
          ├── ProtocolError                 a frame off the wire is malformed
          │    └── VersionMismatch          the peer runs incompatible versions
          ├── SecurityError                 keys missing, unsafe or refused
          ├── TaskTimeout                   (+ TimeoutError) a task ran past its time limit
          └── TaskStopped                   (+ CancelledError) Executor.stop stopped it
    BaseException
     └── TaskInterrupted                    raised inside a task that is being stopped

Errors raised *by a task* are never wrapped: they reach ``future.result()`` as
themselves, with the remote traceback as their ``__cause__``.
"""

from __future__ import annotations

import concurrent.futures.process
from concurrent.futures import BrokenExecutor, CancelledError
from concurrent.futures.process import BrokenProcessPool
from concurrent.futures.thread import BrokenThreadPool
from typing import TYPE_CHECKING

from ._errors import FarpoolError, ProtocolError, TaskInterrupted, VersionMismatch

__all__ = [
    "BackendUnavailable",
    "FarpoolError",
    "InitializerFailed",
    "ProcessPoolBroken",
    "ProtocolError",
    "RemoteTraceback",
    "SchedulerLost",
    "SecurityError",
    "TaskInterrupted",
    "TaskStopped",
    "TaskTimeout",
    "ThreadPoolBroken",
    "UnpicklingFailed",
    "VersionMismatch",
    "WorkerLost",
]


class WorkerLost(FarpoolError, BrokenProcessPool):
    """A worker died (crash, signal, lost host) while it held this task.

    Only the task that was running fails; the pool replaces the worker and goes on.
    """


class ProcessPoolBroken(FarpoolError, BrokenProcessPool):
    """The pool can no longer run tasks (for example, a worker initializer failed)."""


class InitializerFailed(ProcessPoolBroken):
    """The executor's initializer raised on a worker (any backend that runs workers
    elsewhere): the executor is broken, as a stdlib pool is when its initializer fails.

    ``tb`` is the worker's formatted error, which the message carries.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"the executor's initializer failed on a worker:\n{self.tb}"


class ThreadPoolBroken(FarpoolError, BrokenThreadPool):
    """A thread pool can no longer run tasks (for example, an initializer failed)."""


class UnpicklingFailed(FarpoolError, BrokenProcessPool):
    """A task's function or arguments did not unpickle in the worker, or its result or
    exception did not unpickle in the client.

    The stdlib's process pool breaks whole in these cases, with ``BrokenProcessPool``;
    farpool fails only this task, with this subclass of it, and goes on. The error
    that unpickling raised is the ``__cause__``.
    """


def unpickling_failed(what: str, error: BaseException) -> UnpicklingFailed:
    """An ``UnpicklingFailed`` about ``what`` ("the result of task 3"), caused by ``error``."""
    failed = UnpicklingFailed(f"{what} could not be unpickled: {type(error).__name__}: {error}")
    failed.__cause__ = error
    return failed


class SchedulerLost(FarpoolError, BrokenExecutor):
    """The scheduler of a remote backend stopped answering."""


class BackendUnavailable(FarpoolError, ImportError):
    """The engine behind a backend (Dask, Ray) is not installed."""


class SecurityError(FarpoolError):
    """Keys are missing, have unsafe permissions, or a peer was refused."""


class TaskTimeout(FarpoolError, TimeoutError):
    """A task ran past its time limit (``Executor.options(timeout=...)``) and was
    stopped: interrupted, or killed with its worker once the grace was over (the
    message says which). The pool replaces a killed worker and keeps its size."""


class TaskStopped(FarpoolError, CancelledError):
    """``Executor.stop`` stopped this task while it ran (a ``CancelledError``, so code
    that catches cancellation keeps working); the message says whether its worker had
    to be killed."""


class _RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__`` of a task's error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


# The stdlib's own class where it has one (the same two members as ours), so code that
# inspects a process pool error's cause sees the very type the stdlib gives it.
if TYPE_CHECKING:
    RemoteTraceback = _RemoteTraceback
else:
    RemoteTraceback = getattr(concurrent.futures.process, "_RemoteTraceback", _RemoteTraceback)
