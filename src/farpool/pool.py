"""What the two local pools share: an I/O thread that feeds workers over one ROUTER.

The process pool (``process_pool.py``) and the thread pool (``thread_pool.py``) differ
in how workers start, how a task travels (pickled, or by reference) and how a worker
ends; everything else is here, once::

    caller threads                  I/O thread (owns the ROUTER)             workers
    --------------                  ----------------------------             -------
    LocalPool.submit: make a Task
      post(): append to inbox  --+
        and wake, or send it     |  take_inbox --> Dispatcher (credit, order)
        itself (dispatch_now) ---+-->          |  dispatch -> send_batch
                                    ROUTER ---------------------------->  DEALER
                                    ROUTER <----------------------------  WorkerLoop
                                      HELLO: add_worker  BYE: requeue
                                      RESULTS (processes): outcomes -> end_round
    future.result() <------------ FutureSink

``io_lock`` is held by whoever works on the ROUTER and the dispatcher: the I/O thread,
except while it waits in poll, when a submitting thread may take it to send a task
itself. A send can take the ROUTER's edge-triggered wake-up signal, so whoever sends
looks for input afterwards (``may_have_input``) and wakes the I/O thread if any waits.

The I/O thread holds no reference to the executor: an executor dropped without
``shutdown`` is shut down (without waiting) by a finalizer, and an exit hook lets
queued work finish before the interpreter exits, as the stdlib does.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from typing import Any, ClassVar

import zmq

from . import exit_hooks, protocol, serialize
from .dispatch import Dispatcher, Task, WorkerSlot
from .errors import unpickling_failed
from .io_thread import IOThread
from .pool_caller import PoolCallerSide
from .protocol import ByeReason, Kind, Status
from .task_control import TaskControl

_INIT_FAILED = "A {kind} initializer failed, the {kind} pool is not usable anymore"
STOP_GRACE_SECONDS = 5.0
log = logging.getLogger("farpool.pool")


class FutureSink:
    """Where a local pool's outcomes go: each task's ``context`` is its Future (or, for
    a thread worker's task once sent, a weak reference to it)."""

    def start(self, task: Task) -> bool:
        future = task.context
        if task.sent:
            # Requeued after its worker died: running already. Setting it running again
            # would make concurrent.futures log "in unexpected state" at CRITICAL.
            return future.running()
        task.sent = True
        return future.set_running_or_notify_cancel()

    def result(self, task: Task, entry: protocol.ResultEntry, payload: list[Any]) -> None:
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
        if type(future) is weakref.ref:  # a thread worker's task: see ThreadPoolIO.send_batch
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
        if future.cancel():
            # As the stdlib's pools do for what they cancel: waiters (wait,
            # as_completed) count a cancelled future done only once notified.
            future.set_running_or_notify_cancel()
            return True
        return future.done()


def refuse_after_exit() -> None:
    """A pool cannot start once the interpreter is exiting (as the stdlib's cannot)."""
    if exit_hooks.exiting():
        raise RuntimeError("cannot start a pool after interpreter shutdown")


class LocalPool:
    """The caller-side half of a local backend (``processes``, ``threads``): it makes
    tasks; ``_io`` runs them. Subclasses say how a call becomes a Task."""

    chunks: ClassVar[bool] = False  # whether map(chunksize>1) batches calls

    def __init__(self, io: PoolIO) -> None:
        self.broken_type = io.broken_type
        self._ids = itertools.count(1)
        self._io = io
        io.start()
        self._finalizer = weakref.finalize(self, PoolIO.request_close, io, False)

    @property
    def broken(self) -> BaseException | None:
        return self._io.broken

    def check_usable(self) -> None:
        """Raise the pool's BrokenExecutor error if it is broken."""
        broken = self._io.broken
        if broken is not None:
            raise self.broken_type(str(broken))

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
        return set()


class PoolIO(PoolCallerSide, IOThread):
    """The I/O thread's state. Only the I/O thread (or a caller holding ``io_lock``)
    touches the ROUTER and the dispatcher; callers reach it through ``inbox`` plus a
    wake-up pipe. Subclasses fill in how workers start, take tasks and end."""

    thread_name = "farpool-io"
    kind: ClassVar[str]  # "process" or "thread", for messages
    broken_type: ClassVar[type[BrokenExecutor]]
    # When the pool breaks, fail the tasks workers hold too (a dead process's tasks
    # can never finish; a thread finishes what it holds, as the stdlib's threads do).
    fail_held_on_break: ClassVar[bool]

    def __init__(self, *, address: str, max_workers: int, max_tasks: int | None,
                 retries: int) -> None:
        super().__init__()
        self.inbox: deque[Task]
        self.max_workers = max_workers
        self.max_tasks = max_tasks
        self.retries = retries
        self.broken: BaseException | None = None
        self.sink = FutureSink()

        self.dispatcher = Dispatcher()
        self.worker_ids = itertools.count()
        # Finished tasks reported beside the ROUTER, (worker id, result entries): thread
        # workers append here instead of sending a message (see ThreadPoolIO.thread_done).
        self.freed: deque[tuple[bytes, list[list[Any]], float]] = deque()
        self.deferred: deque[tuple[bytes, protocol.Message]] = deque()  # see receive
        # Time limits and stops (task_control): what the loop's timer looks at.
        self.control = TaskControl()
        self.timers_changed = False  # see needs_io_thread
        self.cut_short = False  # Ctrl-C: workers still starting are not waited for
        self.stop_requests: deque[tuple[Any, float]] = deque()  # (future, grace) from stop()
        self.handlers: dict[Kind, Callable[[bytes, protocol.Message], None]] = {
            Kind.HELLO: self.on_hello,
            Kind.BYE: self.on_bye,
        }

        self.address = address
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.router_mandatory = True  # a send to a worker gone raises: see send
        self.router.bind(address)
        self.router_fd = int(self.router.get(zmq.FD))
        self.started = threading.Event()

    # -- what a kind of pool fills in ------------------------------------------------
    def start_workers(self) -> None:
        """In the I/O thread, before its loop: start the workers it starts up front."""

    def on_fd(self, fd: Any) -> None:
        """A descriptor the I/O thread polls besides the ROUTER and the wake pipe."""

    def worker_started(self, worker_id: bytes) -> bool:
        """A HELLO from ``worker_id``: count it; False if it is not a worker of ours."""
        raise NotImplementedError

    def send_batch(self, worker: WorkerSlot, batch: list[Task]) -> bool:
        """Send ``worker`` the tasks the dispatcher gave it; True if some were cancelled
        meanwhile and taken back (their place on the worker is free again)."""
        raise NotImplementedError

    def pending_starts(self) -> int:
        """Workers started that have not said HELLO yet."""
        raise NotImplementedError

    def end_round(self) -> None:
        """Last in each round of the I/O loop, just before it waits."""

    def act_on_timers(self, now: float) -> None:
        """The control's stops that are due (a time limit ran out, a grace is over)."""

    def take_stop_requests(self) -> None:
        """``stop(future)`` requests from callers (``stop_requests``)."""
        while self.stop_requests:
            self.stop_requests.popleft()  # a kind of pool that cannot stop tasks

    def stop_workers(self, deadline: float) -> None:
        """In cleanup, after every worker was told BYE: wait for them until ``deadline``,
        then end whatever is left."""

    def release(self) -> None:
        """In cleanup, last: free what the kind of pool holds beside the sockets."""

    # -- I/O thread ----------------------------------------------------------------
    def run(self) -> None:
        self.io_lock.acquire()
        try:
            self.poller = zmq.Poller()
            # The router's FD, not the router: other threads may use the socket while
            # this one waits (under io_lock), so the wait must not touch it.
            self.poller.register(self.router_fd, zmq.POLLIN)
            self.poller.register(self.wakeup.fd, zmq.POLLIN)
            self.start_workers()
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
        control = self.control
        clock = time.monotonic
        while True:
            timeout: int | None = 100 if self.closing else None
            self.timers_changed = False
            if control:  # a time limit or a grace runs: wake up when it is over
                due = control.next_due()
                if due is not None:
                    wait_ms = int(max(0.0, due - clock()) * 1000) + 1
                    timeout = wait_ms if timeout is None else min(timeout, wait_ms)
            lock.release()
            try:
                events = poll(timeout)
            finally:
                lock.acquire()
            if control:
                self.act_on_timers(clock())
            woken = False
            for what, _ in events:
                if what == router_fd:
                    continue
                if what == wake_r:
                    woken = True
                    continue
                self.on_fd(what)
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
            self.end_round()
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
                self.sink.fail(task, self.broken_type(str(self.broken)))
            else:
                submit(task)
        if self.stop_requests:
            self.take_stop_requests()
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
        self.dispatcher.cancel_for_shutdown(self.pending_starts(), self.sink.cancel)

    def finished(self) -> bool:
        if self.broken is not None:
            return True
        return not self.inbox and self.dispatcher.idle()

    def receive(self, caller: bool = False) -> None:
        """Handle what the workers sent. A submitting thread (``caller``) handles only
        HELLOs, which complete no future; anything else it leaves in ``deferred``
        for the I/O thread."""
        router = self.router
        readable = protocol.readable
        deferred = self.deferred
        freed = self.freed
        handlers = self.handlers
        if freed:
            self.take_freed()
        while deferred and not caller:
            worker_id, msg = deferred.popleft()
            handlers[msg.kind](worker_id, msg)
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
            handler = handlers.get(msg.kind)
            if handler is None:
                continue
            if caller and msg.kind is not Kind.HELLO:
                deferred.append((worker_id, msg))
                continue
            handler(worker_id, msg)

    def take_freed(self) -> None:
        freed = self.freed
        finished = self.dispatcher.finished
        while freed:
            worker_id, entries, at = freed.popleft()
            for entry in entries:
                finished(worker_id, entry[0], entry[3], at)

    def on_hello(self, worker_id: bytes, msg: protocol.Message) -> None:
        hello: protocol.Hello = msg.body[0]
        if not self.worker_started(worker_id):
            return
        self.dispatcher.add_worker(worker_id, hello.slots, max_tasks=self.max_tasks,
                                   info=hello.info)

    def on_bye(self, worker_id: bytes, msg: protocol.Message) -> None:
        if protocol.bye_reason(msg.body[0]) is ByeReason.INITIALIZER_FAILED:
            self.break_pool(_INIT_FAILED.format(kind=self.kind))
            return
        # A retiring worker answered everything before its BYE: what it still held
        # (prefetched) never started, and goes back to the head, in order.
        self.dispatcher.requeue(self.dispatcher.remove_worker(worker_id))
        self.control.lost(worker_id)  # nor is any of it being timed or stopped

    def dispatch(self) -> None:
        # Tasks cancelled while queued are taken back as they go out, and their place
        # on the worker with them: hand out again until a round sends all it assigns
        # (each round drops at least one cancelled task, so this ends). Else a task
        # behind a cancelled one waits, a worker idle, until something else happens.
        again = True
        while again and self.dispatcher.queued:
            again = False
            for worker, batch in self.dispatcher.assign():
                again = self.send_batch(worker, batch) or again

    def send(self, worker: WorkerSlot, msg: list[Any]) -> None:
        try:
            protocol.send_routed(self.router, worker.worker_id, msg)
        except zmq.ZMQError as exc:  # the peer is gone: its death notice follows
            # An ordinary heal, not news: the worker's death fails or requeues its tasks.
            log.debug("could not send to worker %r: %s", worker.worker_id, exc)

    def break_pool(self, message: str) -> None:
        """Fail every pending future; later submits raise the same error."""
        if self.broken is not None:
            return
        self.broken = self.broken_type(message)
        self.fail_pending(message, held=self.fail_held_on_break)

    def fail_pending(self, message: str, held: bool = True) -> None:
        """Fail queued tasks, and with ``held`` the tasks workers hold."""
        while self.inbox:
            self.sink.fail(self.inbox.popleft(), self.broken_type(message))
        for task in self.dispatcher.take_all(held):
            self.sink.fail(task, self.broken_type(message))

    def cleanup(self) -> None:
        """Stop workers in order: ask, wait, then end them; then free sockets."""
        self.closing = True
        self.end_round()  # results taken in a round that failed half-way
        for worker_id in list(self.dispatcher.workers):
            try:
                self.router.send_multipart([worker_id, *protocol.encode(Kind.BYE, [ByeReason.SHUTDOWN])])
            except zmq.ZMQError:
                pass
        self.stop_workers(time.monotonic() + STOP_GRACE_SECONDS)
        # Anything still pending now can never complete: say so rather than hang.
        self.fail_pending("the pool was shut down before this task could run")
        self.router.close(0)
        self.ctx.term()
        self.release()
        self.release_thread_state()

