"""What the Dask and Ray adapters share: the engine's futures bridged to real
``concurrent.futures.Future`` objects, cancellation, a broken state, and shutdown.

No engine is imported here. The engines' workers run ``call_packing.run_packed``
(functions and arguments as farpool pickles them, the initializer inside)::

    Executor.submit --> backend.submit --> engine submit --> engine future
                            |                                   | done (an engine thread)
                            | our Future, PENDING until done    v
                            |                        inbox: (backend, DONE, ...)
                            v                                   |
    future.result() <-- _settle <---- results thread <----------+
    future.cancel() --> done-callback --> inbox: CANCEL --> engine cancel (in batches)

One "results" thread per executor turns engine outcomes into future outcomes, so
user callbacks never run on (and never block) the engine's own threads. It holds
the backend only while it handles an item, so an executor dropped without
``shutdown`` is collected and its engine resources closed. A plain result whose
future has no user callback is set by the engine thread itself (``_settle_here``):
that wakes the waiters and runs no user code, and spares a thread hop per task.
"""

from __future__ import annotations

import queue
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, NamedTuple

from ..call_packing import CallPacker, unpack_result
from ..errors import InitializerFailed, ProcessPoolBroken, RemoteTraceback
from ..futures import new_future
from .options import check_initializer

__all__ = ["EngineBackend", "InitializerFailed", "SubmitFailed", "remote_traceback",
           "unwrap_pickling_error"]

BROKEN_MESSAGE = "A worker initializer failed, the executor is not usable anymore"
# How many inbox items the results thread handles per wake-up.
BATCH = 1024

_STOP = object()  # tells the results thread to close the engine and end
_MISSING = object()
# _settle_here looks at a future's done-callbacks under the future's own lock: CPython
# keeps them in _done_callbacks, guarded by _condition (since 3.2). Elsewhere, never.
_INSPECTABLE = all(hasattr(Future(), name) for name in ("_condition", "_done_callbacks"))
_DONE = "done"
_DONE_MANY = "done-many"
_CANCEL = "cancel"


class SubmitFailed(NamedTuple):
    """In place of an engine handle: this call could not be submitted (for example,
    an argument does not pickle). Only its own future fails."""

    error: BaseException


def unwrap_pickling_error(exc: BaseException) -> BaseException:
    """The pickling error under an engine's "could not serialize ..." TypeError.

    It names the object the user passed, as the stdlib's error does; the engines'
    wrappers name their own task graph or task.
    """
    cause = exc.__cause__
    if isinstance(exc, TypeError) and isinstance(cause, Exception):
        return cause
    return exc


def remote_traceback(text: str) -> RemoteTraceback:
    """The ``__cause__`` of a task's exception, formatted as the stdlib does."""
    return RemoteTraceback(f'\n"""\n{text.rstrip()}\n"""')


