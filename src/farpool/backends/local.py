"""``processes`` and ``threads``: pools on this machine (``farpool.process_pool``,
``farpool.thread_pool``)."""

from __future__ import annotations

import os
from typing import Any

from ..process_pool import ProcessPool
from ..thread_pool import ThreadPool
from .options import (
    check_initializer,
    check_max_tasks_per_child,
    check_max_workers,
    check_retries,
)


def open_processes(address: str, *, max_workers: int | None = None, initializer: Any = None,
                   initargs: tuple[Any, ...] = (), max_tasks_per_child: int | None = None,
                   retries: int = 0, mp_context: Any = None) -> ProcessPool:
    workers = check_max_workers(max_workers, os.cpu_count() or 1)
    check_initializer(initializer)
    check_max_tasks_per_child(max_tasks_per_child)
    check_retries(retries)
    # mp_context is accepted for compatibility: workers are always fresh interpreters.
    # The stdlib refuses max_tasks_per_child with a fork context (forking replacement
    # workers from a process with threads is unsafe); code written for it never relies
    # on that pairing, so refuse it the same way.
    if (max_tasks_per_child is not None and mp_context is not None
            and mp_context.get_start_method(allow_none=False) == "fork"):
        raise ValueError("max_tasks_per_child is incompatible with the 'fork' "
                         "multiprocessing start method; supply a different mp_context.")
    return ProcessPool(max_workers=workers, initializer=initializer, initargs=tuple(initargs),
                       max_tasks_per_child=max_tasks_per_child, retries=retries)


def open_threads(address: str, *, max_workers: int | None = None, initializer: Any = None,
                 initargs: tuple[Any, ...] = (), thread_name_prefix: str = "") -> ThreadPool:
    workers = check_max_workers(max_workers, min(32, (os.cpu_count() or 1) + 4))
    check_initializer(initializer)
    if not isinstance(thread_name_prefix, str):
        raise TypeError("thread_name_prefix must be a str")
    return ThreadPool(max_workers=workers, initializer=initializer, initargs=tuple(initargs),
                      thread_name_prefix=thread_name_prefix)
