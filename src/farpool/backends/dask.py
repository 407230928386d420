"""``dask`` and ``dask://host:port``: tasks run on a Dask distributed cluster.

``dask`` starts a local cluster (``max_workers`` worker processes, default 2, one
thread each) that the executor's shutdown stops; ``dask://host:port`` connects to
a running scheduler and leaves it running. Tasks go to ``Client.submit`` (or one
``Client.map`` for a batch) with ``pure=False``, so equal calls are never merged.
Dask sees only ``call_packing.run_packed`` and bytes: farpool pickles the function
and the arguments (so a script's functions share its globals on the workers, its
local modules travel, and Dask never reads a tuple in the arguments as a task).
Workers of an existing cluster need farpool installed.

Semantics on top of Dask's:

- a task whose worker died fails with ``farpool.WorkerLost`` (Dask's ``KilledWorker``
  as its cause); on a local cluster, ``retries`` (default 0) is how many worker
  deaths a task survives. On an existing cluster the scheduler's own
  ``distributed.scheduler.allowed-failures`` decides;
- ``Future.cancel()`` succeeds until the task is done and cancels it in Dask; a
  task that had already started runs on, and its result is dropped;
- ``shutdown(cancel_futures=True)`` cancels the tasks the scheduler has not yet
  handed to a worker and lets the others finish;
- an initializer runs in each worker process before the first task it runs for
  this executor. It travels with every task (pickled once, as bytes), so keep its
  arguments small;
- ``max_workers`` sizes a local cluster; an existing cluster keeps its own size;
- each result is fetched as its task ends, except while more of this executor's
  tasks are outstanding than the cluster has threads: then results that end within
  ``FETCH_WINDOW`` (50 ms) of each other share one fetch (each costs several
  milliseconds of CPU to the client, the scheduler and the workers).
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

from ..call_packing import PackedError, run_packed
from ..errors import BackendUnavailable, WorkerLost
from .engine import (
    EngineBackend,
    InitializerFailed,
    remote_traceback,
    unwrap_pickling_error,
)
from .options import check_max_workers, check_passed_on, check_retries

__all__ = ["DaskBackend"]

DEFAULT_WORKERS = 2
# Scheduler task states in which a task has been handed to a worker (or is done):
# shutdown(cancel_futures=True) lets these finish, as the stdlib does for running work.
_STARTED = frozenset({"processing", "memory", "erred"})
# Seconds the Dask futures of done tasks are kept when no submit comes (see _keep).
RELEASE_DELAY = 1.0
# Seconds a finished task's result may wait for others to share its fetch, while more
# of this executor's tasks are outstanding than the cluster has threads (see _track).
FETCH_WINDOW = 0.05


def _require() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise BackendUnavailable(
            "the 'dask' backend needs Dask's distributed scheduler: pip install 'farpool[dask]'"
        ) from exc
    return distributed


def _scheduler_address(address: str) -> str | None:
    """``None`` for a local cluster, else the scheduler's ``tcp://`` address."""
    if address.strip().lower() == "dask":
        return None
    rest = address.split("://", 1)[1]
    if not rest or "/" in rest:
        raise ValueError(f"a Dask address is 'dask' or 'dask://host:port', not {address!r}")
    return f"tcp://{rest}"


class _Resources:
    """What to close when the executor is done: our client, and a cluster we started."""

    def __init__(self, client: Any, cluster: Any) -> None:
        self.client = client
        self.cluster = cluster

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


_OWN_OPTIONS = ("max_workers", "initializer", "initargs", "retries", "submit_options")


def _connect(distributed: Any, scheduler: str | None, workers: int | None, retries: int | None,
             options: dict[str, Any]) -> tuple[Any, Any]:
    """A Client of the scheduler at ``scheduler``, or of a new LocalCluster (returned too,
    for closing) when there is none."""
    import dask

    if scheduler is not None:
        return distributed.Client(scheduler, set_as_default=False, **options), None
    # The scheduler runs in this process and reads allowed-failures as it starts: by
    # default a task whose worker dies fails at once, like farpool's own pool. Its HTTP
    # endpoint (dashboard, health) on a free local port: a second local cluster never
    # fights over Dask's default 8787.
    options.setdefault("dashboard_address", "127.0.0.1:0")
    with dask.config.set({"distributed.scheduler.allowed-failures": retries or 0}):
        cluster = distributed.LocalCluster(
            n_workers=workers or DEFAULT_WORKERS, threads_per_worker=1, processes=True, **options)
    try:
        # Results come straight from the workers (on this host) instead of being relayed
        # by the scheduler, which stays free to schedule.
        return distributed.Client(cluster, set_as_default=False, direct_to_workers=True), cluster
    except BaseException:
        cluster.close()
        raise


