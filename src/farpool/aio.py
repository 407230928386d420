"""asyncio: await a task whose cancellation stops it where it runs.

``asyncio.wrap_future`` (and ``loop.run_in_executor``) cancel only a task that has not
started: cancelling the awaiting coroutine leaves a running task running, its result
thrown away. ``run_async`` stops it (``Executor.stop``): interrupted, killed after the
grace, on the backends that can stop running tasks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["run_async"]

T = TypeVar("T")


async def run_async(executor: concurrent.futures.Executor, fn: Callable[..., T], /,
                    *args: Any, grace: float | None = None, **kwargs: Any) -> T:
    """Submit ``fn(*args, **kwargs)`` to ``executor`` and await its result.

    Cancelling the coroutine (``task.cancel()``, ``asyncio.timeout``, ``wait_for``)
    stops the task: ``executor.stop(future, grace)`` on a farpool executor (a running
    task is interrupted, then killed after ``grace``), ``future.cancel()`` on any other.
    """
    future = executor.submit(fn, *args, **kwargs)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        stop = getattr(executor, "stop", None)
        if stop is None or future.done():
            future.cancel()
        else:
            try:
                stop(future, grace)
            except ValueError:  # a backend that cannot stop a running task
                future.cancel()
        raise
