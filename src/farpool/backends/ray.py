"""``ray`` and ``ray://host:port``: tasks run as Ray tasks.

``ray`` uses the Ray instance this process is already connected to, if any;
otherwise it connects to ``RAY_ADDRESS`` when that is set (as on a Ray cluster's
job), or starts a local instance (``max_workers`` CPUs) that the last executor
using it shuts down. ``ray://host:port`` connects through Ray Client to a running
cluster, which stays running. Ray allows one connection per process, so the
executors of a process share it.

Semantics on top of Ray's:

- a task whose worker died fails with ``farpool.WorkerLost`` (Ray's
  ``WorkerCrashedError``, ``NodeDiedError``... as its cause); ``retries`` (default
  0, Ray's ``max_retries``) is how many such deaths a task survives;
- ``Future.cancel()`` succeeds until the task is done and cancels it in Ray
  (``ray.cancel``). Ray would interrupt a running task with KeyboardInterrupt:
  farpool's tasks ignore that interrupt, so a task that had started runs on, and
  its result is dropped, as with the stdlib's and Dask's running tasks;
- ``shutdown(cancel_futures=True)`` asks Ray to cancel every pending task: the
  queued ones end cancelled, the running ones finish and keep their results;
- NumPy arrays come back read-only (zero-copy from Ray's object store), as with
  ``ray.get``;
- workers of an existing cluster need farpool installed (the task wrapper lives here);
- ``max_workers`` sizes a local instance (its CPUs); an existing cluster keeps its size.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import os
import re
import signal
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple

from ..call_packing import PackedError, run_packed
from ..errors import BackendUnavailable, WorkerLost
from .engine import (
    EngineBackend,
    remote_traceback,
    unwrap_pickling_error,
)
from .options import check_max_workers, check_passed_on, check_retries

__all__ = ["RayBackend"]

# Remote functions kept per executor, one per function (exported once to Ray).
REMOTE_CACHE_SIZE = 256
# A function whose pickle is larger than this (captured arrays...) travels with each
# call through the object store instead of being exported to Ray's GCS.
MAX_EXPORT_BYTES = 64 * 1024
# Seconds a cancel waits for tasks that have just ended to be seen as ended (see
# RayBackend._engine_cancel).
CANCEL_SETTLE = 0.05
# Ray colours its tracebacks for terminals.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOST_ERRORS = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "RayActorError",
                "OutOfMemoryError", "ObjectLostError")


def _require() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable("the 'ray' backend needs Ray: pip install 'farpool[ray]'") from exc
    return ray


# -- in the worker ---------------------------------------------------------------------


def _run(key: bytes, blob: bytes, arguments: bytes) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return run_packed(key, blob, arguments)
    # ray.cancel interrupts a running task through the SIGINT handler: ignoring it
    # while the user's function runs keeps the stdlib's rule that started work finishes.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return run_packed(key, blob, arguments)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _bind(key: bytes, blob: bytes, name: str) -> Callable[..., Any]:
    """A Ray task running one packed function: exported once, then each call sends
    only its (packed) arguments."""

    def task(arguments: bytes) -> Any:
        return _run(key, blob, arguments)

    task.__name__ = task.__qualname__ = name  # Ray's task name
    return task


# -- this process's Ray connection -------------------------------------------------------


class _Session:
    """The one Ray connection of this process, counted by the executors using it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.owned = False
        self.address: str | None = None

    def acquire(self, ray: Any, address: str, max_workers: int | None,
                init_options: dict[str, Any]) -> None:
        with self.lock:
            if self.users == 0:
                self.address = address
                self.owned = False
                if ray.is_initialized():
                    self._check_reuse(ray, address, init_options)
                else:
                    self._connect(ray, address, max_workers, init_options)
                    self.owned = True
            elif address not in ("ray", self.address):
                raise ValueError(f"this process is connected to Ray through {self.address!r}: "
                                 f"Ray allows one connection per process, so {address!r} "
                                 f"cannot be used alongside it")
            elif init_options:
                raise ValueError("Ray is already connected in this process: options for "
                                 f"ray.init ({', '.join(sorted(init_options))}) cannot apply")
            self.users += 1

    @staticmethod
    def _check_reuse(ray: Any, address: str, init_options: dict[str, Any]) -> None:
        # Ray was initialized by the application: use it, and never shut it down.
        if init_options:
            raise ValueError("Ray is already initialized in this process: options for "
                             f"ray.init ({', '.join(sorted(init_options))}) cannot apply")
        from ray.util.client import ray as ray_client

        if address != "ray" and not ray_client.is_connected():
            raise ValueError("Ray is already initialized in this process, not through Ray "
                             "Client: use the address 'ray' to run on it")

    @staticmethod
    def _connect(ray: Any, address: str, max_workers: int | None,
                 init_options: dict[str, Any]) -> None:
        options = dict(init_options)
        if address == "ray":
            target = os.environ.get("RAY_ADDRESS") or "local"
            if target == "local" and max_workers is not None:
                options.setdefault("num_cpus", max_workers)
        else:
            target = address
        ray.init(address=target, **options)

    def release(self, ray: Any) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0 and self.owned:
                self.owned = False
                ray.shutdown()