class DaskBackend(EngineBackend):
    """Runs tasks on Dask; see the module docstring for the addresses and semantics.

    ``submit_options`` go to every ``Client.submit`` (``resources``, ``workers``,
    ``priority``...). Other keyword options go to ``distributed.LocalCluster`` for
    ``dask`` and to ``distributed.Client`` for ``dask://host:port``.
    """

    engine_name = "dask"

    def __init__(self, address: str, *, max_workers: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 retries: int | None = None, submit_options: dict[str, Any] | None = None,
                 **options: Any) -> None:
        distributed = _require()
        from dask.utils import funcname

        workers = check_max_workers(max_workers, None)
        scheduler = _scheduler_address(address)
        if retries is not None:
            check_retries(retries)
        if retries is not None and scheduler is not None:
            raise ValueError("retries applies to a local cluster only: an existing scheduler "
                             "retries as its distributed.scheduler.allowed-failures says")
        super().__init__(initializer, initargs)
        # Futures to watch, handed to the event loop in one callback per burst.
        self._watch_lock = threading.Lock()
        self._to_watch: list[tuple[Future, Any]] = []
        # Event loop only: the watching tasks (the loop keeps only weak references),
        # how many of them still wait for their task, tasks done and not yet fetched
        # (and since when the oldest of them), whether a fetch runs, and what wakes a
        # fetch that waits for company (see _track).
        self._tracking: set[asyncio.Task] = set()
        self._waiting = 0
        self._ready: list[tuple[Future, Any]] = []
        self._ready_since = 0.0
        self._fetching = False
        self._wake: asyncio.Future | None = None
        # Dask futures of done tasks, dropped by the next submit (see _keep).
        self._kept: list[Any] = []
        self._release_timer: asyncio.TimerHandle | None = None
        self._funcname = funcname
        self._killed_worker = distributed.KilledWorker
        self._submit_options = dict(submit_options or {})

        if scheduler is None:
            from distributed.core import Server

            check_passed_on("dask", options, _OWN_OPTIONS,
                            [distributed.LocalCluster.__init__, distributed.Nanny.__init__,
                             distributed.Worker.__init__, Server.__init__],
                            "distributed.LocalCluster (and on to its Nanny and Worker)")
        self._client, cluster = _connect(distributed, scheduler, workers, retries, options)
        self._start(_Resources(self._client, cluster))

    def __repr__(self) -> str:
        return f"<DaskBackend {self._client.scheduler.address}>"

    # -- submitting ----------------------------------------------------------------

    def _task(self, fn: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        # Dask sees bytes only: it never reads the arguments as a graph (see call_packing).
        key, blob = self.packer.function(fn)
        return run_packed, (key, blob, self.packer.arguments(args, kwargs))

    def _key(self, fn: Callable[..., Any]) -> str:
        # Named after the user's function (not a wrapper), unique: never deduplicated.
        return f"{self._funcname(fn)}-{uuid.uuid4().hex}"

    def _engine_submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
        task, task_args = self._task(fn, args, kwargs)
        self._drop_kept()
        try:
            return self._client.submit(task, *task_args, key=self._key(fn), pure=False,
                                       **self._submit_options)
        except Exception as exc:
            raise unwrap_pickling_error(exc) from None

    def _engine_submit_many(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        # One Client.map sends the whole batch in one message; it needs calls of one
        # non-zero arity (map's columns), which is what Executor.map produces.
        arity = len(calls[0])
        if len(calls) == 1 or arity == 0 or any(len(args) != arity for args in calls):
            return super()._engine_submit_many(fn, calls)
        key, blob = self.packer.function(fn)
        n = len(calls)
        task: Callable[..., Any] = run_packed
        columns: list[Any] = [[key] * n, [blob] * n, [self.packer.arguments(args, {}) for args in calls]]
        keys = [self._key(fn) for _ in calls]
        self._drop_kept()
        try:
            return self._client.map(task, *columns, key=keys, pure=False, **self._submit_options)
        except Exception:  # noqa: BLE001 - one bad call: submit one by one to fail only it
            return super()._engine_submit_many(fn, calls)

    def _watch(self, future: Future, handle: Any) -> None:
        with self._watch_lock:
            self._to_watch.append((future, handle))
            if len(self._to_watch) > 1:
                return  # the loop has yet to take the earlier ones: it takes this too
        # Waking the event loop from this thread costs a system call: once per burst.
        self._client.loop.add_callback(self._track_new)

    # -- outcomes --------------------------------------------------------------------

    def _track_new(self) -> None:
        with self._watch_lock:
            items, self._to_watch = self._to_watch, []
        for future, dfut in items:
            self._start_tracking(future, dfut)

    def _start_tracking(self, future: Future, dfut: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._track(future, dfut))
        self._waiting += 1
        self._tracking.add(task)
        task.add_done_callback(self._tracking.discard)

    def _busy(self) -> bool:
        """Whether more of our tasks are outstanding than the cluster has threads:
        its workers then stay busy whether or not we have the results yet."""
        # The client refreshes this summary every few seconds on its own (no request).
        info = getattr(self._client, "_scheduler_identity", None) or {}
        threads = info.get("total_threads") or 0
        return bool(threads) and self._waiting > threads

    async def _track(self, future: Future, dfut: Any) -> None:
        """On the client's event loop: wait until the task is done, then fetch its
        result together with those of other tasks done by then.

        A fetch (a gather: a request to the scheduler, one to each worker holding a
        result) costs a few milliseconds of CPU over the client, the scheduler and
        the workers, much more than a 1 ms task: fetched one or two at a time, as they
        end, results cost a third more CPU than one gather at the end. So one fetch
        runs at a time and takes every task done since the last one; and while more
        of this executor's tasks are outstanding than the cluster has threads (the
        workers have queued work: a result handed over later holds none of them up),
        the fetch waits up to FETCH_WINDOW after the oldest of its tasks ended, for
        others to join. Otherwise (a lone task, ``map`` with a small ``buffersize``,
        the last tasks of a burst) it goes at once.
        It awaits the future's state (``dfut._state``, what Dask's own ``wait`` and
        ``as_completed`` await): unlike ``Future.add_done_callback``, no callback thread.
        """
        try:
            await dfut._state.wait()
        finally:
            self._waiting -= 1
        if not self._ready:
            self._ready_since = time.monotonic()
        self._ready.append((future, dfut))
        del future, dfut  # this task may go on fetching others: hold no result
        wake = self._wake
        if wake is not None and not self._busy():
            _set_once(wake)
        if self._fetching:
            return  # the running fetch takes it next
        self._fetching = True
        try:
            # Tasks reported done in the same message from the scheduler resume right
            # after this one: one turn of the loop lets them join this batch.
            await asyncio.sleep(0)
            while self._ready:
                delay = self._ready_since + FETCH_WINDOW - time.monotonic()
                if delay > 0 and self._busy():
                    await self._wait_for_company(delay)
                await self._fetch_ready()
        finally:
            self._fetching = False

    async def _wait_for_company(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less if we stop being busy meanwhile."""
        loop = asyncio.get_running_loop()
        self._wake = wake = loop.create_future()
        timer = loop.call_later(delay, _set_once, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    async def _fetch_ready(self) -> None:
        """Fetch what is ready, and hand it out; nothing of it stays referenced here."""
        batch, self._ready = self._ready, []
        try:
            outcomes = await self._fetch(batch)
        except BaseException as exc:  # noqa: BLE001 - a bug: no future may wait forever
            outcomes = [(fut, (handle, False, exc)) for fut, handle in batch]
        # Results are set here when they can be; the rest go to the results thread.
        rest = []
        for fut, (handle, ok, payload) in outcomes:
            if not (ok and self._settle_here(fut, payload)):
                rest.append((fut, (handle, ok, payload)))
        self._engine_done_many(rest)
        self._keep([handle for _, (handle, _, _) in outcomes])

    def _keep(self, dfuts: list[Any]) -> None:
        """On the event loop: keep these done tasks' Dask futures rather than drop them.

        Dropping a Dask future makes the client tell the scheduler to release the
        key, through a stream that sends at most one batch per 10 ms. Dropped here,
        as its result is set, the release would go alone, just before the next submit,
        which would then wait for the next batch: 10 ms more per round trip. The
        next submit drops them just before it sends, so both share a batch (as when a
        user drops a Dask future and submits); without one, they go after RELEASE_DELAY.
        """
        with self._watch_lock:
            self._kept.extend(dfuts)
        if self._release_timer is None:
            self._release_timer = asyncio.get_running_loop().call_later(RELEASE_DELAY, self._release)

    def _release(self) -> None:
        self._release_timer = None
        self._drop_kept()

    def _drop_kept(self) -> None:
        with self._watch_lock:
            kept, self._kept = self._kept, []
        del kept  # outside the lock: each release goes through the client

    async def _fetch(self, batch: list[tuple[Future, Any]]) -> list[tuple[Future, Any]]:
        """``(future, (dfut, ok, value or error))`` for each done task of ``batch``."""
        finished = [dfut for _, dfut in batch if dfut.status == "finished"]
        outcomes: dict[Any, tuple[bool, Any]] = {}
        if finished:
            try:
                values = await self._client.gather(finished, asynchronous=True)
            except BaseException:  # noqa: BLE001 - one by one, to fail only the culprits
                for dfut in finished:
                    outcomes[dfut.key] = await self._fetch_one(dfut)
            else:
                outcomes = {dfut.key: (True, value) for dfut, value in zip(finished, values, strict=True)}
        out: list[tuple[Future, Any]] = []
        for future, dfut in batch:
            outcome = outcomes.get(dfut.key)
            if outcome is None and dfut.status not in ("error", "cancelled"):
                # Finished, then its result was lost with its worker: Dask computes it
                # again. (An error or a cancellation travels as the future's status.)
                self._start_tracking(future, dfut)
                continue
            out.append((future, (dfut, *(outcome or (False, None)))))
        return out

    async def _fetch_one(self, dfut: Any) -> tuple[bool, Any]:
        try:
            return True, await self._client.gather(dfut, asynchronous=True)
        except BaseException as exc:  # noqa: BLE001 - sorted out in the results thread
            return False, exc

    def _resolve(self, items: list[tuple[Future, Any]]) -> None:
        for future, (dfut, ok, payload) in items:
            if ok:
                self._settle(future, payload)
                continue
            try:
                self._settle_error(future, dfut, payload)
            except BaseException as exc:  # noqa: BLE001 - e.g. the error does not unpickle here
                self._settle(future, error=exc)

    def _settle_error(self, future: Future, dfut: Any, error: BaseException | None) -> None:
        if future not in self._pending:
            return  # cancelled by the user: nothing to report
        status = dfut.status
        if status == "cancelled" or isinstance(error, CancelledError | asyncio.CancelledError):
            self._settle(future, cancelled=True)
            return
        if status != "error" and error is not None:
            # The task succeeded but its result did not reach us.
            self._settle(future, error=unwrap_pickling_error(error))
            return
        exc, tb = dfut.exception(), dfut.traceback()
        if isinstance(exc, PackedError):
            self._settle(future, error=exc.unpack(self.engine_name))
            return
        if isinstance(exc, self._killed_worker):
            lost = WorkerLost(str(exc))
            lost.__cause__ = exc
            self._settle(future, error=lost)
            return
        if not isinstance(exc, InitializerFailed):
            text = "Traceback (most recent call last):\n" + "".join(traceback.format_tb(tb))
            text += "".join(traceback.format_exception_only(type(exc), exc))
            exc.__cause__ = remote_traceback(text)
            exc.__traceback__ = None
        self._settle(future, error=exc)

    # -- cancelling ------------------------------------------------------------------

    def _engine_cancel(self, handles: list[Any]) -> None:
        try:
            self._client.cancel(handles)
        except Exception:  # noqa: BLE001 - the client is closing: Dask drops them anyway
            pass

    def _cancel_queued(self, pending: dict[Future, Any]) -> None:
        by_key = {dfut.key: future for future, dfut in pending.items()}
        try:
            states = self._client.sync(self._client.scheduler.get_task_status,
                                       keys=list(by_key), callback_timeout=30)
        except Exception:  # noqa: BLE001 - unknown states: cancel all that are pending
            states = {}
        for key, future in by_key.items():
            if states.get(key) not in _STARTED:
                future.cancel()  # our done-callback cancels it in Dask

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        self._drop_kept()  # their releases go before the client closes
        super().shutdown(wait, cancel_futures)

    def stats(self) -> dict[str, Any]:
        """Workers of the cluster and tasks of this executor not yet done."""
        workers = self._client.scheduler_info().get("workers", {})
        return {"workers": len(workers), "pending": len(self._pending)}


def _set_once(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
