"""The ``processes`` backend: worker processes fed pickled tasks over ``ipc://``.

Data flow (the shared I/O loop is in ``pool.py``)::

    caller thread                    I/O thread                      worker process
    -------------                    ----------                      --------------
    ProcessPool.submit:
      pickle fn (once per fn)
      and args -> Task ----post----> Dispatcher --send_batch-->  WorkerLoop: run
                                       TASKS: fn pickle once per worker
    future.result() <-end_round--- on_results <--RESULTS batch--  fn(*args)
                                   on_death <---pidfd readable--  the process exited
                                     plan_loss: fail, retry or requeue its tasks;
                                     start a new worker (StartFailures may give up)

The socket lives in a private (0700) directory, removed at cleanup. A worker that
dies is seen by its pidfd even when a child it forked keeps its sockets open.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import zmq

from . import protocol, serialize
from .dispatch import Task, WorkerSlot, plan_loss, task_label
from .errors import ProcessPoolBroken, WorkerLost
from .futures import new_future
from .main_script import MainScript, client_script
from .pool import _INIT_FAILED, LocalPool, PoolIO, refuse_after_exit
from .pool_stops import PoolStops
from .protocol import ByeReason, Kind, Status
from .respawn import StartFailures
from .spawn import WorkerProcess, describe_exit, free_rank, pickle_initializer, spawn_worker
from .task_control import TaskOptions, outcome_of, retries_after_loss


class ProcessPool(LocalPool):
    """The caller-side half of ``processes``: pickles each call into a Task."""

    chunks = True
    _io: ProcessPoolIO

    def __init__(self, *, max_workers: int, initializer: Callable[..., Any] | None,
                 initargs: tuple[Any, ...], max_tasks_per_child: int | None = None,
                 retries: int = 0) -> None:
        refuse_after_exit()
        # The workers have the main script as __main__ (see main_script).
        script = client_script()
        self._main = script is not None
        self._pickle_fn = serialize.FunctionPickler(main=self._main)
        self._pickle_lock = threading.Lock()
        super().__init__(ProcessPoolIO(max_workers=max_workers, initializer=initializer,
                                       initargs=initargs, max_tasks=max_tasks_per_child,
                                       retries=retries, main_script=script))

    task_options = frozenset(("timeout", "retries", "grace", "priority"))

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               options: TaskOptions | None = None) -> Future:
        future: Future = new_future()
        task = self._make_task(fn, args, kwargs, future, None)
        if task is not None:
            task.options = options
            self._io.post([task])
        return future

    def stop(self, future: Future, grace: float) -> bool:
        """Cancel ``future``'s task if it is queued; interrupt it if it runs, and kill
        its worker if it still runs after ``grace`` seconds. Whether it was pending."""
        if future.cancel():
            return True
        if future.done():
            return False
        self._io.request_stop(future, grace)
        return True

    def interrupt(self) -> None:
        """Ctrl-C (see Executor.__exit__): cancel what is queued, stop what runs."""
        self._io.interrupt()

    def end_workers(self, signum: int) -> None:
        """Python 3.14's terminate_workers and kill_workers: shut down without waiting,
        cancel what is queued, send ``signum`` to every worker process; what was running
        fails with ProcessPoolBroken (a BrokenProcessPool)."""
        self._io.request_end(signum)

    def submit_many(self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]],
                    options: TaskOptions | None = None) -> list[Future]:
        """Submit ``fn(*args)`` for each args; the function is pickled once."""
        fn_pickle: Any  # the function's frames, or why it did not pickle
        try:
            with self._pickle_lock:
                fn_pickle = self._pickle_fn(fn)
        except BaseException as exc:  # noqa: BLE001 - each future carries it
            fn_pickle = exc
        futures, tasks = [], []
        for args in calls:
            future: Future = new_future()
            task = self._make_task(fn, args, {}, future, fn_pickle)
            futures.append(future)
            if task is not None:
                task.options = options
                tasks.append(task)
        if tasks:
            self._io.post(tasks)
        return futures

    def _make_task(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], future: Future,
                   fn_pickle: Any) -> Task | None:
        """The function's pickle (made once per function) and the arguments' frames;
        None if they fail to pickle (``future`` says why)."""
        self.check_usable()
        task_id = next(self._ids)
        try:
            if fn_pickle is None:
                with self._pickle_lock:
                    fn_pickle = self._pickle_fn(fn)
            elif isinstance(fn_pickle, BaseException):
                raise fn_pickle
            key, blob = fn_pickle
            frames = serialize.dumps_args(args, kwargs, main=self._main)
        except BaseException as exc:  # noqa: BLE001 - the future carries the pickling error
            future.set_exception(exc)
            return None
        return Task(task_id, key, blob, frames, label=task_label(fn), context=future)


class ProcessPoolIO(PoolStops, PoolIO):
    """The I/O thread of a process pool: starts, feeds, reaps and replaces processes."""

    kind = "process"
    broken_type = ProcessPoolBroken
    fail_held_on_break = True

    def __init__(self, *, max_workers: int, initializer: Any, initargs: tuple[Any, ...],
                 max_tasks: int | None, retries: int, main_script: MainScript | None = None) -> None:
        # Before any pipe, socket or thread exists: initargs that do not pickle fail
        # the constructor without leaving anything behind.
        self.init_blob, self.init_fds = pickle_initializer(initializer, initargs,
                                                           main=main_script is not None)
        self.main_script = main_script
        self.runtime_dir = tempfile.mkdtemp(prefix="farpool-")
        try:
            super().__init__(address=f"ipc://{self.runtime_dir}/pool", max_workers=max_workers,
                             max_tasks=max_tasks, retries=retries)
        except BaseException:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            raise
        self.handlers[Kind.RESULTS] = self.on_results
        self.outcomes: list[tuple[Task, protocol.ResultEntry, list[Any]]] = []  # see end_round
        self.sent_fns: dict[bytes, serialize.SentFunctions] = {}
        self.procs: dict[bytes, WorkerProcess] = {}
        self.starting = 0  # worker processes spawned that have not said HELLO yet
        self.start_failures = StartFailures(give_up=True)
        self.end_signal = 0  # terminate_workers / kill_workers asked: the signal to send

    def start_workers(self) -> None:
        for _ in range(self.max_workers):
            self.spawn()

    def spawn(self) -> None:
        worker_id = f"w{next(self.worker_ids)}".encode()
        self.starting += 1
        proc = spawn_worker(worker_id, self.address, self.runtime_dir,
                            max_tasks=self.max_tasks, init_blob=self.init_blob,
                            inherit_fds=self.init_fds, rank=free_rank(self.procs.values()),
                            extra={"main": tuple(self.main_script)} if self.main_script else None)
        self.procs[worker_id] = proc
        self.poller.register(proc.fileno(), zmq.POLLIN)

    def pending_starts(self) -> int:
        return self.starting

    def worker_started(self, worker_id: bytes) -> bool:
        proc = self.procs.get(worker_id)
        if proc is None:
            return False  # not a worker we started
        proc.said_hello = True
        self.starting -= 1
        self.start_failures.started()
        self.sent_fns[worker_id] = serialize.SentFunctions()
        return True

    def send_batch(self, worker: WorkerSlot, batch: list[Task]) -> bool:
        """Each function's pickle goes only the first time this worker sees it."""
        going = []
        for task in batch:
            if self.sink.start(task):
                going.append(task)
            else:
                self.dispatcher.unplace(worker, task)
        if going:
            needs = self.sent_fns[worker.worker_id].needs
            self.send(worker, protocol.encode_tasks(going, needs))
            self.start_clocks(worker)
        return len(going) < len(batch)

    def on_results(self, worker_id: bytes, msg: protocol.Message) -> None:
        finished = self.dispatcher.finished
        control = self.control
        for entry, payload in protocol.with_frames(msg.body[0], msg.frames):
            task = finished(worker_id, entry.task_id, entry.duration)
            if task is None:
                continue
            if control:
                # A result (not an error: that may be our interrupt) that was on the
                # way when the limit ran out stands.
                ran = entry.duration if entry.status == Status.OK else None
                stopped = outcome_of(control.finished(task.task_id), ran)
                if stopped is not None:
                    self.end_stopped(task, stopped)
                    continue
            self.outcomes.append((task, entry, payload))
        self.start_clocks(self.dispatcher.workers.get(worker_id))  # what runs next

    def request_end(self, signum: int) -> None:
        self.end_signal = signum
        self.request_close(True)

    def take_inbox(self, woken: bool = True) -> None:
        super().take_inbox(woken)
        if self.end_signal and self.broken is None:
            how = "terminate_workers" if self.end_signal == signal.SIGTERM else "kill_workers"
            for proc in self.procs.values():
                proc.signal(self.end_signal)
            self.break_pool(f"the pool's workers were ended by {how}()")

    def end_round(self) -> None:
        """Hand finished tasks to the sink last in each round, after sending work out,
        just before the I/O thread waits: a caller woken by its result then finds the
        interpreter free instead of waiting on this thread."""
        if self.outcomes:
            outcomes, self.outcomes = self.outcomes, []
            for task, entry, payload in outcomes:
                self.sink.result(task, entry, payload)

    def on_bye(self, worker_id: bytes, msg: protocol.Message) -> None:
        proc = self.procs.get(worker_id)
        if proc is not None:
            proc.said_bye = msg.body[0]
            if protocol.bye_reason(proc.said_bye) is ByeReason.INITIALIZER_FAILED:
                # The pool breaks once the process has exited (on_death), as the
                # stdlib's does, so what its exit flushes (a multiprocessing Queue fed
                # by a log handler the initializer set up) has arrived when callers
                # see it broken.
                return
        super().on_bye(worker_id, msg)

    def on_fd(self, fd: Any) -> None:
        self.on_death(fd)

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
            self.break_pool(_INIT_FAILED.format(kind=self.kind))
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
        watches = self.control.lost(proc.worker_id) if self.control else {}
        plan = plan_loss(held, proc.running_and_done(),
                         lambda task: retries_after_loss(watches, task, self.retries_for(task)))
        for task in plan.failed_running:
            stopped = outcome_of(watches.get(task.task_id), None, died=True)
            self.sink.fail(task, stopped or WorkerLost(
                f"worker process {proc.pid} died with {how} while running task "
                f"{task.task_id} ({task.label})"))
        for task in plan.failed_unreported:
            self.sink.fail(task, WorkerLost(
                f"worker process {proc.pid} died with {how} before it reported the "
                f"result of task {task.task_id} ({task.label})"))
        # Never started (or retried): they run on another worker, invisibly to the caller.
        self.dispatcher.requeue(plan.requeue)

    def stop_workers(self, deadline: float) -> None:
        """Wait for each to exit after its BYE; then close its control pipe (it exits
        when it sees EOF there), terminate, kill."""
        if self.broken is None and not self.cut_short:
            self.let_initializers_finish(deadline)
        for proc in list(self.procs.values()):
            if not proc.said_hello or proc.reap(max(0.0, deadline - time.monotonic())) is None:
                proc.control.close()
                proc.stop(time.monotonic() + 1.0)
            proc.close()
        self.procs.clear()

    def let_initializers_finish(self, deadline: float) -> None:
        """shutdown(wait=True) lets a worker still in its initializer finish it, as the
        stdlib's does (until ``deadline``): once it says HELLO it is told BYE. Only
        terminate_workers, kill_workers and Ctrl-C cut an initializer short."""
        bye = protocol.encode(Kind.BYE, [ByeReason.SHUTDOWN])
        while any(not p.said_hello and p.proc.poll() is None for p in self.procs.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not self.router.poll(int(min(left, 0.05) * 1000) + 1):
                continue
            while protocol.readable(self.router):
                frames = protocol.recv_frames(self.router)
                proc = self.procs.get(frames[0].bytes)
                if proc is None or proc.said_hello:
                    continue
                try:
                    kind = protocol.decode(frames[1:]).kind
                except protocol.ProtocolError:
                    continue
                if kind is Kind.HELLO:
                    proc.said_hello = True
                    self.send(WorkerSlot(proc.worker_id, 1), bye)

    def release(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