_session = _Session()


class _Resources:
    def __init__(self, ray: Any) -> None:
        self.ray = ray

    def close(self) -> None:
        _session.release(self.ray)


class _Raised(NamedTuple):
    """An error from Ray's concurrent future, whatever its type."""

    error: BaseException


# -- the backend ---------------------------------------------------------------------------


class RayBackend(EngineBackend):
    """Runs tasks on Ray; see the module docstring for the addresses and semantics.

    ``remote_options`` go to every task (``num_cpus``, ``num_gpus``, ``resources``,
    ``runtime_env``...). Other keyword options go to ``ray.init`` when farpool
    connects or starts Ray.
    """

    engine_name = "ray"

    def __init__(self, address: str, *, max_workers: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 retries: int = 0, remote_options: dict[str, Any] | None = None,
                 **init_options: Any) -> None:
        ray = _require()
        check_max_workers(max_workers, None)
        check_retries(retries)
        check_passed_on("ray", init_options, ("max_workers", "initializer", "initargs", "retries",
                                              "remote_options"), [ray.init], "ray.init", private_ok=True)
        address = address.strip()
        if address.lower() == "ray":
            address = "ray"
        elif not address.split("://", 1)[1]:
            raise ValueError(f"a Ray address is 'ray' or 'ray://host:port', not {address!r}")
        super().__init__(initializer, initargs)
        self._ray = ray
        self._remote_options = {"max_retries": retries, **(remote_options or {})}
        self._remotes: OrderedDict[bytes, Any] = OrderedDict()
        self._lost = tuple(getattr(ray.exceptions, name) for name in _LOST_ERRORS
                           if hasattr(ray.exceptions, name))
        self._ray_error = ray.exceptions.RayError
        # Ray's ObjectRef.future() is built on ObjectRef._on_completed: calling that
        # directly spares a concurrent future per task. Only for a driver's own refs
        # (Ray Client's pass its connection errors as values too), and only while
        # Ray has it (checked once).
        self._fast_ref = ray.ObjectRef if hasattr(ray.ObjectRef, "_on_completed") else None
        # Unfinished tasks in the order they were submitted (see _engine_cancel).
        self._order: dict[Any, int] = {}
        self._submitted = itertools.count()
        self._address = address
        _session.acquire(ray, address, max_workers, init_options)
        try:
            # A function too big to export travels with each call.
            self._call_any = ray.remote(**self._remote_options)(_run)
        except BaseException:
            _session.release(ray)  # e.g. remote_options Ray does not know
            raise
        self._start(_Resources(ray))

    def __repr__(self) -> str:
        return f"<RayBackend {self._address!r}>"

    # -- submitting ----------------------------------------------------------------

    def _remote_for(self, fn: Callable[..., Any]) -> Any:
        """What submits a call of ``fn`` given its packed arguments (see call_packing).

        Exporting a function once and sending only arguments is what makes Ray fast
        (a function argument costs Ray as much as the task itself). The cache is keyed
        by the function's pickle, so a closure or a ``__main__`` function whose
        captured state changed is exported anew: each task sees the function as it
        was at its submit, as with the stdlib. Called under the submit lock.
        """
        key, blob = self.packer.function(fn)  # importable functions are pickled only once
        if len(blob) > MAX_EXPORT_BYTES or not isinstance(fn, (types.FunctionType,
                                                               types.BuiltinFunctionType)):
            return functools.partial(self._call_any.remote, key, blob)  # state travels per call
        remote = self._remotes.get(key)
        if remote is not None:
            self._remotes.move_to_end(key)
            return remote.remote
        name = getattr(fn, "__name__", "task")
        remote = self._ray.remote(**self._remote_options)(_bind(key, blob, name))
        self._remotes[key] = remote
        if len(self._remotes) > REMOTE_CACHE_SIZE:
            self._remotes.popitem(last=False)
        return remote.remote

    def _engine_submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
        try:
            return self._remote_for(fn)(self.packer.arguments(args, kwargs))
        except TypeError as exc:
            raise unwrap_pickling_error(exc) from None

    def _watch(self, future: Future, handle: Any) -> None:
        # Ray calls back from its own thread with the task's value, or a RayError (a
        # task's exception, a lost worker, a cancellation).
        self._order[handle] = next(self._submitted)  # see _engine_cancel
        if type(handle) is self._fast_ref:
            handle._on_completed(functools.partial(self._ray_settled, future, handle))
        else:
            handle.future().add_done_callback(functools.partial(self._from_future, future, handle))

    def _ray_settled(self, future: Future, handle: Any, value: Any) -> None:
        self._order.pop(handle, None)
        self._ray_done(future, value)

    def _ray_done(self, future: Future, value: Any) -> None:
        # A result is set here when it can be; the rest goes to the results thread.
        if isinstance(value, self._ray_error) or not self._settle_here(future, value):
            self._engine_done(future, value)

    def _from_future(self, future: Future, handle: Any, ray_future: Future) -> None:
        self._order.pop(handle, None)
        try:
            value = ray_future.result()
        except BaseException as exc:  # noqa: BLE001 - translated in the results thread
            self._engine_done(future, _Raised(exc))
        else:
            self._ray_done(future, value)

    # -- outcomes --------------------------------------------------------------------

    def _resolve(self, items: list[tuple[Future, Any]]) -> None:
        for future, value in items:
            if isinstance(value, _Raised):
                value = value.error
            elif not isinstance(value, self._ray_error):
                self._settle(future, value)
                continue
            try:
                error = self._translate(value)
            except BaseException as bug:  # noqa: BLE001 - report rather than hang
                error = bug
            if error is None:
                self._settle(future, cancelled=True)
            else:
                self._settle(future, error=error)

    def _translate(self, exc: BaseException) -> BaseException | None:
        """The error the user sees for Ray's ``exc``; None when the task was cancelled."""
        errors = self._ray.exceptions
        if isinstance(exc, errors.TaskCancelledError):
            return None
        if isinstance(exc, errors.RayTaskError):
            cause = getattr(exc, "cause", None)
            if isinstance(cause, errors.TaskCancelledError):
                return None
            if isinstance(cause, PackedError):
                return cause.unpack(self.engine_name)
            if cause is None or isinstance(cause, errors.RayError):
                return exc  # e.g. the task's exception could not be pickled
            cause.__cause__ = remote_traceback(_ANSI.sub("", str(exc)))
            return cause.with_traceback(None)
        if isinstance(exc, self._lost):
            lost = WorkerLost(str(exc))
            lost.__cause__ = exc
            return lost
        return exc

    # -- cancelling ------------------------------------------------------------------

    def _engine_cancel(self, handles: list[Any]) -> None:
        """Cancel in Ray only the tasks that cannot have started.

        A ``ray.cancel`` that meets a running task which then finishes aborts this
        whole process in Ray 2.60 (RAY_CHECK "it != submissible_tasks_.end()" in
        TaskManager::CompletePendingTask, ray-project/ray#54527). So a task is
        cancelled there only while at least as many of this executor's tasks
        submitted before it are still unfinished as the cluster has CPUs: it is
        waiting for one of them. The others run on; their results are dropped.
        Ray hands a freed worker its next task before it marks the finished one's
        result ready, so the count waits CANCEL_SETTLE first: a map closed as its
        results stream in would otherwise count tasks that have just ended.
        """
        if not handles:
            return
        ray = self._ray
        order = self._order
        time.sleep(CANCEL_SETTLE)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0)) or 1
            cancelling = set(handles)
            unfinished = [h for h in list(order) if h not in cancelling] + list(handles)
            _, unfinished = ray.wait(unfinished, num_returns=len(unfinished), timeout=0,
                                     fetch_local=False)
        except Exception:  # noqa: BLE001 - Ray is going away: nothing to cancel safely
            return
        seqs = sorted(order.get(h, -1) for h in unfinished)
        for ref in handles:
            seq = order.get(ref)
            if seq is None or bisect.bisect_left(seqs, seq) < cpus:
                continue  # finished, or may be running
            try:
                # Not recursive: what a task submitted is left alone.
                ray.cancel(ref, force=False, recursive=False)
            except Exception:  # noqa: BLE001 - already done, or Ray is going away
                pass

    def _cancel_queued(self, pending: dict[Future, Any]) -> None:
        # Ray cancels what has not started; started tasks ignore the interrupt and
        # report their results. The outcomes say which was which.
        self._engine_cancel(list(pending.values()))

    def stats(self) -> dict[str, Any]:
        """CPUs of the Ray cluster and tasks of this executor not yet done."""
        return {"cpus": self._ray.cluster_resources().get("CPU", 0), "pending": len(self._pending)}
