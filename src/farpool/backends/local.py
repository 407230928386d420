"""``processes`` and ``threads``: pools on this machine (see ``farpool.pool``)."""

from __future__ import annotations

import os
from typing import Any

from ..pool import LocalPool


def check_workers(max_workers: Any, default: Any) -> Any:
    """Validate max_workers as the stdlib does; None gives ``default``."""
    if max_workers is None:
        return default
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
    if max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    return max_workers


def _check_common(initializer: Any, max_tasks_per_child: Any, retries: Any) -> None:
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    if max_tasks_per_child is not None:
        if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
            raise TypeError("max_tasks_per_child must be an int")
        if max_tasks_per_child <= 0:
            raise ValueError("max_tasks_per_child must be >= 1")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative int, not {retries!r}")


def open_processes(address: str, *, max_workers: int | None = None, initializer: Any = None,
                   initargs: tuple[Any, ...] = (), max_tasks_per_child: int | None = None,
                   retries: int = 0, mp_context: Any = None) -> LocalPool:
    workers = check_workers(max_workers, os.cpu_count() or 1)
    _check_common(initializer, max_tasks_per_child, retries)
    # mp_context is accepted for compatibility: workers are always fresh interpreters.
    # The stdlib refuses max_tasks_per_child with a fork context (forking replacement
    # workers from a process with threads is unsafe); code written for it never relies
    # on that pairing, so refuse it the same way.
    if (max_tasks_per_child is not None and mp_context is not None
            and mp_context.get_start_method(allow_none=False) == "fork"):
        raise ValueError("max_tasks_per_child is incompatible with the 'fork' "
                         "multiprocessing start method; supply a different mp_context.")
    return LocalPool(processes=True, max_workers=workers, initializer=initializer,
                     initargs=tuple(initargs), max_tasks_per_child=max_tasks_per_child,
                     retries=retries)


def open_threads(address: str, *, max_workers: int | None = None, initializer: Any = None,
                 initargs: tuple[Any, ...] = (), thread_name_prefix: str = "") -> LocalPool:
    workers = check_workers(max_workers, min(32, (os.cpu_count() or 1) + 4))
    _check_common(initializer, None, 0)
    if not isinstance(thread_name_prefix, str):
        raise TypeError("thread_name_prefix must be a str")
    return LocalPool(processes=False, max_workers=workers, initializer=initializer,
                     initargs=tuple(initargs), thread_name_prefix=thread_name_prefix)
