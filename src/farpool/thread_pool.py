"""The ``threads`` backend: worker threads that take calls by reference over ``inproc://``.

Data flow (the shared I/O loop is in ``pool.py``)::

    caller thread                          worker thread (WorkerLoop, one_frame)
    -------------                          -------------------------------------
    ThreadPool.submit: Task(fn, args) by reference
      run_now: an idle worker and nothing queued:
        send TASKS (task ids only) ------------------->  take the call from
        from the caller, under io_lock                   shared_calls, run it,
      else add_threads (start one if none idle)          complete the future itself
        and post -> I/O thread -> send_batch            |
    future.result() <-----------------------------------+
                                            thread_done: append to ``freed`` (no
                                            message, no wake-up), unless work waits:
    the next submit or the I/O thread  <--  then dispatch it, or wake the I/O thread
    reads ``freed``: the worker is free

Threads start in the submitting thread, as the stdlib's do: one per submit that finds
no idle worker, up to max_workers. A thread never dies under a task, so nothing is
requeued; when the pool breaks, threads finish the tasks they hold.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import zmq

from . import protocol
from .dispatch import Task, WorkerSlot, task_label
from .errors import ThreadPoolBroken
from .futures import new_future
from .initializer import run_initializer
from .pool import LocalPool, PoolIO, refuse_after_exit
from .protocol import ByeReason, Kind
from .worker_identity import WorkerInfo, set_thread_worker
from .worker_loop import SharedCalls, WorkerLoop, hello

_TASKS = Kind.TASKS  # a module global: cheaper to read than the enum's attribute
# A thread task's call travels by reference, never as frames: every task shares this
# one (never mutated) empty list instead of carrying its own, 72 bytes per task.
_NO_FRAMES: list[Any] = []


class ThreadPool(LocalPool):
    """The caller-side half of ``threads``: a Task carries the call itself."""

    _io: ThreadPoolIO

    def __init__(self, *, max_workers: int, initializer: Callable[..., Any] | None,
                 initargs: tuple[Any, ...], thread_name_prefix: str = "") -> None:
        refuse_after_exit()
        super().__init__(ThreadPoolIO(max_workers=max_workers, initializer=initializer,
                                      initargs=initargs, thread_name_prefix=thread_name_prefix))

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future:
        future: Future = new_future()
        task = self._make_task(fn, args, kwargs, future)
        io = self._io
        if not io.run_now(task):
            io.add_threads(1)
            io.post([task])
        return future

    def submit_many(self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]]) -> list[Future]:
        """Submit ``fn(*args)`` for each args."""
        futures, tasks = [], []
        for args in calls:
            future: Future = new_future()
            tasks.append(self._make_task(fn, args, {}, future))
            futures.append(future)
        if tasks:
            self._io.add_threads(len(tasks))
            self._io.post(tasks)
        return futures

    def _make_task(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   future: Future) -> Task:
        """Threads share memory: the call rides in fn_blob, never pickled. The function's
        identity is its key, so the dispatcher times each function on its own."""
        self.check_usable()
        return Task(next(self._ids), id(fn).to_bytes(8, "little"), (fn, args, kwargs), _NO_FRAMES,
                    b"", task_label(fn), 0, False, future)

    def worker_threads(self) -> set[threading.Thread]:
        return set(self._io.threads.values())


class ThreadPoolIO(PoolIO):
    """The I/O thread of a thread pool, and the shortcuts its callers and workers take
    around it: ``run_now`` (submit) and ``thread_done`` (a worker that finished)."""

    kind = "thread"
    broken_type = ThreadPoolBroken
    fail_held_on_break = False

    def __init__(self, *, max_workers: int, initializer: Any, initargs: tuple[Any, ...],
                 thread_name_prefix: str) -> None:
        super().__init__(address=f"inproc://farpool-{id(self):x}", max_workers=max_workers,
                         max_tasks=None, retries=0)
        self.initializer = initializer
        self.initargs = initargs
        self.thread_name_prefix = thread_name_prefix or f"FarpoolThread-{id(self):x}"
        self.threads: dict[bytes, threading.Thread] = {}
        self.hellos = 0  # thread workers that have said HELLO
        # ``idle`` counts idle workers as tokens: a worker that finishes its tasks
        # appends one, a submit takes one (deque appends and pops are atomic: a
        # semaphore without the cost of threading.Semaphore's Python-level locking).
        # ``grow_lock`` guards ``threads``.
        self.idle: deque[None] = deque()
        self.grow_lock = threading.Lock()
        self.shared_calls: dict[int, Any] = {}
        self.stop_threads = threading.Event()

    # -- caller side ---------------------------------------------------------------
    def run_now(self, task: Task) -> bool:
        """Submit, when a worker is idle and nothing is queued: send ``task`` to it
        from the submitting thread, and take the idle token as add_threads would.
        False (having changed nothing) in any other case.

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
        if self.send_from_caller(self.place_now, task):
            return True
        idle.append(None)
        return False

    def place_now(self, task: Task) -> bool:
        """run_now's send, with ``io_lock``: whether an idle worker took ``task``."""
        if self.freed:
            self.take_freed()
        # Threads still starting send HELLOs that only the general path reads. (One
        # started meanwhile by another submit may say HELLO as we send: the
        # check-after-send sees it, in may_have_input.)
        worker = (self.dispatcher.place(task) if self.hellos >= len(self.threads)
                  else None)
        if worker is None:
            return False
        self.send_batch(worker, [task])
        return True

    def dispatch_now(self, _: None) -> bool:
        # What the threads reported tells which of them are idle now; a HELLO, that
        # one has started.
        if self.freed:
            self.take_freed()
        if self.hellos < len(self.threads):
            self.receive(caller=True)
        return super().dispatch_now(None)

    def may_have_input(self) -> bool:
        # Threads that have all said HELLO send nothing more until the pool stops
        # them, so the check, a cost on every submit, is skipped for them.
        if self.hellos >= len(self.threads):
            return False
        return protocol.readable(self.router)

    def stats(self) -> dict[str, Any]:
        # Threads report finished tasks lazily (see thread_done): count them first.
        # The I/O thread holds io_lock already (a done-callback it runs may ask).
        if threading.current_thread() is self.thread:
            self.take_freed()
        elif self.io_lock.acquire(timeout=5):
            try:
                self.take_freed()
            finally:
                self.io_lock.release()
        return super().stats()

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

    # -- worker side ---------------------------------------------------------------
    def thread_done(self, worker_id: bytes, entries: list[list[Any]]) -> None:
        """In a thread worker, before it completes the futures of ``entries``.

        Thread workers complete their futures themselves, so what they tell the pool
        is only that they are free again. Sent as a message, it would wake the I/O
        thread after every task to fight the woken caller for the interpreter; so it
        waits in ``freed`` for the pool's next look (the next submit does it first).
        Only when work is queued (or the pool is stopping) is it needed now: then
        the worker does the bookkeeping itself if ``io_lock`` is free, handing
        itself the queued work, and otherwise wakes the I/O thread. (It appends
        before it reads ``queued``: either the pool drains ``freed`` after queuing,
        or the worker sees the queue.)
        """
        # When: the pool reads this later, and the next task began now, not then.
        self.freed.append((worker_id, entries, time.monotonic()))
        self.idle.append(None)
        if not (self.dispatcher.queued or self.closing or self.inbox):
            return
        if not self.send_from_caller(self.serve_queue, None):
            self.wake()  # the lock's holder may have passed its last look at freed

    def serve_queue(self, _: None) -> bool:
        """thread_done's bookkeeping, with ``io_lock``: the finished tasks, then the
        queued ones to idle workers."""
        self.take_freed()
        if self.dispatcher.queued and self.broken is None and not self.closing:
            self.dispatch()
        return True

    def thread_worker(self, worker_id: bytes, rank: int) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = worker_id
        sock.connect(self.address)
        set_thread_worker(WorkerInfo(worker_id.decode(), socket.gethostname(), os.getpid(), rank))
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
            set_thread_worker(None)
            sock.close()

    # -- I/O thread ----------------------------------------------------------------
    def worker_started(self, worker_id: bytes) -> bool:
        self.hellos += 1
        return True

    def pending_starts(self) -> int:
        return len(self.threads) - self.hellos

    def spawn_thread(self) -> None:
        """Start a thread worker (with ``grow_lock`` held)."""
        worker_id = f"w{next(self.worker_ids)}".encode()
        rank = len(self.threads)  # threads never die: the rank is the thread's number
        name = f"{self.thread_name_prefix}_{rank}"
        thread = threading.Thread(target=self.thread_worker, args=(worker_id, rank), name=name,
                                  daemon=True)
        thread.start()
        self.threads[worker_id] = thread

    def dispatch(self) -> None:
        super().dispatch()
        self.grow_threads()

    def grow_threads(self) -> None:
        """A safety net behind add_threads: tasks queued with every thread busy and
        none starting start one (the idle count add_threads reads, like the stdlib's,
        can over-count: a thread that finished a batch counts once per batch)."""
        dispatcher = self.dispatcher
        if not dispatcher.queued or self.closing:
            return
        with self.grow_lock:
            if (len(self.threads) < self.max_workers
                    and dispatcher.queued > self.pending_starts()
                    and all(w.held for w in dispatcher.workers.values())):
                self.spawn_thread()

    def send_batch(self, worker: WorkerSlot, batch: list[Task]) -> bool:
        """The calls wait in ``shared_calls`` and the message names them by task id,
        in one frame (see WorkerLoop's one_frame)."""
        entries: list[list[Any]] = []
        calls = self.shared_calls
        sent = []
        for task in batch:
            future = task.context
            # A thread worker never dies under a task: nothing is ever requeued
            # running, so unlike FutureSink.start there is no running state to allow.
            if not future.set_running_or_notify_cancel():
                self.dispatcher.unplace(worker, task)
                # Count the worker idle again, as a stdlib thread does after a
                # cancelled work item: else a thread started for it never would be.
                self.idle.append(None)
                continue
            calls[task.task_id] = (*task.fn_blob, future)
            entries.append([task.task_id, b"-", 0, 0])
            sent.append(task)
        if not entries:
            return True
        self.send(worker, protocol.encode(_TASKS, [entries]))
        # After the send, while the worker wakes up: the worker holds the future now,
        # until it has completed it; the task only needs it to fail it should the
        # pool stop first. Held weakly, a result the caller has dropped is freed at
        # once, whenever the pool next looks at what its threads finished.
        for task in sent:
            task.fn_blob = None
            task.context = weakref.ref(task.context)
        return len(sent) < len(batch)

    def cleanup(self) -> None:
        self.stop_threads.set()
        super().cleanup()

    def stop_workers(self, deadline: float) -> None:
        for thread in list(self.threads.values()):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
