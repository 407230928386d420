"""farpool: concurrent.futures executors that run beyond one interpreter.

``farpool.Executor(address)`` runs tasks on local processes or threads, on farpool
worker daemons, or on Dask or Ray, picked by ``address`` or ``FARPOOL_ADDRESS``.
``ProcessPoolExecutor`` and ``ThreadPoolExecutor`` are drop-ins for the stdlib's.
"""

from __future__ import annotations

from .aio import run_async
from .client import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from .dependencies import InputFailed
from .errors import (
    BackendUnavailable,
    FarpoolError,
    InitializerFailed,
    ProcessPoolBroken,
    ProtocolError,
    SchedulerLost,
    SecurityError,
    TaskInterrupted,
    TaskStopped,
    TaskTimeout,
    ThreadPoolBroken,
    UnpicklingFailed,
    VersionMismatch,
    WorkerLost,
)
from .worker_identity import WorkerInfo, worker_info

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "Executor",
    "FarpoolError",
    "InitializerFailed",
    "InputFailed",
    "ProcessPoolBroken",
    "ProcessPoolExecutor",
    "ProtocolError",
    "SchedulerLost",
    "SecurityError",
    "TaskInterrupted",
    "TaskStopped",
    "TaskTimeout",
    "ThreadPoolBroken",
    "ThreadPoolExecutor",
    "UnpicklingFailed",
    "VersionMismatch",
    "WorkerInfo",
    "WorkerLost",
    "__version__",
    "run_async",
    "worker_info",
]
