"""``farpool.Executor`` and the stdlib drop-ins built on it.

The executor owns the public contract (shutdown state, ``map`` ordering, laziness,
timeouts and ``buffersize``, chunking); a backend picked by address runs the tasks::

    Executor.submit/map --> backend.submit/submit_many --> Future
          |                         |
          |                         +-- processes, threads: farpool.process_pool, thread_pool
          |                         +-- tcp://, ipc://: a farpool scheduler daemon
          |                         +-- dask, ray: the engine's own client
          +-- shutdown(wait, cancel_futures) --> backend.shutdown
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar, cast

from .backends import open_backend
from .backends.base import ControlledBackend, LocalBackend
from .dependencies import Pending, find_futures
from .executor_control import TaskControlMethods
from .task_control import OPTION_NAMES, TaskOptions

__all__ = ["Executor", "ProcessPoolExecutor", "ThreadPoolExecutor", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "processes"
T = TypeVar("T")
P = ParamSpec("P")


def _run_chunk(fn: Callable[..., T], chunk: list[tuple[Any, ...]]) -> list[T]:
    """Runs in a worker: one task for a whole chunk of a map."""
    return [fn(*args) for args in chunk]


def _result_or_cancel(future: Future, timeout: float | None = None) -> Any:
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # no cycle through a raised exception's traceback


def _result_iterator(futures: deque[Future], end_time: float | None,
                     refill: Callable[[], list[Future]] | None) -> Iterator[Any]:
    """Yield the results of ``futures`` in order, cancelling the rest if abandoned.

    No local keeps a future (and so its result) alive while the caller holds the
    value: a result the caller drops is freed at once, as with the stdlib.
    """
    try:
        while futures:
            if refill is not None:
                futures.extend(refill())
            if end_time is None:
                yield _result_or_cancel(futures.popleft())
            else:
                yield _result_or_cancel(futures.popleft(), end_time - time.monotonic())
    finally:
        for future in futures:
            future.cancel()


def _flatten(chunks: Iterator[list[T]]) -> Iterator[T]:
    """The results of chunked tasks, one by one, keeping none the caller has taken."""
    for chunk in chunks:
        chunk.reverse()
        while chunk:
            yield chunk.pop()


class Executor(TaskControlMethods, concurrent.futures.Executor):
    """An executor whose workers are wherever ``address`` says.

    ``address`` is a backend name or URL (``"processes"``, ``"threads"``, ``"inline"``,
    ``"tcp://host:port"``, ``"dask"``, ``"ray://head:10001"``...). When it is None, the
    ``FARPOOL_ADDRESS`` environment variable is used, and when that is unset,
    ``"processes"``. Extra keyword ``options`` go to the backend (for example
    ``max_tasks_per_child`` or ``retries``).

    A future among a call's arguments (``ex.submit(g, ex.submit(f, x))``) is replaced
    by its result before the call runs; the call waits for it without holding a
    worker, and fails with ``farpool.InputFailed`` if it failed (see
    ``farpool.dependencies``).
    """

    # The drop-in thread pool passes futures to its tasks as they are, as the stdlib's.
    _resolves_futures = True

    def __init__(self, address: str | None = None, *, max_workers: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: Iterable[Any] = (),
                 **options: Any) -> None:
        from .main_script import check_not_bootstrapping

        check_not_bootstrapping()
        if address is None:
            address = os.environ.get("FARPOOL_ADDRESS") or DEFAULT_ADDRESS
        self.address = address
        self._shutdown = False
        self._shutdown_lock = threading.Lock()
        # Futures of calls waiting for futures among their arguments (dependencies).
        self._waiting: set[Future] = set()
        self._waiting_lock = threading.Lock()
        self._backend = open_backend(address, max_workers=max_workers, initializer=initializer,
                                     initargs=tuple(initargs), **options)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<{type(self).__name__} {self.address!r} {state}>"

    # Per-task options (``options``): None for an executor, so every submit passes
    # the backend exactly what it took before options existed.
    _task_options: TaskOptions | None = None

    @property
    def _root(self) -> Executor:
        """The executor whose workers run the tasks: itself (an options view's is the
        one it came from). A property, not an attribute: a reference to itself would
        keep a dropped executor alive past its finalizer."""
        return self

    def _check_open(self) -> None:
        if self._shutdown or self._root._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        broken = self._backend.broken
        if broken is not None:
            raise self._backend.broken_type(str(broken))

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``."""
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        if self._resolves_futures:
            inputs = find_futures(args, kwargs)
            if inputs:
                return self._submit_when_ready(fn, args, kwargs, inputs)
        with self._shutdown_lock:
            self._check_open()
            options = self._task_options
            if options is None:
                return self._backend.submit(fn, args, kwargs)
            return self._track(self._controlled().submit(fn, args, kwargs, options))

    def _controlled(self) -> ControlledBackend:
        """The backend, when task options are in use (``options`` checked it takes them)."""
        return cast(ControlledBackend, self._backend)

    def _track(self, future: Future) -> Future:
        """An options view keeps its own futures, for its shutdown (see _OptionsView)."""
        return future

    def _submit_when_ready(self, fn: Callable[..., Any], args: tuple[Any, ...],
                           kwargs: dict[str, Any], inputs: list[Future]) -> Future:
        """A call with futures among its arguments: submitted once they are done, with
        their results in their place (see farpool.dependencies)."""
        with self._shutdown_lock:
            self._check_open()
        # Outside the lock: an input done already submits the call at once.
        pending = Pending(fn, args, kwargs, inputs, self._submit_ready)
        with self._waiting_lock:
            self._waiting.add(pending.future)
        pending.future.add_done_callback(self._waiting_done)
        return pending.future

    def _submit_ready(self, fn: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Future:
        # Accepted before any shutdown: it runs even when its inputs end after one
        # (shutdown waits for it), unless the backend is gone.
        broken = self._backend.broken
        if broken is not None:
            raise self._backend.broken_type(str(broken))
        options = self._task_options
        if options is None:
            return self._backend.submit(fn, args, kwargs)
        return self._track(self._controlled().submit(fn, args, kwargs, options))

    def _waiting_done(self, future: Future) -> None:
        with self._waiting_lock:
            self._waiting.discard(future)

    def _submit_many(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Future]:
        with self._shutdown_lock:
            self._check_open()
            options = self._task_options
            if options is None:
                return self._backend.submit_many(fn, calls)
            return [self._track(f) for f in self._controlled().submit_many(fn, calls, options)]

    def _map_submitter(self) -> Callable[[Callable[..., Any], list[tuple[Any, ...]]], list[Future]]:
        """How ``map`` submits: through ``submit`` when something replaced it (a
        subclass, or a wrapper such as tqdm's progress bars, which patches the
        instance), as the stdlib's ``map`` does; else in batches, each pickled once."""
        if "submit" in vars(self) or type(self).submit is not Executor.submit:
            submit = self.submit
            return lambda fn, calls: [submit(fn, *args) for args in calls]
        if not self._resolves_futures:
            return self._submit_many

        def submit_many(fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Future]:
            if any(find_futures(args, {}) for args in calls):
                return [self.submit(fn, *args) for args in calls]  # futures among them
            return self._submit_many(fn, calls)

        return submit_many

    def map(self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[T]:
        """Like ``concurrent.futures.Executor.map``: results in input order.

        ``chunksize`` > 1 sends that many calls as one task (not for threads, like the
        stdlib). ``buffersize`` keeps at most that many tasks in flight, so endless
        inputs work; without it, every task is submitted before this returns.
        """
        if buffersize is not None:
            if isinstance(buffersize, bool) or not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError("chunksize must be an integer")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        end_time = None if timeout is None else timeout + time.monotonic()

        calls: Iterator[tuple[Any, ...]] = zip(*iterables, strict=False)
        chunked = chunksize > 1 and self._backend.chunks
        if chunked:
            calls = ((fn, chunk) for chunk in _batched(calls, chunksize))
            task_fn: Callable[..., Any] = _run_chunk
        else:
            task_fn = fn

        futures: deque[Future] = deque()
        submit_many = self._map_submitter()
        if buffersize is None:
            # Submit in slices so the function is pickled once per slice, not per call.
            for part in _batched(calls, 1024):
                futures.extend(submit_many(task_fn, part))
        else:
            futures.extend(submit_many(task_fn, list(itertools.islice(calls, buffersize))))

        refill: Callable[[], list[Future]] | None = None
        if buffersize is not None:
            # A weak reference: an executor dropped while its map is being read can
            # still be collected (and shut down), as with the stdlib.
            executor = weakref.ref(self)

            def submit_next() -> list[Future]:
                ex = executor()
                more = list(itertools.islice(calls, 1))
                if ex is None or not more or ex._shutdown:
                    return []
                return ex._map_submitter()(task_fn, more)

            refill = submit_next

        results = _result_iterator(futures, end_time, refill)
        if chunked:
            return _flatten(results)
        return results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; with ``wait``, return once every pending task is done.

        ``cancel_futures`` cancels the tasks that have not started. Calling it again
        is harmless.
        """
        with self._shutdown_lock:
            self._shutdown = True
        with self._waiting_lock:
            waiting = list(self._waiting)
        if cancel_futures:
            for future in waiting:
                future.cancel()
        if wait and waiting:
            # Calls still waiting for their inputs need the backend open to run.
            concurrent.futures.wait(waiting)
        self._backend.shutdown(wait, cancel_futures)

    @property
    def _broken(self) -> str | bool:
        """As in the stdlib pools: False, or why the executor is broken."""
        broken = self._backend.broken
        return str(broken) if broken is not None else False

    def stats(self) -> dict[str, Any]:
        """Counters of the backend: ``pending`` (this executor's tasks not done yet)
        everywhere, and what else the backend keeps (workers, queued, running, ...)."""
        return self._backend.stats()


class _OptionsView(Executor):
    """What ``Executor.options`` returns: the same workers, options on every task.

    Its ``shutdown`` stops it taking tasks and waits for (or cancels) its own; the
    executor it came from goes on. Once that one is shut down, this one takes no
    more tasks either."""

    _root: Executor = None  # type: ignore[assignment]  # an attribute here, set in __init__

    def __init__(self, root: Executor, options: TaskOptions) -> None:  # noqa: D107
        self._root = root
        self.address = root.address
        self._backend = root._backend
        self._resolves_futures = root._resolves_futures
        self._task_options = options
        self._shutdown = False
        self._shutdown_lock = root._shutdown_lock
        self._waiting = set()
        self._waiting_lock = threading.Lock()
        # Its own unfinished futures, for its shutdown (each leaves as it is done: the
        # caller need not keep it, as with the stdlib's shutdown(wait=True)).
        self._submitted: set[Future] = set()

    def __repr__(self) -> str:
        opts = ", ".join(f"{name}={value!r}" for name in OPTION_NAMES
                         if (value := getattr(self._task_options, name)) not in (None, 0))
        return f"<options({opts}) of {self._root!r}>"

    def _track(self, future: Future) -> Future:
        self._submitted.add(future)
        future.add_done_callback(self._submitted.discard)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            self._shutdown = True
        with self._waiting_lock:
            waiting = list(self._waiting)
        mine = [*waiting, *list(self._submitted)]
        if cancel_futures:
            for future in mine:
                future.cancel()
        if wait:
            concurrent.futures.wait(mine)

    def stats(self) -> dict[str, Any]:
        return self._root.stats()


def _batched(iterable: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _process_pool_address() -> str:
    """FARPOOL_ADDRESS for the drop-in process pool, unless it names a backend whose
    tasks run in this process (code written for a process pool assumes they do not)."""
    from .backends import scheme_of

    address = os.environ.get("FARPOOL_ADDRESS") or DEFAULT_ADDRESS
    return DEFAULT_ADDRESS if scheme_of(address) in ("threads", "inline") else address


# typeshed declares the stdlib pools' private attributes (_broken, _max_workers,
# _threads) as plain attributes; here they are read-only views of the backend.
class ProcessPoolExecutor(Executor, concurrent.futures.ProcessPoolExecutor):  # type: ignore[misc]
    """``concurrent.futures.ProcessPoolExecutor``, on farpool's worker processes.

    Same signature and behaviour, plus: lambdas and closures work (cloudpickle), and a
    worker that crashes fails only its own task with ``farpool.WorkerLost`` (a
    ``BrokenProcessPool``) instead of breaking the pool. ``mp_context`` is accepted
    and ignored: workers are always fresh interpreters.

    It is a subclass of the stdlib's class (so ``isinstance`` checks accept it) that
    runs none of the stdlib's machinery. When ``FARPOOL_ADDRESS`` names a backend whose
    tasks run in other processes (``tcp://``, ``ipc://``, ``dask``, ``ray``), the pool
    runs there, unchanged code and all; ``threads`` and ``inline`` are ignored here.
    """

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: Iterable[Any] = (),
                 *, max_tasks_per_child: int | None = None) -> None:
        address = _process_pool_address()
        options: dict[str, Any] = {}
        # Only what was given reaches another backend, which may not take it (a clear
        # TypeError or ValueError there).
        if max_tasks_per_child is not None or address == DEFAULT_ADDRESS:
            options["max_tasks_per_child"] = max_tasks_per_child
        if mp_context is not None or address == DEFAULT_ADDRESS:
            options["mp_context"] = mp_context
        Executor.__init__(self, address, max_workers=max_workers, initializer=initializer,
                          initargs=initargs, **options)
        self._given_context = mp_context
        self._given_max_workers = max_workers

    # The stdlib pools' private attributes that code and tests read most.
    @property
    def _max_workers(self) -> int:
        workers = getattr(self._backend, "max_workers", None)
        if isinstance(workers, int):
            return workers
        return self._given_max_workers or os.cpu_count() or 1

    @property
    def _mp_context(self) -> Any:  # type: ignore[override]
        """The context given, else spawn's: workers are always fresh interpreters."""
        if self._given_context is not None:
            return self._given_context
        import multiprocessing

        return multiprocessing.get_context("spawn")



class ThreadPoolExecutor(Executor, concurrent.futures.ThreadPoolExecutor):  # type: ignore[misc]
    """``concurrent.futures.ThreadPoolExecutor``, on farpool's ZeroMQ-fed threads.

    Tasks are passed by reference and never pickled, so locks, open files and
    generators work as arguments, as with the stdlib. It is a subclass of the stdlib's
    class (``isinstance`` checks and asyncio's ``set_default_executor`` accept it) that
    runs none of the stdlib's machinery, and it always runs threads of this process,
    whatever ``FARPOOL_ADDRESS`` says.
    """

    _resolves_futures = False

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "",
                 initializer: Callable[..., Any] | None = None,
                 initargs: Iterable[Any] = ()) -> None:
        Executor.__init__(self, "threads", max_workers=max_workers, initializer=initializer,
                          initargs=initargs, thread_name_prefix=thread_name_prefix)

    # The stdlib pool's private attributes that code and tests read most.
    @property
    def _max_workers(self) -> int:  # type: ignore[override]
        return cast(LocalBackend, self._backend).max_workers

    @property
    def _threads(self) -> set[threading.Thread]:  # type: ignore[override]
        """The worker threads started so far."""
        return cast(LocalBackend, self._backend).worker_threads()
