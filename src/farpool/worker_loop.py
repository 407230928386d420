"""The worker loop: receive tasks, run them, reply, in order. The same loop serves a
thread of this interpreter, a local worker process and a worker daemon's processes;
only the ``Calls`` object differs:

- ``PickledCalls``: tasks and results travel as pickles (processes, daemons);
- ``SharedCalls``: thread workers share the client's memory, so tasks come by
  reference and the worker completes the future itself (stdlib thread semantics).

Results of short tasks are sent in batches (at most ``HOLD_SECONDS`` late); a result
never waits behind a task that runs longer than that.

A worker process is started by ``spawn.spawn_worker`` (see ``boot``; ``python
-m farpool.worker_loop`` works too) with its configuration pickled on stdin, and a control
socket inherited from its parent: when the parent dies the socket closes and the
worker exits, even in the middle of a task.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from importlib.machinery import ModuleSpec, SourceFileLoader
from typing import Any

import zmq

from . import protocol, serialize
from ._errors import TaskInterrupted
from .initializer import run_initializer
from .protocol import Kind, Status, TaskEntry

# Batching of results (see WorkerLoop): how long and how many results may wait, and
# how short a task must have been for a result to wait for the next one.
HOLD_SECONDS = 0.001
HOLD_COUNT = 64
SHORT_TASK_SECONDS = 0.0002
# How often an idle thread worker checks its pool's stop flag.
IDLE_CHECK_MS = 200
# The state record a local supervisor reads after a crash: (running id, last done id).
STATE = struct.Struct("<QQ")
# After it, written by the supervisor: the id (+1) of the task it is stopping; then it
# sends STOP_SIGNAL, which raises TaskInterrupted in that task (see _stop_on_signal).
STOP = struct.Struct("<Q")
STOP_AT = STATE.size
STATE_FILE_SIZE = STATE.size + STOP.size
# A real-time signal, not SIGUSR1: tasks and tools (faulthandler) use that one.
STOP_SIGNAL = signal.SIGRTMIN + 2
_NO_NAMESPACE = contextlib.nullcontext()
# Module globals: cheaper to read than the enums' attributes, once per task.
_TASKS = Kind.TASKS
_OK = int(Status.OK)


class PickledCalls:
    """Tasks as pickles in, results as pickles out."""

    def __init__(self, *, chunked: bool = False, state: mmap.mmap | None = None) -> None:
        self.fns = serialize.FunctionCache()
        self.chunked = chunked  # large results in chunks (a daemon's worker: see serialize)
        self.state = state  # the state record, where a stop request is written
        self.running = 0  # the id (+1) of the task inside fn now: a stop may interrupt it

    def receive(self, entry: TaskEntry, frames: list[Any]) -> Any:
        # Cache operations happen in arrival order: the sender mirrors them.
        if entry.fn_frames:
            self.fns.put(entry.fn_key, frames[0])
            frames = frames[1:]
        try:
            fn: Any = self.fns.get(entry.fn_key)
        except KeyError:
            fn = LookupError(f"function {entry.fn_key.hex()} was never sent to this worker")
        except BaseException as exc:  # noqa: BLE001 - the function failed to unpickle
            fn = exc
        return fn, frames

    def run(self, entry: TaskEntry, item: Any) -> tuple[int, list[Any]]:
        fn, frames = item
        del item  # the arguments' frames are freed as soon as they are loaded
        # A client's shipped code (a daemon's worker): its namespace is in sys.modules
        # while its arguments load, it runs and its result pickles (see code_bundle).
        namespace: Any = _NO_NAMESPACE
        bundles = sys.modules.get("farpool.code_bundle")
        if bundles is not None and type(fn) is bundles.InNamespace:
            namespace, fn = fn.namespace, fn.fn
        with namespace:
            try:
                if isinstance(fn, BaseException):
                    raise fn
                args, kwargs = serialize.loads(frames)
            except BaseException as exc:  # noqa: BLE001 - this task fails, the worker goes on
                from .errors import unpickling_failed  # here: start-up time (see _errors)

                what = f"the function or arguments of task {entry.task_id}"
                return Status.ERROR, serialize.dump_exception(unpickling_failed(what, exc))
            try:
                del frames
                self.running = running = entry.task_id + 1
                state = self.state
                if state is not None and STOP.unpack_from(state, STOP_AT)[0] == running:
                    raise TaskInterrupted("stopped before it began")
                result = fn(*args, **kwargs)
                self.running = 0
                del args, kwargs
            except BaseException as exc:  # noqa: BLE001 - every task error goes back
                self.running = 0
                return Status.ERROR, serialize.dump_exception(exc)
            try:
                return Status.OK, serialize.dumps(result, chunked=self.chunked)
            except BaseException as exc:  # noqa: BLE001 - an unpicklable result
                return Status.ERROR, serialize.dump_exception(exc)


class SharedCalls:
    """Thread workers: the I/O thread parks each call in ``table``; the worker takes
    it by task id, runs it and completes its future here, in the worker thread
    (``finish``, called by the loop once the pool has been told this worker is free,
    so a caller woken by the result finds it idle for its next task)."""

    completes_futures = True  # results sent back are only bookkeeping

    def __init__(self, table: dict[int, Any],
                 report: Callable[[list[list[Any]]], None] | None = None) -> None:
        self.table = table
        # The bookkeeping goes to the pool by this call, not over the socket: a message
        # would wake the pool's I/O thread on every task for nothing (see thread_pool.py).
        self.report = report
        self.outcome: tuple[Any, Any, bool] | None = None  # (future, value, raised)

    def receive(self, entry: TaskEntry, frames: list[Any]) -> Any:
        return self.table.pop(entry.task_id)

    def run(self, entry: TaskEntry, item: Any) -> tuple[int, tuple[()]]:
        fn, args, kwargs, future = item
        del item
        try:
            self.outcome = (future, fn(*args, **kwargs), False)
        except BaseException as exc:  # noqa: BLE001
            self.outcome = (future, exc, True)
            del exc
        return _OK, ()

    def finish(self) -> None:
        future, value, raised = self.outcome  # type: ignore[misc]
        self.outcome = None
        try:
            if raised:
                future.set_exception(value)
            else:
                future.set_result(value)
        except InvalidStateError:
            pass  # the pool failed it already: it stopped while the task ran
        del future, value  # no cycle through a traceback


class WorkerLoop:
    """Runs tasks from ``sock`` until told to stop; returns the reason it stopped.

    Results go back in batches while tasks are short: a finished result may wait for
    the next task only if that task's function last ran under SHORT_TASK_SECONDS, for
    at most HOLD_COUNT results. Where results are pickled (a worker process), a
    flusher thread also sends any result held HOLD_SECONDS while a task runs, so a
    task that turns out long never holds back a result that is ready. Thread workers
    complete their futures themselves: what they send back is only bookkeeping.

    The socket is used by one thread at a time: ``lock`` is held by the loop except
    while a task runs or the loop waits for work (with nothing held back). Thread
    workers have no flusher, so they skip it.

    ``one_frame``: every message on ``sock`` is one frame (a thread worker's, from
    its own pool over inproc), so it is received as bytes: cheaper than the
    zmq.Frames a multipart receive needs.
    """

    def __init__(self, sock: zmq.Socket, calls: Any, *, max_tasks: int | None = None,
                 state: mmap.mmap | None = None, stop: threading.Event | None = None,
                 one_frame: bool = False, rejoin: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.rejoin = rejoin  # a daemon's worker: says HELLO to a scheduler that restarted
        self.one_frame = one_frame
        self.stop = stop
        self.calls = calls
        self.max_tasks = max_tasks
        self.state = state
        self.pending: deque[tuple[TaskEntry, Any]] = deque()
        self.out_entries: list[list[Any]] = []
        self.out_frames: list[Any] = []
        self.first_unsent = 0.0
        self.last_seconds: dict[bytes, float] = {}  # per function: how long it last ran
        self.ran = 0
        self.stop_reason = ""
        self.lock = threading.Lock()
        self.bounded = not getattr(calls, "completes_futures", False)
        self.report = getattr(calls, "report", None)  # results go there, not to the socket
        self.armed = threading.Event()
        self.flusher: threading.Thread | None = None
        self.closed = False
        self.timeout_set = False  # whether wait() has set the socket's receive timeout

    def run(self) -> str:
        self.lock.acquire()
        try:
            # After BYE, run nothing more: the sender requeues what we held. So what
            # came in is read before each task (a BYE may have come with the tasks),
            # except by thread workers, which the pool only stops once it is done:
            # they read on when they have nothing left to run.
            check_first = self.bounded
            while not self.stop_reason:
                if self.pending:
                    self.run_one()
                    if check_first and self.pending:
                        self.receive()  # with nothing left to run, wait() reads on
                    continue
                self.flush()
                if not self.wait():
                    return "stopped"
                if check_first:
                    self.receive()
            self.flush()
            return self.stop_reason
        finally:
            self.lock.release()
            self.stop_flusher()

    def wait(self) -> bool:
        """Block until a message comes; False if the pool's stop flag is set first."""
        sock = self.sock
        stop = self.stop
        if stop is not None and not self.timeout_set:
            # Wake up now and then to look at the stop flag: a receive timeout, so
            # a message that comes is taken in the same call that waited for it.
            sock.rcvtimeo = IDLE_CHECK_MS
            self.timeout_set = True
        bounded = self.bounded
        if bounded:
            self.lock.release()  # nothing is held back: the flusher leaves the socket alone
        try:
            while True:
                try:
                    frames = [sock.recv()] if self.one_frame else protocol.recv_frames(sock)
                    break
                except zmq.Again:
                    if stop is not None and stop.is_set():
                        return False
        finally:
            if bounded:
                self.lock.acquire()
        self.handle(frames)
        return True

    def receive(self) -> None:
        """Take every message already waiting, without blocking."""
        sock = self.sock
        readable = protocol.readable
        while not self.stop_reason and readable(sock):
            self.handle([sock.recv()] if self.one_frame else protocol.recv_frames(sock))

    def handle(self, frames: list[Any]) -> None:
        try:
            msg = protocol.decode(frames)
        except protocol.ProtocolError as exc:
            print(f"farpool worker: dropped a malformed message: {exc}", file=sys.stderr)
            return
        handler = self.handlers.get(msg.kind)
        if handler is not None:
            handler(self, msg)

    def on_tasks(self, msg: protocol.Message) -> None:
        receive = self.calls.receive
        pending = self.pending
        for entry, payload in protocol.with_frames(msg.body[0], msg.frames):
            pending.append((entry, receive(entry, payload)))

    def on_cancel(self, msg: protocol.Message) -> None:
        # Tasks handed ahead (prefetch) and not begun: answer them as cancelled.
        # (Duration -1: not a run time the dispatcher should learn from.)
        ids = set(msg.body[0])
        kept: deque[tuple[TaskEntry, Any]] = deque()
        for item in self.pending:
            if item[0].task_id in ids:
                self.out_entries.append([item[0].task_id, int(Status.CANCELLED), 0, -1.0])
            else:
                kept.append(item)
        self.pending = kept

    def on_bye(self, msg: protocol.Message) -> None:
        reason = msg.body[0]
        if reason == protocol.ByeReason.RECONNECT and self.rejoin is not None:
            # A scheduler that does not know us (it restarted, or gave us up for lost).
            # What it handed us ahead, not begun, its clients resubmit: drop it. It knows
            # none of our functions either.
            self.pending.clear()
            self.calls.fns = serialize.FunctionCache()
            self.rejoin()
            return
        self.stop_reason = reason or "asked to stop"

    def on_refuse(self, msg: protocol.Message) -> None:  # a scheduler turned this worker away
        self.stop_reason = f"refused: {msg.body[0]}"

    handlers: dict[Kind, Callable[[WorkerLoop, protocol.Message], None]] = {
        _TASKS: on_tasks,
        Kind.CANCEL: on_cancel,
        Kind.BYE: on_bye,
        Kind.REFUSE: on_refuse,
    }

    def run_one(self) -> None:
        entry, item = self.pending.popleft()
        if self.out_entries:
            if self.may_hold(entry):
                self.arm_flusher()
            else:
                self.flush()
        state = self.state
        if state is not None:
            STATE.pack_into(state, 0, entry.task_id + 1, 0)
        bounded = self.bounded
        if bounded:
            self.lock.release()
        start = time.perf_counter()
        try:
            status, frames = self.calls.run(entry, item)
            del item
        finally:
            end = time.perf_counter()
            if bounded:
                self.lock.acquire()
        seconds = end - start
        if state is not None:
            STATE.pack_into(state, 0, 0, entry.task_id + 1)
        if len(self.last_seconds) >= 4096:
            self.last_seconds.clear()
        self.last_seconds[entry.fn_key] = seconds
        if not self.out_entries:
            self.first_unsent = end
        self.out_entries.append([entry.task_id, int(status), len(frames), seconds])
        self.out_frames.extend(frames)
        self.ran += 1
        if self.max_tasks is not None and self.ran >= self.max_tasks:
            self.stop_reason = "retired"  # max_tasks_per_child reached
        if not bounded:  # the calls complete futures themselves (thread workers)
            if not self.pending:
                self.flush()
            self.calls.finish()

    def may_hold(self, entry: TaskEntry) -> bool:
        """May the results so far wait until ``entry`` has run too?"""
        return (len(self.out_entries) < HOLD_COUNT
                and self.last_seconds.get(entry.fn_key, HOLD_SECONDS) < SHORT_TASK_SECONDS
                and time.perf_counter() - self.first_unsent < HOLD_SECONDS)

    def flush(self) -> None:
        if not self.out_entries:
            return
        report = self.report
        if report is not None:
            entries, self.out_entries, self.out_frames = self.out_entries, [], []
            report(entries)
            return
        msg = protocol.encode(Kind.RESULTS, [self.out_entries], self.out_frames)
        self.out_entries, self.out_frames = [], []
        protocol.send_frames(self.sock, msg)

    # -- the flusher: a bound on how long a result waits behind a task ---------------
    def arm_flusher(self) -> None:
        if not self.bounded:
            return
        if self.flusher is None:
            self.flusher = threading.Thread(target=self._flush_late, name="farpool-flush",
                                            daemon=True)
            self.flusher.start()
        if not self.armed.is_set():
            self.armed.set()

    def _flush_late(self) -> None:
        armed, lock = self.armed, self.lock
        while True:
            armed.wait()
            if self.closed:
                return
            delay = self.first_unsent + HOLD_SECONDS - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            with lock:
                if self.closed:
                    return
                if self.out_entries and time.perf_counter() - self.first_unsent >= HOLD_SECONDS:
                    self.flush()
                if not self.out_entries:
                    armed.clear()

    def stop_flusher(self) -> None:
        self.closed = True
        if self.flusher is not None:
            self.armed.set()
            self.flusher.join(5.0)


