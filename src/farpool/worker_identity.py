"""Who runs this task: ``farpool.worker_info()``, in a task or an initializer.

Set by the worker itself before its initializer runs: a worker process for the whole
process, a worker thread for its own thread. ``rank`` is the worker's place among its
pool's workers on its host (0..N-1; a replacement takes the rank of the one it
replaces), so an initializer can pin a GPU or a core: ``os.sched_setaffinity(0,
{info.rank})``, ``CUDA_VISIBLE_DEVICES=str(info.rank)``.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

__all__ = ["WorkerInfo", "worker_info"]


class WorkerInfo(NamedTuple):
    """What ``worker_info()`` returns."""

    worker_id: str  # the worker's id in its pool, or on its scheduler
    host: str  # the host's name (a worker daemon's --name)
    pid: int  # the process that runs the task
    rank: int  # 0..N-1 among its pool's workers on this host


_process: WorkerInfo | None = None
_thread = threading.local()


def worker_info() -> WorkerInfo | None:
    """The worker running the calling task or initializer; None outside a farpool
    worker (in the client, or on ``inline``, Dask and Ray, which run tasks on their
    own workers)."""
    info: WorkerInfo | None = getattr(_thread, "info", None)
    return info if info is not None else _process


def set_process_worker(info: WorkerInfo) -> None:
    """In a worker process, before its initializer."""
    global _process
    _process = info


def set_thread_worker(info: WorkerInfo | None) -> None:
    """In a worker thread, before its initializer (None when it ends)."""
    _thread.info = info
