"""A local pool: worker processes or threads fed by one I/O thread over ZeroMQ.

Data flow::

    caller threads                 I/O thread (owns every socket)          workers
    --------------                 ------------------------------          -------
    submit(): pickle args  --+
      (processes only)       |     inbox --> Dispatcher (credit, order)
    append to inbox, wake ---+-->          |
                                           v   TASKS batch (fn once/worker)
                                   ROUTER ---------------------------->  DEALER
                                   ROUTER <----------------------------  WorkerLoop
    future.result() <-- set_result     RESULTS batch
                                   pidfd readable      <--------------  process died

Processes use ``ipc://`` in a private (0700) directory; thread workers use
``inproc://`` and get their calls by reference, completing futures themselves.

The I/O thread holds no reference to the executor: an executor that is dropped
without ``shutdown`` is shut down (without waiting) by a finalizer, and an exit hook
lets queued work finish before the interpreter exits, as the stdlib does.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import zmq

from . import exit_hooks, protocol, serialize
from .dispatch import Dispatcher, Task, WorkerSlot, plan_loss, task_label
from .errors import ProcessPoolBroken, ThreadPoolBroken, WorkerLost, unpickling_failed
from .protocol import ByeReason, Kind, Status
from .respawn import StartFailures
from .spawn import WorkerProcess, describe_exit, pickle_initializer, spawn_worker
from .wakeup import WakePipe
from .worker_loop import SharedCalls, WorkerLoop, hello, run_initializer

_INIT_FAILED = "A {kind} initializer failed, the {kind} pool is not usable anymore"
STOP_GRACE_SECONDS = 5.0
_TASKS = Kind.TASKS  # a module global: cheaper to read than the enum's attribute
log = logging.getLogger("farpool.pool")

class FutureSink:
    """Where a local pool's outcomes go: each task's ``context`` is its Future."""

    def __init__(self, pickled: bool) -> None:
        self.pickled = pickled

    def start(self, task: Task) -> bool:
        future = task.context
        if task.sent:
            # Requeued after its worker died: running already. Setting it running again
            # would make concurrent.futures log "in unexpected state" at CRITICAL.
            return future.running()
        task.sent = True
        return future.set_running_or_notify_cancel()

    def result(self, task: Task, entry: protocol.ResultEntry, payload: list[Any]) -> None:
        if not self.pickled:
            return  # the thread worker completed the future itself
        future = task.context
        try:
            if entry.status == Status.OK:
                future.set_result(serialize.loads(payload))
            else:
                future.set_exception(serialize.load_exception(payload))
        except BaseException as exc:  # noqa: BLE001 - unpicklable result or error
            if not future.done():
                what = "result" if entry.status == Status.OK else "exception"
                future.set_exception(unpickling_failed(
                    f"the {what} of task {task.task_id} ({task.label})", exc))

    def fail(self, task: Task, exc: BaseException) -> None:
        future = task.context
        if type(future) is weakref.ref:  # a thread worker's task: see send_shared
            future = future()
            if future is None:
                return  # nobody holds it any more: nobody to tell
        if future.done():
            return
        if future.running() or future.set_running_or_notify_cancel():
            future.set_exception(exc)

    def cancel(self, task: Task) -> bool:
        """Cancel a queued task; False when it has started already (requeued after its
        worker died): it must still run."""
        future = task.context
        return future.cancel() or future.done()


class LocalPool:
    """The backend for ``processes`` and ``threads``. Caller-side half: the I/O loop
    lives in ``_PoolIO``."""

    def __init__(self, *, processes: bool, max_workers: int, initializer: Callable[..., Any] | None,
                 initargs: tuple[Any, ...], max_tasks_per_child: int | None = None,
                 thread_name_prefix: str = "", retries: int = 0) -> None:
        if exit_hooks.exiting():
            raise RuntimeError("cannot start a pool after interpreter shutdown")
        self.processes = processes
        self.chunks = processes  # map(chunksize>1) batches; threads ignore it like the stdlib
        self.broken_type = ProcessPoolBroken if processes else ThreadPoolBroken
        self._ids = itertools.count(1)
        self._pickle_fn = serialize.FunctionPickler()
        self._pickle_lock = threading.Lock()
        self._io = _PoolIO(processes=processes, max_workers=max_workers, initializer=initializer,
                           initargs=initargs, max_tasks=max_tasks_per_child,
                           thread_name_prefix=thread_name_prefix, retries=retries)
        self._io.start()
        self._finalizer = weakref.finalize(self, _PoolIO.request_close, self._io, False)

    # -- caller side ---------------------------------------------------------------
    @property
    def broken(self) -> BaseException | None:
        return self._io.broken

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future:
        future: Future = Future()
        io = self._io
        if not self.processes:
            task = self._shared_task(fn, args, kwargs, future)
            if not io.run_now(task):
                io.add_threads(1)
                io.post([task])
            return future
        made = self._make_task(fn, args, kwargs, future, None)
        if made is not None:
            io.post([made])
        return future

    def submit_many(self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]]) -> list[Future]:
        """Submit ``fn(*args)`` for each args; the function is pickled once."""
        fn_pickle: Any = None  # the function's frames, or why it did not pickle
        if self.processes:
            try:
                with self._pickle_lock:
                    fn_pickle = self._pickle_fn(fn)
            except BaseException as exc:  # noqa: BLE001
                fn_pickle = exc
        futures, tasks = [], []
        for args in calls:
            future: Future = Future()
            task = (self._make_task(fn, args, {}, future, fn_pickle) if self.processes
                    else self._shared_task(fn, args, {}, future))
            futures.append(future)
            if task is not None:
                tasks.append(task)
        if tasks:
            if not self.processes:
                self._io.add_threads(len(tasks))
            self._io.post(tasks)
        return futures

    def _shared_task(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     future: Future) -> Task:
        """A thread pool's task: threads share memory, so the call itself rides in
        fn_blob, never pickled."""
        broken = self._io.broken
        if broken is not None:
            raise self.broken_type(str(broken))
        return Task(next(self._ids), b"-", (fn, args, kwargs), [], b"", task_label(fn), 0, False, future)

    def _make_task(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], future: Future,
                   fn_pickle: Any) -> Task | None:
        """A process pool's task: the function's pickle (made once per function) and
        the arguments' frames; None if they fail to pickle (``future`` says why)."""
        broken = self._io.broken
        if broken is not None:
            raise self.broken_type(str(broken))
        task_id = next(self._ids)
        try:
            if fn_pickle is None:
                with self._pickle_lock:
                    fn_pickle = self._pickle_fn(fn)
            elif isinstance(fn_pickle, BaseException):
                raise fn_pickle
            key, blob = fn_pickle
            frames = serialize.dumps_args(args, kwargs)
        except BaseException as exc:  # noqa: BLE001 - the future carries the pickling error
            future.set_exception(exc)
            return None
        return Task(task_id, key, blob, frames, label=task_label(fn), context=future)

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        self._io.request_close(cancel_futures)
        if wait:
            self._io.join()

    def stats(self) -> dict[str, Any]:
        return self._io.stats()

    @property
    def max_workers(self) -> int:
        return self._io.max_workers

    def worker_threads(self) -> set[threading.Thread]:
        return set(self._io.threads.values())