def hello(sock: zmq.Socket, info: dict[str, Any]) -> None:
    sock.send_multipart(protocol.encode(Kind.HELLO, [info]))


def _leave_stop_signals_to_the_supervisor(daemon: bool) -> None:
    """SIGINT sent to the whole process group (Ctrl-C in a terminal) does not stop the
    task: the client decides what Ctrl-C stops. A daemon's worker leaves SIGTERM to its
    supervisor too (systemd's KillMode=control-group, scancel), which drains, then ends
    this process through its control socket. A Python handler that does nothing, not
    SIG_IGN: an ignored signal would stay ignored in programs the task starts, and those
    must stay stoppable. Forked children get the defaults back."""

    def carry_on(signum: int, frame: Any) -> None:
        pass

    stops = (signal.SIGTERM, signal.SIGINT) if daemon else (signal.SIGINT,)
    for sig in stops:
        signal.signal(sig, carry_on)

    def defaults_in_child() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    os.register_at_fork(after_in_child=defaults_in_child)


def _stop_on_signal(calls: PickledCalls, state: mmap.mmap) -> None:
    """STOP_SIGNAL raises TaskInterrupted in the running task, if it is the one the
    supervisor is stopping (a signal that comes late finds another task, or none: it
    does nothing). Once per request: the request is cleared as it is acted on."""

    def on_stop(signum: int, frame: Any) -> None:
        running = calls.running
        if running and STOP.unpack_from(state, STOP_AT)[0] == running:
            STOP.pack_into(state, STOP_AT, 0)
            raise TaskInterrupted("farpool is stopping this task (a time limit, or "
                                  "Executor.stop)")

    signal.signal(STOP_SIGNAL, on_stop)


