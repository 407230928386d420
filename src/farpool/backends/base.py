"""The interface every backend implements."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import BrokenExecutor, Future
from threading import Thread
from typing import Any, Protocol


class Backend(Protocol):
    """What ``farpool.Executor`` needs from a way of running tasks.

    ``broken`` is None while the backend can take work, else the error that broke it;
    ``broken_type`` is the exception type ``submit`` raises once broken.
    """

    broken: BaseException | None
    broken_type: type[BrokenExecutor]
    #: True when map(chunksize>1) should batch calls into one task (not for threads).
    chunks: bool

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Future: ...

    def submit_many(self, fn: Callable[..., Any],
                    calls: Iterable[tuple[Any, ...]]) -> list[Future]: ...

    def shutdown(self, wait: bool, cancel_futures: bool) -> None: ...

    def stats(self) -> dict[str, Any]:
        """Counters the backend keeps; every backend has ``pending``, this executor's
        tasks not yet done (submitted, queued or running)."""
        ...


class LocalBackend(Backend, Protocol):
    """A backend of local workers: what the stdlib drop-ins also read from it."""

    @property
    def max_workers(self) -> int:
        """How many workers the pool runs at most."""
        ...

    def worker_threads(self) -> set[Thread]:
        """The worker threads started so far (empty for worker processes)."""
        ...


class ControlledBackend(Backend, Protocol):
    """A backend that can limit and stop tasks (see ``farpool.task_control``):
    ``task_options`` names the per-task options it honours, which ``submit`` and
    ``submit_many`` then take as a ``TaskOptions``."""

    task_options: frozenset[str]

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any], options: Any = None) -> Future: ...

    def submit_many(self, fn: Callable[..., Any],
                    calls: Iterable[tuple[Any, ...]], options: Any = None) -> list[Future]: ...

    def stop(self, future: Future, grace: float) -> bool:
        """Cancel a queued task, or interrupt a running one and kill it after
        ``grace`` seconds; whether it was queued or running."""
        ...

    def end_workers(self, signum: int) -> None:
        """Shut down without waiting and send ``signum`` to every worker process."""
        ...