class _PoolIO:
    """The I/O thread's state. Only the I/O thread touches sockets and the
    dispatcher; callers reach it through ``inbox`` plus a wake-up pipe."""

    def __init__(self, *, processes: bool, max_workers: int, initializer: Any,
                 initargs: tuple[Any, ...], max_tasks: int | None, thread_name_prefix: str,
                 retries: int, sink: Any = None) -> None:
        self.processes = processes
        # Before any pipe, socket or thread exists: initargs that do not pickle fail
        # the constructor without leaving anything behind.
        self.init_blob: bytes | None
        self.init_fds: tuple[int, ...]
        self.init_blob, self.init_fds = (pickle_initializer(initializer, initargs)
                                         if processes else (None, ()))
        # Outcomes go to futures here; a worker daemon relays them upstream instead.
        self.sink = sink if sink is not None else FutureSink(pickled=processes)
        # Extra sockets the I/O thread polls, with their handlers (a daemon's upstream).
        self.extra: dict[Any, Callable[[], None]] = {}
        self.max_workers = max_workers
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks = max_tasks
        self.thread_name_prefix = thread_name_prefix or f"FarpoolThread-{id(self):x}"
        self.retries = retries
        self.broken_type = ProcessPoolBroken if processes else ThreadPoolBroken
        self.broken: BaseException | None = None

        self.inbox: deque[Task] = deque()
        self.wakeup = WakePipe()
        self.closing = False
        self.cancel_pending = False

        self.dispatcher = Dispatcher()
        self.sent_fns: dict[bytes, serialize.SentFunctions] = {}
        self.procs: dict[bytes, WorkerProcess] = {}
        self.threads: dict[bytes, threading.Thread] = {}
        self.starting = 0  # worker processes spawned that have not said HELLO yet
        self.hellos = 0  # thread workers that have said HELLO
        # Thread workers start in the submitting thread, as the stdlib's do: one per
        # submit that finds no idle worker, up to max_workers. ``idle`` counts idle
        # workers as tokens: a worker that finishes its tasks appends one, a submit
        # takes one (deque appends and pops are atomic: a semaphore without the cost
        # of threading.Semaphore's Python-level locking). ``grow_lock`` guards ``threads``.
        self.idle: deque[None] = deque()
        self.grow_lock = threading.Lock()
        self.start_failures = StartFailures(give_up=True)
        self.worker_ids = itertools.count()
        self.shared_calls: dict[int, Any] = {}
        # Thread workers' finished tasks, (worker id, result entries), appended by the
        # workers themselves: see thread_done.
        self.freed: deque[tuple[bytes, list[list[Any]]]] = deque()
        self.stop_threads = threading.Event()

        self.runtime_dir = tempfile.mkdtemp(prefix="farpool-") if processes else None
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.router_mandatory = True
        if processes:
            self.address = f"ipc://{self.runtime_dir}/pool"
        else:
            self.address = f"inproc://farpool-{id(self):x}"
        self.router.bind(self.address)
        self.thread = threading.Thread(target=self.run, name="farpool-io", daemon=True)
        self.started = threading.Event()
        # Held by whoever works on the router and the dispatcher: the I/O thread, except
        # while it waits in poll, when a submitting thread may take it (see post).
        self.io_lock = threading.Lock()
        self.outcomes: list[tuple[Task, protocol.ResultEntry, list[Any]]] = []  # see deliver
        self.deferred: deque[tuple[bytes, protocol.Message]] = deque()  # see receive
        self.router_fd = int(self.router.get(zmq.FD))

    # -- caller side ---------------------------------------------------------------
    def start(self) -> None:
        exit_hooks.register(self)
        self.thread.start()
        if not self.started.wait(30):  # pragma: no cover - a stuck start is a bug
            raise RuntimeError("farpool I/O thread did not start")

    def post(self, tasks: list[Task]) -> None:
        if self.closing:
            for task in tasks:
                self.sink.cancel(task)
            raise RuntimeError("cannot schedule new futures after shutdown")
        # Fast path: when the I/O thread is waiting and a worker is idle, the caller
        # sends the task itself, saving a thread switch on every round trip.
        direct = not self.inbox
        self.inbox.extend(tasks)
        if direct and self.io_lock.acquire(blocking=False):
            try:
                self.dispatch_now()
            finally:
                self.io_lock.release()
        else:
            self.wake()

    def run_now(self, task: Task) -> bool:
        """A thread pool's submit, when a worker is idle and nothing is queued: send
        ``task`` to it from the submitting thread, and take the idle token as
        add_threads would. False (having changed nothing) in any other case.

        The short way matters for latency: every step of a thread pool's round trip
        runs under the interpreter lock, the caller's and the worker's in turn.
        """
        if self.inbox or self.closing or self.broken is not None:
            return False
        idle = self.idle
        try:
            idle.pop()
        except IndexError:
            return False  # no idle worker: add_threads may start one
        if not self.io_lock.acquire(False):  # (positional: a keyword costs more here)
            idle.append(None)
            return False
        try:
            if self.freed:
                self.take_freed()
            # Threads still starting send HELLOs that only the general path reads.
            worker = (self.dispatcher.place(task) if self.hellos >= len(self.threads)
                      else None)
            if worker is None:
                idle.append(None)
                return False
            self.send_shared(worker, [task])
            # A thread started meanwhile (by another submit) may have said HELLO,
            # and the send may have taken the router's signal for it: the I/O
            # thread reads HELLOs (see may_have_input).
            if self.hellos < len(self.threads):
                self.wake()
            return True
        finally:
            self.io_lock.release()

    def dispatch_now(self) -> None:
        """In a submitting thread, with ``io_lock``: hand the inbox to idle workers.

        Anything else (a queue to respect, no idle worker, a closing or broken pool,
        input waiting on the router) is left to the I/O thread, woken for it. Nothing
        here completes a future, so no done-callback runs in the submitting thread.
        """
        dispatcher = self.dispatcher
        if not self.processes:
            # Thread workers complete their futures themselves: what they reported
            # tells which of them are idle now; a HELLO, that one has started.
            if self.freed:
                self.take_freed()
            if self.hellos < len(self.threads):
                self.receive(caller=True)
        inbox = self.inbox
        if (len(inbox) == 1 and not self.closing and self.broken is None
                and not dispatcher.queued):
            # The common case (one submit, a worker idle): no queue to go through.
            worker = dispatcher.place(inbox[0])
            if worker is not None:
                self.send_batch(worker, [inbox.popleft()])
                if self.deferred or self.may_have_input():
                    self.wake()
                return
        if (self.closing or self.broken is not None or dispatcher.queued
                or not any(len(w.held) < w.slots and not w.retiring
                           for w in dispatcher.workers.values())):
            self.wake()
            return
        while inbox:
            dispatcher.submit(inbox.popleft())
        self.dispatch()
        if self.freed:
            self.take_freed()  # a fast thread worker has answered already
        # A send may have taken the router's wake-up signal: the I/O thread must look.
        if dispatcher.queued or self.deferred or self.may_have_input():
            self.wake()

    def may_have_input(self) -> bool:
        """After a send from a submitting thread: is input waiting that the I/O thread
        might not be told of? (A send can take the router's wake-up signal.) Thread
        workers that have all said HELLO send nothing more until the pool stops them,
        so for them the check, a cost on every submit, is skipped."""
        if not self.processes and self.hellos >= len(self.threads):
            return False
        return protocol.readable(self.router)

    def wake(self) -> None:
        self.wakeup.wake()

    def request_close(self, cancel: bool) -> None:
        if cancel:
            self.cancel_pending = True
        self.closing = True
        self.wake()

    def join(self, timeout: float | None = None) -> None:
        if threading.current_thread() is self.thread or not self.thread.is_alive():
            return
        self.thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        d = self.dispatcher
        return {"workers": len(d.workers), "queued": d.queued, "running": d.in_flight(),
                "done": d.done}

    # -- I/O thread ----------------------------------------------------------------
    def run(self) -> None:
        self.io_lock.acquire()
        try:
            self.poller = zmq.Poller()
            # The router's FD, not the router: other threads may use the socket while
            # this one waits (under io_lock), so the wait must not touch it.
            self.poller.register(self.router_fd, zmq.POLLIN)
            self.poller.register(self.wakeup.fd, zmq.POLLIN)
            for sock in self.extra:
                self.poller.register(sock, zmq.POLLIN)
            if self.processes:
                for _ in range(self.max_workers):
                    self.spawn()
            self.started.set()
            self.loop()
        except BaseException as exc:  # noqa: BLE001 - never leave futures hanging
            traceback.print_exc()
            self.break_pool(f"the farpool I/O thread failed: {exc!r}")
        finally:
            self.started.set()
            try:
                self.cleanup()
            finally:
                self.io_lock.release()

    def loop(self) -> None:
        readable = protocol.readable
        router = self.router
        router_fd = self.router_fd
        wake_r = self.wakeup.fd
        poll = self.poller.poll
        lock = self.io_lock
        while True:
            lock.release()
            try:
                events = poll(100 if self.closing else None)
            finally:
                lock.acquire()
            woken = False
            for what, _ in events:
                if what == router_fd:
                    continue
                if what == wake_r:
                    woken = True
                    continue
                handler = self.extra.get(what)
                if handler is not None:
                    handler()
                else:
                    self.on_death(what)
            if woken or self.inbox or self.cancel_pending:
                self.take_inbox(woken)
            while True:
                self.receive()  # returns with nothing left to read
                if self.broken is not None or not self.dispatcher.queued:
                    break
                self.dispatch()
                # The router's FD only signals changes: after any socket operation (a
                # send included), look for input before waiting on it again.
                if not readable(router):
                    break
            if self.outcomes:
                self.deliver()
            if self.closing and self.finished():
                return

    def take_inbox(self, woken: bool = True) -> None:
        if woken:
            self.wakeup.drain()  # before the inbox: see WakePipe.drain
        inbox = self.inbox
        submit = self.dispatcher.submit
        while inbox:
            task = inbox.popleft()
            if self.broken is not None:
                self.fail(task, self.broken_type(str(self.broken)))
            else:
                submit(task)
        if self.cancel_pending:
            self.cancel_queued()

    def cancel_queued(self) -> None:
        """``shutdown(cancel_futures=True)``: cancel the tasks no worker is there for.

        By the time a caller shuts a stdlib pool down, its workers have taken the first
        tasks (its process pool even marks max_workers + 1 of them running at submit).
        This thread may see the submits and the shutdown at once: so idle workers take
        tasks first, and as many stay queued as workers are starting up.
        """
        if self.broken is None:
            self.dispatch()
        keep = self.pending_starts()
        for client in list(self.dispatcher.queues):
            for task in self.dispatcher.drop_client(client):
                if keep > 0:
                    keep -= 1
                    self.dispatcher.submit(task)
                elif not self.sink.cancel(task):
                    self.dispatcher.submit(task)

    def finished(self) -> bool:
        if self.broken is not None:
            return True
        return not self.inbox and self.dispatcher.idle()

    def receive(self, caller: bool = False) -> None:
        """Handle what the workers sent. A submitting thread (``caller``) handles only
        HELLOs of thread workers starting up, which complete no future; anything
        else it leaves in ``deferred`` for the I/O thread."""
        router = self.router
        readable = protocol.readable
        deferred = self.deferred
        freed = self.freed
        if freed:
            self.take_freed()
        while deferred and not caller:
            worker_id, msg = deferred.popleft()
            self.handlers[msg.kind](self, worker_id, msg)
        while readable(router):
            frames = protocol.recv_frames(router)
            if freed:  # a thread worker reports its last tasks before it says BYE
                self.take_freed()
            worker_id = frames[0].bytes
            try:
                msg = protocol.decode(frames[1:])
            except protocol.ProtocolError as exc:
                log.warning("dropped a malformed message from a worker: %s", exc)
                continue
            if caller and msg.kind is not Kind.HELLO:
                if msg.kind in self.handlers:
                    deferred.append((worker_id, msg))
                continue
            handler = self.handlers.get(msg.kind)
            if handler is not None:
                handler(self, worker_id, msg)

    def thread_done(self, worker_id: bytes, entries: list[list[Any]]) -> None:
        """In a thread worker, before it completes the futures of ``entries``.

        Thread workers complete their futures themselves, so what they tell the pool
        is only that they are free again. Sent as a message, it would wake this I/O
        thread after every task to fight the woken caller for the interpreter; so it
        waits in ``freed`` for the pool's next look (the next submit does it first).
        Only when work is queued (or the pool is stopping) is it needed now: then
        the worker does the bookkeeping itself if ``io_lock`` is free, handing
        itself the queued work, and otherwise wakes the I/O thread. (It appends
        before it reads ``queued``: either the pool drains ``freed`` after queuing,
        or the worker sees the queue.)
        """
        self.freed.append((worker_id, entries))
        self.idle.append(None)
        if not (self.dispatcher.queued or self.closing or self.inbox):
            return
        if not self.io_lock.acquire(blocking=False):
            self.wake()  # the holder may have passed its last look at freed
            return
        try:
            self.take_freed()
            sent = False
            if self.dispatcher.queued and self.broken is None and not self.closing:
                self.dispatch()
                sent = True
            # After a send the router's FD may not signal input already there.
            busy = (self.closing or self.inbox or self.deferred or self.dispatcher.queued
                    or sent and protocol.readable(self.router))
        finally:
            self.io_lock.release()
        if busy:
            self.wake()

    def take_freed(self) -> None:
        freed = self.freed
        finished = self.dispatcher.finished
        while freed:
            worker_id, entries = freed.popleft()
            for entry in entries:
                finished(worker_id, entry[0], entry[3])

    def on_hello(self, worker_id: bytes, msg: protocol.Message) -> None:
        info = msg.body[0]
        proc = self.procs.get(worker_id)
        if self.processes and proc is None:
            return  # not a worker we started
        if proc is not None:
            proc.said_hello = True
        if self.processes:
            self.starting -= 1
        else:
            self.hellos += 1
        self.start_failures.started()
        self.dispatcher.add_worker(worker_id, int(info.get("slots", 1)), max_tasks=self.max_tasks,
                                   info=info)
        self.sent_fns[worker_id] = serialize.SentFunctions()

    def on_results(self, worker_id: bytes, msg: protocol.Message) -> None:
        frames = msg.frames
        finished = self.dispatcher.finished
        pos = 0
        for entry in msg.body[0]:
            payload = frames[pos : pos + entry.nframes]
            pos += entry.nframes
            task = finished(worker_id, entry.task_id, entry.duration)
            if task is not None:
                self.outcomes.append((task, entry, payload))

    def deliver(self) -> None:
        """Hand finished tasks to the sink. The I/O thread does it last in each round,
        after sending work out, just before it waits: a caller woken by its result
        then finds the interpreter free instead of waiting on this thread."""
        outcomes, self.outcomes = self.outcomes, []
        for task, entry, payload in outcomes:
            self.sink.result(task, entry, payload)

    def on_bye(self, worker_id: bytes, msg: protocol.Message) -> None:
        reason = msg.body[0]
        proc = self.procs.get(worker_id)
        if proc is not None:
            proc.said_bye = reason
        if protocol.bye_reason(reason) is ByeReason.INITIALIZER_FAILED:
            # A live process: the pool breaks once it has exited (on_death), as the
            # stdlib's does, so what its exit flushes (a multiprocessing Queue fed by a
            # log handler the initializer set up) has arrived when callers see it broken.
            if proc is None:  # a thread, or a process already seen dead
                self.break_pool(_INIT_FAILED.format(kind="process" if self.processes else "thread"))
            return
        # A retiring worker answered everything before its BYE.
        for task in self.dispatcher.remove_worker(worker_id):
            self.dispatcher.submit(task, front=True)

    handlers: dict[Kind, Callable[[_PoolIO, bytes, protocol.Message], None]] = {
        Kind.HELLO: on_hello,
        Kind.RESULTS: on_results,
        Kind.BYE: on_bye,
    }

    def dispatch(self) -> None:
        for worker, batch in self.dispatcher.assign():
            self.send_batch(worker, batch)
        if not self.processes:
            self.grow_threads()

    def send_batch(self, worker: WorkerSlot, batch: list[Task]) -> None:
        """Send ``worker`` the tasks the dispatcher gave it (each function's pickle
        only the first time this worker sees it)."""
        if not self.processes:
            self.send_shared(worker, batch)
            return
        entries: list[list[Any]] = []
        frames: list[Any] = []
        sent = self.sent_fns[worker.worker_id]
        for task in batch:
            if not self.sink.start(task):
                self.unplace(worker, task)
                continue
            with_fn = sent.needs(task.fn_key)
            entries.append([task.task_id, task.fn_key, int(with_fn), len(task.frames)])
            if with_fn:
                frames.append(task.fn_blob)
            frames.extend(task.frames)
        if entries:
            self.send(worker, protocol.encode(Kind.TASKS, [entries], frames))

    def send_shared(self, worker: WorkerSlot, batch: list[Task]) -> None:
        """send_batch for a thread worker: the calls wait in ``shared_calls`` and the
        message names them by task id, in one frame (see WorkerLoop's one_frame)."""
        entries: list[list[Any]] = []
        calls = self.shared_calls
        sent = []
        for task in batch:
            future = task.context
            # A thread worker never dies under a task: nothing is ever requeued
            # running, so unlike FutureSink.start there is no running state to allow.
            if not future.set_running_or_notify_cancel():
                self.unplace(worker, task)
                # Count the worker idle again, as a stdlib thread does after a
                # cancelled work item: else a thread started for it never would be.
                self.idle.append(None)
                continue
            calls[task.task_id] = (*task.fn_blob, future)
            entries.append([task.task_id, b"-", 0, 0])
            sent.append(task)
        if not entries:
            return
        self.send(worker, protocol.encode(_TASKS, [entries]))
        # After the send, while the worker wakes up: the worker holds the future now,
        # until it has completed it; the task only needs it to fail it should the
        # pool stop first. Held weakly, a result the caller has dropped is freed at
        # once, whenever the pool next looks at what its threads finished.
        for task in sent:
            task.fn_blob = None
            task.context = weakref.ref(task.context)

    @staticmethod
    def unplace(worker: WorkerSlot, task: Task) -> None:
        """Take back a task placed on ``worker`` that was cancelled before it went."""
        del worker.held[task.task_id]
        if worker.tasks_left is not None:
            worker.tasks_left += 1

    def send(self, worker: WorkerSlot, msg: list[Any]) -> None:
        try:
            protocol.send_routed(self.router, worker.worker_id, msg)
        except zmq.ZMQError as exc:  # the peer is gone: its death notice follows
            # An ordinary heal, not news: the worker's death fails or requeues its tasks.
            log.debug("could not send to worker %r: %s", worker.worker_id, exc)

    # -- workers -------------------------------------------------------------------
    def spawn(self) -> None:
        worker_id = f"w{next(self.worker_ids)}".encode()
        self.starting += 1
        assert self.runtime_dir is not None
        proc = spawn_worker(worker_id, self.address, self.runtime_dir,
                            max_tasks=self.max_tasks, init_blob=self.init_blob,
                            inherit_fds=self.init_fds)
        self.procs[worker_id] = proc
        self.poller.register(proc.fileno(), zmq.POLLIN)

    def spawn_thread(self) -> None:
        """Start a thread worker (with ``grow_lock`` held)."""
        worker_id = f"w{next(self.worker_ids)}".encode()
        name = f"{self.thread_name_prefix}_{len(self.threads)}"
        thread = threading.Thread(target=self.thread_worker, args=(worker_id,), name=name,
                                  daemon=True)
        thread.start()
        self.threads[worker_id] = thread

    def pending_starts(self) -> int:
        """Workers started that have not said HELLO yet."""
        return self.starting if self.processes else len(self.threads) - self.hellos

    def add_threads(self, count: int) -> None:
        """In a submitting thread, for ``count`` new tasks: as the stdlib does, each
        takes an idle worker if there is one, else starts a worker (up to
        max_workers). So a pool never has more threads than it needed at once."""
        take = self.idle.pop
        for _ in range(count):
            try:
                take()
                continue
            except IndexError:
                pass
            with self.grow_lock:
                if len(self.threads) >= self.max_workers or self.closing:
                    return
                self.spawn_thread()

    def grow_threads(self) -> None:
        """A safety net behind add_threads: tasks queued with every thread busy and
        none starting start one (the idle count add_threads reads, like the stdlib's,
        can over-count: a thread that finished a batch counts once per batch)."""
        dispatcher = self.dispatcher
        if self.processes or not dispatcher.queued or self.closing:
            return
        with self.grow_lock:
            if (len(self.threads) < self.max_workers
                    and dispatcher.queued > self.pending_starts()
                    and all(w.held for w in dispatcher.workers.values())):
                self.spawn_thread()

    def thread_worker(self, worker_id: bytes) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = worker_id
        sock.connect(self.address)
        try:
            failure = run_initializer(self.initializer, self.initargs)
            if failure is not None:
                bye = protocol.bye_text(ByeReason.INITIALIZER_FAILED, failure)
                sock.send_multipart(protocol.encode(Kind.BYE, [bye]))
                return
            hello(sock, {"pid": os.getpid(), "slots": 1})
            calls = SharedCalls(self.shared_calls,
                                report=functools.partial(self.thread_done, worker_id))
            loop = WorkerLoop(sock, calls, stop=self.stop_threads, one_frame=True)
            reason = loop.run()
            sock.send_multipart(protocol.encode(Kind.BYE, [reason]))
        finally:
            sock.close()

    def on_death(self, control: Any) -> None:
        # zmq.Poller reports plain sockets by file descriptor.
        fd = control if isinstance(control, int) else control.fileno()
        proc = next((p for p in self.procs.values() if p.fileno() == fd), None)
        if proc is None:
            return
        if proc.pidfd < 0:  # woken by the control socket, not by the process's exit
            try:
                if proc.control.recv(64):
                    return  # not a death: the worker never writes, but be tolerant
            except OSError:
                pass
        self.poller.unregister(proc.fileno())
        del self.procs[proc.worker_id]
        code = proc.reap()
        held = self.dispatcher.remove_worker(proc.worker_id)
        self.sent_fns.pop(proc.worker_id, None)
        if not proc.said_hello:
            self.starting -= 1
        if not proc.said_bye or held:
            self.handle_lost(proc, code, held)
        proc.close()
        if protocol.bye_reason(proc.said_bye) is ByeReason.INITIALIZER_FAILED:
            self.break_pool(_INIT_FAILED.format(kind="process"))
        if self.broken is not None:
            return
        if not proc.said_hello and not proc.said_bye:
            if self.start_failures.died(failed_start=True, now=time.monotonic()).give_up:
                self.break_pool(f"worker processes keep dying before they start "
                                f"(last ended with {describe_exit(code)})")
                return
        if not self.closing or self.dispatcher.queued:
            self.spawn()

    def handle_lost(self, proc: WorkerProcess, code: int | None, held: list[Task]) -> None:
        """Fail the task a dead worker was running (or retry it), and those it ran
        without reporting; requeue the ones it never began, in their order."""
        how = describe_exit(code)
        plan = plan_loss(held, proc.running_and_done(), lambda _task: self.retries)
        for task in plan.failed_running:
            self.fail(task, WorkerLost(
                f"worker process {proc.pid} died with {how} while running task "
                f"{task.task_id} ({task.label})"))
        for task in plan.failed_unreported:
            self.fail(task, WorkerLost(
                f"worker process {proc.pid} died with {how} before it reported the "
                f"result of task {task.task_id} ({task.label})"))
        # Never started (or retried): they run on another worker, invisibly to the caller.
        self.dispatcher.requeue(plan.requeue)

    def fail(self, task: Task, exc: BaseException) -> None:
        self.sink.fail(task, exc)

    def break_pool(self, message: str) -> None:
        """Fail every pending future; later submits raise the same error."""
        if self.broken is not None:
            return
        self.broken = self.broken_type(message)
        # Thread workers go on and complete the futures of the tasks they hold, as
        # the stdlib's threads finish their work items when its pool breaks: only
        # what waits for a worker fails.
        self.fail_pending(message, held=self.processes)

    def fail_pending(self, message: str, held: bool = True) -> None:
        """Fail queued tasks, and with ``held`` the tasks workers hold."""
        while self.inbox:
            self.fail(self.inbox.popleft(), self.broken_type(message))
        for client in list(self.dispatcher.queues):
            for task in self.dispatcher.drop_client(client):
                self.fail(task, self.broken_type(message))
        if held:
            for worker_id in list(self.dispatcher.workers):
                for task in self.dispatcher.remove_worker(worker_id):
                    self.fail(task, self.broken_type(message))

    def cleanup(self) -> None:
        """Stop workers in order: ask, wait, terminate, kill; then free sockets."""
        self.closing = True
        self.deliver()  # results taken in a round that failed half-way
        self.stop_threads.set()
        for worker_id in list(self.dispatcher.workers):
            try:
                self.router.send_multipart([worker_id, *protocol.encode(Kind.BYE, [ByeReason.SHUTDOWN])])
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in list(self.procs.values()):
            if not proc.said_hello or proc.reap(max(0.0, deadline - time.monotonic())) is None:
                proc.control.close()  # the child exits when it sees EOF here
                proc.stop(time.monotonic() + 1.0)
            proc.close()
        self.procs.clear()
        for thread in list(self.threads.values()):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        # Anything still pending now can never complete: say so rather than hang.
        self.fail_pending("the pool was shut down before this task could run")
        self.router.close(0)
        self.ctx.term()
        self.wakeup.close()
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        exit_hooks.unregister(self)