def _watch_parent(control: socket.socket) -> None:
    """Exit the moment the parent's end of the control socket closes."""
    try:
        while control.recv(64):
            pass
    except OSError:
        pass
    os._exit(70)


def boot() -> int:
    """Entry point of a worker process started by ``spawn.spawn_worker``.

    Its command line registered the ``farpool`` package bare, without running
    ``farpool/__init__.py``, which imports the whole client (start-up time). The
    package's own names load on first use, so code in a task that imports farpool
    still gets all of it.
    """
    package = sys.modules["farpool"]
    init = os.path.join(package.__path__[0], "__init__.py")
    loader = SourceFileLoader("farpool", init)
    spec = ModuleSpec("farpool", loader, origin=init, is_package=True)
    spec.submodule_search_locations = package.__path__  # type: ignore[assignment]  # the same list object
    spec.has_location = True
    package.__spec__, package.__file__, package.__loader__ = spec, init, loader
    package.__getattr__ = _load_package  # type: ignore[method-assign]  # PEP 562
    return _process_main()


def _load_package(name: str) -> Any:
    """The bare package lacks ``name``: run the real ``__init__`` into it, once."""
    package = sys.modules["farpool"]
    if name.startswith("__") and name.endswith("__") and name != "__all__":
        raise AttributeError(f"module 'farpool' has no attribute {name!r}")
    vars(package).pop("__getattr__", None)
    spec = package.__spec__
    assert spec is not None and spec.loader is not None  # set by the boot above
    spec.loader.exec_module(package)
    return getattr(package, name)