class EngineBackend:
    """Base of the engine adapters. Subclasses provide the engine calls:

    - ``_engine_submit(fn, args, kwargs)`` -> a handle (the engine's future);
    - ``_engine_submit_many(fn, calls)`` -> handles, or ``SubmitFailed`` entries;
    - ``_watch(future, handle)``: call ``self._engine_done(future, handle)`` when done;
    - ``_resolve(items)``: settle each done ``(future, handle)`` with ``_settle``;
    - ``_engine_cancel(handles)``: drop these tasks in the engine (one batch);
    - ``_cancel_queued(pending)``: on shutdown(cancel_futures), cancel what has not
      started, letting started tasks finish;

    and call ``_start(resources)`` once connected, where ``resources.close()``
    releases the engine (run once, by the results thread, when nothing is pending
    after shutdown, or when the backend is garbage-collected).
    """

    broken_type = ProcessPoolBroken
    chunks = True
    engine_name = "engine"

    def __init__(self, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
        check_initializer(initializer)
        self.broken: BaseException | None = None
        # Functions and arguments go to the engine as farpool's pickles (see call_packing).
        self.packer = CallPacker(initializer, initargs)
        # _submit_lock orders submits and is held through engine calls; _lock guards the
        # state below and is never held through an engine call, so that an engine
        # thread may take it (see _settle_here). Order: _submit_lock, then _lock.
        self._submit_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[Future, Any] = {}
        self._to_cancel: list[Any] = []
        self._closing = False
        self._finished = False
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _start(self, resources: Any) -> None:
        """Start the results thread; call once the engine is connected."""
        self._thread = threading.Thread(
            target=_results_loop, args=(self._inbox, resources),
            name=f"farpool-{self.engine_name}-results", daemon=True)
        self._thread.start()
        # Dropped without shutdown: stop the thread, which closes the engine.
        weakref.finalize(self, self._inbox.put, _STOP)

    # -- submitting ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self.broken is not None:
            raise self.broken_type(str(self.broken))
        if self._closing:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future:
        future: Future = new_future()
        with self._submit_lock:
            self._check_open()
            try:
                handle = self._engine_submit(fn, args, kwargs)
            except Exception as exc:  # noqa: BLE001 - e.g. an argument that does not pickle
                future.set_exception(exc)
                return future
            if not self._add_pending([(future, handle)]):
                return future
        future.add_done_callback(self._on_future_done)
        self._watch(future, handle)
        return future

    def submit_many(self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]]) -> list[Future]:
        calls = list(calls)
        futures: list[Future] = [new_future() for _ in calls]
        with self._submit_lock:
            self._check_open()
            handles = self._engine_submit_many(fn, calls) if calls else []
            submitted = []
            for future, handle in zip(futures, handles, strict=True):
                if isinstance(handle, SubmitFailed):
                    future.set_exception(handle.error)
                else:
                    submitted.append((future, handle))
            if not self._add_pending(submitted):
                return futures
        for future, handle in zip(futures, handles, strict=True):
            if not isinstance(handle, SubmitFailed):
                future.add_done_callback(self._on_future_done)
                self._watch(future, handle)
        return futures

    def _add_pending(self, submitted: list[tuple[Future, Any]]) -> bool:
        """Record submitted tasks; False if the executor broke meanwhile (an
        initializer failed while the engine took them): they are failed and cancelled."""
        with self._lock:
            broken = self.broken
            if broken is None:
                self._pending.update(submitted)
                return True
        for future, _ in submitted:
            error = self.broken_type(BROKEN_MESSAGE)
            error.__cause__ = broken.__cause__
            future.set_exception(error)
        self._engine_cancel([handle for _, handle in submitted])
        return False

    def _engine_submit_many(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        handles: list[Any] = []
        for args in calls:
            try:
                handles.append(self._engine_submit(fn, args, {}))
            except Exception as exc:  # noqa: BLE001 - that call alone fails
                handles.append(SubmitFailed(exc))
        return handles

    # -- outcomes --------------------------------------------------------------------

    def _engine_done(self, future: Future, handle: Any, *_: Any) -> None:
        """Called from an engine thread: hand the outcome to the results thread."""
        self._inbox.put((self, _DONE, (future, handle)))

    def _settle_here(self, future: Future, value: Any) -> bool:
        """From an engine thread: set ``future``'s result now if that runs no user code.

        False, leaving it to the results thread, when the future has a user's
        done-callback, or when another thread holds the lock (never wait for a
        lock on an engine thread).
        """
        if not _INSPECTABLE or not self._lock.acquire(blocking=False):
            return False
        try:
            # Under the future's lock, a callback added meanwhile waits, then finds
            # the future done and runs in the thread that adds it.
            with future._condition:
                # A private list of the stdlib's Future, read under its lock.
                if future._done_callbacks != [self._on_future_done]:  # type: ignore[attr-defined]
                    return False
                if self._pending.pop(future, _MISSING) is _MISSING:
                    return True  # cancelled by the user, or failed when the executor broke
                last = self._closing and not self._pending
                value, error = unpack_result(value, self.engine_name)
                if future.set_running_or_notify_cancel():
                    if error is None:
                        future.set_result(value)
                    else:
                        future.set_exception(error)
        finally:
            self._lock.release()
        if last:
            self._finish()
        return True

    def _engine_done_many(self, items: list[tuple[Future, Any]]) -> None:
        """Like ``_engine_done`` for many ``(future, handle)`` at once: one hand-over."""
        if items:
            self._inbox.put((self, _DONE_MANY, items))

    def _handle(self, batch: list[tuple[str, Any]]) -> None:
        """In the results thread: one batch of inbox items."""
        if any(kind == _CANCEL for kind, _ in batch):
            with self._lock:
                handles, self._to_cancel = self._to_cancel, []
            if handles:
                self._engine_cancel(handles)
        done: list[tuple[Future, Any]] = []
        for kind, item in batch:
            if kind == _DONE:
                done.append(item)
            elif kind == _DONE_MANY:
                done.extend(item)
        if done:
            try:
                self._resolve(done)
            except BaseException as exc:  # noqa: BLE001 - a bug or an engine failure
                # Whatever went wrong, no future of the batch may wait forever.
                for future, _ in done:
                    self._settle(future, error=exc)
                raise

    def _settle(self, future: Future, value: Any = None, error: BaseException | None = None,
                cancelled: bool = False) -> None:
        """Give ``future`` its outcome, unless it was already cancelled or failed."""
        if isinstance(error, InitializerFailed):
            self._break(error)
            return
        with self._lock:
            if self._pending.pop(future, _MISSING) is _MISSING:
                return  # cancelled by the user, or failed when the executor broke
            last = self._closing and not self._pending
        if cancelled:
            # Cancelled in the engine (shutdown, or someone else): report it as such.
            future.cancel()
            future.set_running_or_notify_cancel()
        elif future.set_running_or_notify_cancel():
            if error is None:
                value, error = unpack_result(value, self.engine_name)
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
        if last:
            self._finish()

    def _on_future_done(self, future: Future) -> None:
        """Done-callback on our futures: a user's ``cancel()`` reaches the engine."""
        if not future.cancelled():
            return
        with self._lock:
            handle = self._pending.pop(future, _MISSING)
            if handle is _MISSING:
                return  # the outcome arrived first and notified the waiters
            self._to_cancel.append(handle)
            last = self._closing and not self._pending
        future.set_running_or_notify_cancel()
        self._inbox.put((self, _CANCEL, None))
        if last:
            self._finish()

    def _break(self, cause: BaseException) -> None:
        """An initializer failed: fail every pending future, refuse new ones."""
        with self._lock:
            if self.broken is None:
                self.broken = self.broken_type(BROKEN_MESSAGE)
                self.broken.__cause__ = cause
            pending = list(self._pending.items())
            self._pending.clear()
            last = self._closing
        for future, _ in pending:
            if future.set_running_or_notify_cancel():
                error = self.broken_type(BROKEN_MESSAGE)
                error.__cause__ = cause
                future.set_exception(error)
        self._engine_cancel([handle for _, handle in pending])
        if last:
            self._finish()

    # -- shutdown --------------------------------------------------------------------

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        with self._submit_lock, self._lock:  # no submit half done
            self._closing = True
            pending = dict(self._pending)
        if cancel_futures and pending:
            self._cancel_queued(pending)
        with self._lock:
            idle = not self._pending
        if idle:
            self._finish()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _finish(self) -> None:
        """Closing and nothing pending: the results thread closes the engine and ends."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._inbox.put(_STOP)

    # -- engine hooks ------------------------------------------------------------------

    def _engine_submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _watch(self, future: Future, handle: Any) -> None:
        raise NotImplementedError

    def _resolve(self, items: list[tuple[Future, Any]]) -> None:
        raise NotImplementedError

    def _engine_cancel(self, handles: list[Any]) -> None:
        raise NotImplementedError

    def _cancel_queued(self, pending: dict[Future, Any]) -> None:
        raise NotImplementedError


def _results_loop(inbox: queue.SimpleQueue, resources: Any) -> None:
    """The results thread. Holds the backend only through the items it handles."""
    try:
        while True:
            item = inbox.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            while len(batch) < BATCH:
                try:
                    more = inbox.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)
            backend = batch[0][0]
            try:
                backend._handle([(kind, payload) for _, kind, payload in batch])
            except BaseException:  # noqa: BLE001 - keep serving the other futures
                traceback.print_exc()
            # Nothing of this batch stays referenced while the thread waits for the
            # next: not even the last item taken with it (a result, the backend).
            del backend, batch, item
            more = None
            if stop:
                return
    finally:
        resources.close()