def _process_main() -> int:
    config = pickle.loads(sys.stdin.buffer.read())
    try:  # what `ps -e`, `top` and `pgrep` show (the command line stays python's)
        with open("/proc/self/comm", "w") as comm:
            comm.write("farpool-worker")
    except OSError:
        pass
    _leave_stop_signals_to_the_supervisor(config.get("stop_signals") == "supervisor")
    package = sys.modules["farpool"]
    if "__version__" not in vars(package) and "version" in config:
        package.__version__ = config["version"]  # type: ignore[attr-defined]  # for HELLO, without loading the package
    for entry in reversed(config["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    control = socket.socket(fileno=config["control_fd"])
    threading.Thread(target=_watch_parent, args=(control,), daemon=True,
                     name="farpool-parent-watch").start()
    state = None
    if config.get("state_path"):
        with open(config["state_path"], "r+b") as f:
            state = mmap.mmap(f.fileno(), STATE_FILE_SIZE)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 2000
    sock.identity = config["worker_id"]
    if config.get("network"):
        _secure_network_socket(sock, config["network"])
    sock.connect(config["address"])
    if "authkey" in config:  # the client's, for its Manager proxies (loaded already)
        import multiprocessing.process

        multiprocessing.process.current_process().authkey = config["authkey"]
    from .worker_identity import WorkerInfo, set_process_worker

    set_process_worker(WorkerInfo(config["worker_id"].decode(errors="replace"),
                                  config.get("host") or socket.gethostname(), os.getpid(),
                                  int(config.get("rank", 0))))
    if config.get("main"):  # before the initializer, which may be the script's
        from .main_script import MainScript, install_local

        install_local(MainScript(*config["main"]))
    try:
        initializer, initargs = pickle.loads(config["initializer"])
    except BaseException:  # noqa: BLE001
        initializer, initargs = _fail_initializer, (traceback.format_exc(),)
    failure = run_initializer(initializer, initargs)
    if failure is not None:
        bye = protocol.bye_text(protocol.ByeReason.INITIALIZER_FAILED, failure)
        sock.send_multipart(protocol.encode(Kind.BYE, [bye]))
        sock.close()
        ctx.term()
        return 3
    info = {"pid": os.getpid(), "slots": 1, **protocol.version_info(), **config.get("hello", {})}
    hello(sock, info)
    network = config.get("network") or {}
    calls = PickledCalls(chunked=bool(network.get("curve")), state=state)
    if state is not None:
        _stop_on_signal(calls, state)
    rejoin = (lambda: hello(sock, info)) if config.get("rejoin") else None
    loop = WorkerLoop(sock, calls, max_tasks=config.get("max_tasks"), state=state, rejoin=rejoin)
    reason = loop.run()
    if reason.startswith("refused"):
        print(f"farpool worker: the scheduler {reason}", file=sys.stderr, flush=True)
        sock.close(0)
        ctx.term()
        return 2
    sock.send_multipart(protocol.encode(Kind.BYE, [reason]))
    sock.close()
    ctx.term()
    return 0


def _secure_network_socket(sock: zmq.Socket, network: dict[str, Any]) -> None:
    """A daemon's worker talks to a scheduler over the network: CURVE keys when the
    supervisor has them, ZMTP heartbeats, and a bound on message size."""
    if network.get("curve"):
        from .security import KeyPair, configure_client

        server_public, public, secret = network["curve"]
        configure_client(sock, KeyPair(public, secret), server_public)
    ms = int(network.get("heartbeat", 1.0) * 1000)
    sock.heartbeat_ivl = ms
    sock.heartbeat_timeout = ms * 5
    sock.maxmsgsize = network.get("max_message_bytes", protocol.DEFAULT_MAX_MESSAGE_BYTES)


def _fail_initializer(tb: str) -> None:
    raise RuntimeError(f"the initializer could not be unpickled in the worker:\n{tb}")


if __name__ == "__main__":
    sys.exit(_process_main())
