"""``tcp://`` and ``ipc://``: tasks run on ``farpool worker`` daemons behind a scheduler.

One I/O thread owns a DEALER socket to the scheduler (CURVE on tcp). Callers pickle
in their own thread and hand tasks over through an inbox::

    submit() --> inbox --> I/O thread --TASKS--> scheduler --> worker processes
    Future   <-- set_result <--RESULTS--

The client keeps every task until its result arrives, so a scheduler that restarts
loses nothing: when the scheduler answers a new HELLO, every unfinished task is sent
again. A scheduler silent for longer than ``reconnect_timeout`` (after the heartbeat
says it is gone) fails the pending futures with ``SchedulerLost``: never a hang.

Futures stay pending until their result arrives (the client cannot see when a
remote worker starts a task), so ``Future.cancel()`` succeeds on any unfinished
task: the scheduler drops it if still queued; a worker already holding it runs it
and the result is thrown away (``Executor.stop`` stops it: the scheduler has its
worker host interrupt it). ``shutdown(cancel_futures=True)`` asks the scheduler which
tasks are still queued and cancels exactly those, as the stdlib does.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import signal
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import BrokenExecutor, Future
from typing import Any

import zmq

from .. import exit_hooks, protocol, serialize
from ..addresses import check_address
from ..call_packing import CallPacker
from ..dispatch import task_label
from ..errors import (
    InitializerFailed,
    ProcessPoolBroken,
    ProtocolError,
    SchedulerLost,
    SecurityError,
    VersionMismatch,
)
from ..futures import new_future
from ..io_thread import IOThread
from ..key_policy import KEY_REFUSAL
from ..liveness import ReconnectWindow, heartbeat_limit, silent_too_long
from ..protocol import ByeReason, Kind, PeerRole, Status
from ..task_control import INTERRUPT_GRACE, TaskOptions
from .options import check_initializer, check_max_workers, check_retries
from .remote_connect import LIVENESS, connect, default_name
from .remote_outcomes import settle

log = logging.getLogger("farpool.remote")

DEFAULT_HEARTBEAT = 1.0

MAX_BATCH = 1000  # tasks per TASKS message


class _Pending:
    __slots__ = ("task_id", "fn_key", "fn_blob", "frames", "future", "label", "options")

    def __init__(self, task_id: int, fn_key: bytes, fn_blob: bytes, frames: list[Any],
                 future: Future, label: str) -> None:
        self.task_id = task_id
        self.fn_key = fn_key
        self.fn_blob = fn_blob
        self.frames = frames
        self.future = future
        self.label = label
        self.options: TaskOptions | None = None  # from Executor.options (see scheduler_stops)


class RemoteBackend:
    """The backend for ``tcp://HOST:PORT`` and ``ipc:///PATH`` scheduler addresses.

    Options: ``retries`` (rerun a task whose worker died, up to N times),
    ``key_file`` (cluster key file; default ``$FARPOOL_KEY`` or this host's keys),
    ``insecure`` (tcp without CURVE, to a scheduler started with ``--insecure``),
    ``heartbeat`` (seconds), ``connect_timeout`` and ``reconnect_timeout`` (seconds).
    ``name``: how the scheduler's log and `farpool status` name this client (default:
    the script's name, host and pid).
    ``ship_modules``: the script's local modules travel to the workers (True, the
    default, finds them; False sends none; a list of modules or names adds those; see
    ``farpool.code_bundle``). ``max_workers`` is accepted for compatibility: the
    workers are the daemons'.
    """

    chunks = True
    # Time limits and stops are kept by the scheduler, carried out by the worker hosts.
    task_options = frozenset(("timeout", "retries", "grace", "priority"))

    def __init__(self, address: str, *, max_workers: int | None = None, initializer: Any = None,
                 initargs: tuple[Any, ...] = (), retries: int = 0, key_file: Any = None,
                 insecure: bool = False, heartbeat: float = DEFAULT_HEARTBEAT,
                 connect_timeout: float = 10.0, reconnect_timeout: float = 10.0,
                 max_tasks_per_child: int | None = None, mp_context: Any = None,
                 ship_modules: Any = True, name: str | None = None) -> None:
        check_max_workers(max_workers, None)
        if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 200):
            raise ValueError(f"name must be a string of 1 to 200 characters, not {name!r:.80}")
        if max_tasks_per_child is not None:
            raise ValueError("max_tasks_per_child is set on the worker daemons: "
                             "`farpool worker ADDRESS --max-tasks-per-child N`")
        check_initializer(initializer)
        check_retries(retries)
        for option, value in (("heartbeat", heartbeat), ("connect_timeout", connect_timeout),
                              ("reconnect_timeout", reconnect_timeout)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{option} must be a positive number of seconds, not {value!r}")
        check_address(address)
        curve = None
        if address.startswith("tcp://"):
            if insecure:
                log.warning("connecting to %s without CURVE (insecure): results are unauthenticated "
                            "pickles", address)
            else:
                from ..security import client_keys

                curve = client_keys(key_file)

        self._chunked = address.startswith("tcp://")  # see serialize: pays off when encrypted
        self._ids = itertools.count(1)
        # Each function blob carries the initializer, the main script and the local
        # modules, which the shared workers keep apart per client (see code_bundle).
        self._packer = CallPacker(initializer, tuple(initargs), ship_modules=ship_modules)
        self._io = _RemoteIO(address, curve=curve, retries=retries, heartbeat=float(heartbeat),
                             reconnect_timeout=float(reconnect_timeout),
                             name=name or default_name())
        self._io.start(float(connect_timeout))
        self._finalizer = weakref.finalize(self, _RemoteIO.request_close, self._io, False)

    @property
    def broken(self) -> BaseException | None:
        return self._io.broken

    @property
    def broken_type(self) -> type[BrokenExecutor]:
        broken = self._io.broken
        return type(broken) if isinstance(broken, BrokenExecutor) else SchedulerLost

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               options: TaskOptions | None = None) -> Future:
        future: Future = new_future()
        pending = self._make(fn, args, kwargs, future, None)
        if pending is not None:
            pending.options = options
            self._io.post([pending])
        return future

    def stop(self, future: Future, grace: float) -> bool:
        """Ask the scheduler to stop ``future``'s task: a queued one is cancelled, a
        running one interrupted by its worker host, killed after ``grace``."""
        if future.done():
            return False
        self._io.stops.append((future, grace))
        self._io.wake()
        return True

    def interrupt(self) -> None:
        """Ctrl-C (see Executor.__exit__): this client's queued tasks are cancelled,
        its running ones stopped by their worker hosts (killed after 1 s)."""
        self._io.interrupt()

    def end_workers(self, signum: int) -> None:
        """terminate_workers / kill_workers on the daemons: this client's tasks only
        (never another client's): queued ones cancelled, running ones stopped at once
        (SIGKILL) or after 1 s (SIGTERM); their futures fail with ProcessPoolBroken."""
        how = "kill_workers" if signum == signal.SIGKILL else "terminate_workers"
        grace = 0.0 if signum == signal.SIGKILL else INTERRUPT_GRACE
        self._io.stop_everything(grace, ended_by=how)

    def submit_many(self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]],
                    options: TaskOptions | None = None) -> list[Future]:
        try:
            fn_pickle: Any = self._pickle(fn)
        except BaseException as exc:  # noqa: BLE001 - each future carries it
            fn_pickle = exc
        futures, batch = [], []
        for args in calls:
            future: Future = new_future()
            pending = self._make(fn, args, {}, future, fn_pickle)
            futures.append(future)
            if pending is not None:
                pending.options = options
                batch.append(pending)
        if batch:
            self._io.post(batch)
        return futures

    def _pickle(self, fn: Any) -> tuple[bytes, bytes]:
        return self._packer.function(fn)

    def _make(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], future: Future,
              fn_pickle: Any) -> _Pending | None:
        broken = self._io.broken
        if broken is not None:
            raise self.broken_type(str(broken))
        try:
            if fn_pickle is None:
                fn_pickle = self._pickle(fn)
            elif isinstance(fn_pickle, BaseException):
                raise fn_pickle
            key, blob = fn_pickle
            frames = self._packer.frames(args, kwargs, chunked=self._chunked)
        except BaseException as exc:  # noqa: BLE001 - the future carries the pickling error
            future.set_exception(exc)
            return None
        return _Pending(next(self._ids), key, blob, frames, future, task_label(fn))

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        self._io.request_close(cancel_futures)
        if wait:
            self._io.join()

    def stats(self) -> dict[str, Any]:
        unfinished = len(self._io.unfinished) + len(self._io.inbox)
        return {"pending": unfinished, "unfinished": unfinished, "connected": self._io.welcomed}


class _RemoteIO(IOThread):
    """The I/O thread's state: the socket, the unfinished tasks, reconnection."""

    thread_name = "farpool-remote-io"

    def __init__(self, address: str, *, curve: Any, retries: int, heartbeat: float,
                 reconnect_timeout: float, name: str) -> None:
        super().__init__()
        self.name = name
        self.inbox: deque[_Pending]
        self.address = address
        self.retries = retries
        self.heartbeat = heartbeat
        self.broken: BaseException | None = None
        self.cancels: deque[int] = deque()
        self.stops: deque[tuple[Future | None, float]] = deque()  # Executor.stop: (future, grace)
        self.ended_by: str | None = None  # terminate_workers or kill_workers, once called
        # Cancelled here, not answered yet: a worker may still run them (a cancel does
        # not stop a running task; Ctrl-C and kill_workers do). Their answers clear them.
        self.cancelled: set[int] = set()
        self.unfinished: dict[int, _Pending] = {}
        self.sent_fns = serialize.SentFunctions()
        self.welcomed = False
        self.ever_welcomed = False
        self.session: str | None = None  # the scheduler's, from its WELCOME
        self.hello_seq = 0
        self.reconnect = ReconnectWindow(reconnect_timeout)
        self.last_heard = time.monotonic()
        self.connect_error: BaseException | None = None
        self.connected = threading.Event()

        self.ctx = zmq.Context()
        self.sock, self.monitor = connect(self.ctx, address, heartbeat, curve)
        from ..security import HandshakeVerdicts

        self.handshakes = HandshakeVerdicts()

    # -- caller side ---------------------------------------------------------------
    def start(self, connect_timeout: float) -> None:
        self.thread.start()
        if not self.connected.wait(connect_timeout):
            self.connect_error = SchedulerLost(
                f"no farpool scheduler answered at {self.address} within {connect_timeout:g} s "
                "(is `farpool scheduler` running there, and the address right?)")
        if self.connect_error is not None:
            self.request_close(True)
            self.join()
            raise self.connect_error
        exit_hooks.register(self)  # let queued work finish at exit

    def post(self, tasks: list[_Pending]) -> None:
        self.refuse_if_closed(task.future for task in tasks)
        for task in tasks:
            task.future.add_done_callback(self._on_done(task.task_id))
        # Send from this thread when the socket is free: one thread hop less on every
        # round trip; otherwise the I/O thread sends it.
        if not self.send_from_caller(self.send_now, tasks):
            self.inbox.extend(tasks)
            self.wake()

    def send_now(self, tasks: list[_Pending]) -> bool:
        """post's send, with ``io_lock``: only when welcomed and nothing waits before."""
        if not self.welcomed or self.broken is not None or self.inbox or self.closing:
            return False
        for task in tasks:
            self.unfinished[task.task_id] = task
        self.send_tasks(tasks)
        return True

    def needs_io_thread(self) -> bool:
        return protocol.readable(self.sock)

    def _on_done(self, task_id: int) -> Callable[[Future], None]:
        def on_done(future: Future) -> None:
            if future.cancelled():
                # Nothing else will move it on: wake wait() and as_completed() now,
                # then let the I/O thread tell the scheduler.
                future.set_running_or_notify_cancel()
                self.cancels.append(task_id)
                self.wake()
        return on_done

    # -- I/O thread ----------------------------------------------------------------
    def run(self) -> None:
        try:
            self.loop()
        except BaseException as exc:  # noqa: BLE001 - never leave a future hanging
            traceback.print_exc()
            with self.io_lock:
                self.break_with(SchedulerLost(f"the farpool I/O thread failed: {exc!r}"))
        finally:
            self.connected.set()
            with self.io_lock:
                self.cleanup()

    def loop(self) -> None:
        # The sockets' own file descriptors, polled by the OS, so that callers may use
        # the socket (under the lock) while this thread sleeps. A ZeroMQ descriptor
        # only says "something changed": ZMQ_EVENTS (protocol.readable) says what.
        poller = select.poll()
        poller.register(int(self.sock.get(zmq.FD)), select.POLLIN)
        poller.register(self.wakeup.fd, select.POLLIN)
        poller.register(int(self.monitor.get(zmq.FD)), select.POLLIN)
        with self.io_lock:
            self.hello()
        next_beat = time.monotonic() + self.heartbeat
        timeout = max(10, int(self.heartbeat * 500))
        while True:
            with self.io_lock:
                if protocol.readable(self.monitor):
                    self.on_monitor()
                self.take_inbox()
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.heartbeat
                    self.tick(now)
                # Last, after every send of this pass: a send may consume the socket's
                # wake-up signal, so check for input before sleeping on it again.
                self.receive()
                if self.connect_error is not None:
                    return
                if self.closing and (self.broken is not None or not self.ever_welcomed
                                     or (not self.inbox and not self.unfinished
                                         and not self.stops)):
                    return
            # Sleep only after a pass that ended by checking for input (see above): the
            # HELLO sent before the first pass may have taken the socket's signal too.
            poller.poll(timeout)

    def tick(self, now: float) -> None:
        """Heartbeats out; notice a silent scheduler; give up after the reconnect window."""
        if self.welcomed:
            if silent_too_long(self.last_heard, now, self.heartbeat, LIVENESS):
                log.warning("the scheduler at %s stopped answering; waiting for it to return",
                            self.address)
                self.welcomed = False
                self.reconnect.lost(now)
            else:
                self.send_control(protocol.encode(Kind.HEARTBEAT))
                return
        if not self.ever_welcomed:
            self.hello()
            return
        if self.reconnect.expired(now):
            silent = self.reconnect.waited(now) + heartbeat_limit(self.heartbeat, LIVENESS)
            self.break_with(SchedulerLost(
                f"the scheduler at {self.address} has not answered for "
                f"{silent:.0f} s; this task may or may not have run"))
        else:
            self.hello()

    def hello(self) -> None:
        self.hello_seq += 1
        info = {"role": PeerRole.CLIENT, "retries": self.retries, "hello": self.hello_seq,
                "pid": os.getpid(), "heartbeat": self.heartbeat, "name": self.name,
                **protocol.version_info()}
        if self.session is not None:  # a scheduler that restarted keeps what it can
            info["session"] = self.session
        self.send_control(protocol.encode(Kind.HELLO, [info]))

    def on_monitor(self) -> None:
        from ..security import handshake_failures

        for why in handshake_failures(self.monitor, self.handshakes):
            if not self.ever_welcomed:
                self.connect_error = SecurityError(f"{self.address}: {why}")
                self.connected.set()
            else:  # our key was revoked while we were away, or the scheduler changed keys
                log.error("the scheduler at %s refused this client on reconnecting: %s",
                          self.address, why)
                self.break_with(SecurityError(f"{self.address}: {why}"))

    def take_inbox(self) -> None:
        self.wakeup.drain()  # before the inbox: see WakePipe.drain
        batch = []
        inbox = self.inbox
        while inbox:
            task = inbox.popleft()
            if task.future.cancelled():
                continue
            if self.broken is not None:
                self.fail(task, SchedulerLost(str(self.broken)))
                continue
            self.unfinished[task.task_id] = task
            batch.append(task)
        if batch and self.welcomed:
            self.send_tasks(batch)
        cancels = []
        while self.cancels:
            pending = self.unfinished.pop(self.cancels.popleft(), None)
            if pending is not None:
                cancels.append(pending.task_id)
                self.cancelled.add(pending.task_id)
        if self.cancel_pending:
            self.cancel_pending = False
            cancels.extend(self.unfinished)
        if cancels and self.welcomed:
            self.send(protocol.encode(Kind.CANCEL, [cancels]))
        if self.stops and self.welcomed:
            self.take_stops()

    def interrupt(self) -> None:
        """Ctrl-C, or the program ending on it (see exit_hooks)."""
        self.stop_everything(INTERRUPT_GRACE, ended_by=None)

    def stop_everything(self, grace: float, ended_by: str | None) -> None:
        """From a caller: cancel the queued tasks, stop the running ones, close."""
        if self.closing and ended_by is not None and self.ended_by is not None:
            return  # a second terminate_workers or kill_workers
        self.ended_by = ended_by
        self.stops.append((None, grace))
        self.request_close(True)

    def take_stops(self) -> None:
        """Send Executor.stop's requests (kept while not connected: sent on WELCOME);
        a future of None: every unfinished task, and the cancelled ones a worker may
        still run."""
        by_grace: dict[float, list[int]] = {}
        while self.stops:
            future, grace = self.stops.popleft()
            ids = by_grace.setdefault(grace, [])
            ids.extend(tid for tid, task in self.unfinished.items()
                       if future is None or task.future is future)
            if future is None:
                ids.extend(self.cancelled)
        for grace, ids in by_grace.items():
            if ids:
                self.send(protocol.encode(Kind.STOP, [ids, grace]))

    def send_tasks(self, tasks: list[_Pending]) -> None:
        needs = self.sent_fns.needs
        for start in range(0, len(tasks), MAX_BATCH):
            self.send(protocol.encode_tasks(tasks[start : start + MAX_BATCH], needs,
                                            with_options=True))

    def send(self, msg: list[Any]) -> None:
        protocol.send_frames(self.sock, msg)

    def send_control(self, msg: list[Any]) -> None:
        """A HELLO or heartbeat, repeated each beat: dropped rather than block, since
        after a failed handshake libzmq has no pipe and a send would wait forever."""
        try:
            protocol.send_frames(self.sock, msg, zmq.NOBLOCK)
        except zmq.Again:
            log.debug("no connection to the scheduler at %s yet", self.address)

    def receive(self) -> None:
        sock = self.sock
        while protocol.readable(sock):
            frames = protocol.recv_frames(sock)
            try:
                msg = protocol.decode(frames)
            except ProtocolError as exc:
                log.warning("dropped a malformed message from the scheduler: %s", exc)
                continue
            self.last_heard = time.monotonic()
            handler = self.handlers.get(msg.kind)
            if handler is not None:
                handler(self, msg)

    def on_refuse(self, msg: protocol.Message) -> None:
        reason = msg.body[0]
        kind = SecurityError if reason.startswith(KEY_REFUSAL) else VersionMismatch
        error = kind(f"the scheduler at {self.address} refused this client: {reason}")
        if not self.ever_welcomed:
            self.connect_error = error
            self.connected.set()
        else:
            self.break_with(SchedulerLost(str(error)))

    def on_bye(self, msg: protocol.Message) -> None:
        # The scheduler does not know us: it restarted, or gave us up for lost.
        if self.welcomed:
            self.welcomed = False
            self.reconnect.lost(time.monotonic())
        self.hello()

    def on_welcome(self, msg: protocol.Message) -> None:
        welcome: protocol.Welcome = msg.body[0]
        if welcome.seq != self.hello_seq or self.welcomed:
            return  # the answer to an older HELLO
        first = not self.ever_welcomed
        self.welcomed = self.ever_welcomed = True
        self.session = welcome.session
        self.reconnect.back()
        self.connected.set()
        # A (new) scheduler session knows none of our functions or tasks.
        self.sent_fns = serialize.SentFunctions()
        self.cancelled.clear()  # their answers would never come
        if not first and self.unfinished:
            log.warning("reconnected to the scheduler at %s; resubmitting %d unfinished task(s)",
                        self.address, len(self.unfinished))
        if self.unfinished:
            self.send_tasks(list(self.unfinished.values()))
        if self.stops:
            self.take_stops()

    def on_results(self, msg: protocol.Message) -> None:
        for entry, payload in protocol.with_frames(msg.body[0], msg.frames):
            task = self.unfinished.pop(entry.task_id, None)
            if task is None:  # cancelled meanwhile, or a duplicate after a resubmission
                self.cancelled.discard(entry.task_id)
                continue
            self.complete(task, entry.status, payload)

    handlers: dict[Kind, Callable[[_RemoteIO, protocol.Message], None]] = {
        Kind.RESULTS: on_results,
        Kind.WELCOME: on_welcome,
        Kind.REFUSE: on_refuse,
        Kind.BYE: on_bye,
    }

    def complete(self, task: _Pending, status: int, payload: list[Any]) -> None:
        if status == Status.STOPPED and self.ended_by is not None:
            # As Python 3.14's terminate_workers: a running task ends the pool's way.
            self.fail(task, ProcessPoolBroken(f"task {task.task_id} ({task.label}) was "
                                              f"running when {self.ended_by}() ended it"))
            return
        exc = settle(task, status, payload)
        if isinstance(exc, InitializerFailed):
            self.break_with(exc)

    def fail(self, task: _Pending, exc: BaseException) -> None:
        future = task.future
        if not future.done() and future.set_running_or_notify_cancel():
            future.set_exception(exc)

    def break_with(self, exc: BaseException) -> None:
        """Nothing more can run: fail every unfinished task with ``exc``'s message."""
        if self.broken is None:
            self.broken = exc
        broken_type = type(exc) if isinstance(exc, BrokenExecutor) else SchedulerLost
        for task in list(self.unfinished.values()):
            self.fail(task, broken_type(str(exc)))
        self.unfinished.clear()
        while self.inbox:
            self.fail(self.inbox.popleft(), broken_type(str(exc)))

    def cleanup(self) -> None:
        self.closing = True
        for task in list(self.unfinished.values()) + list(self.inbox):
            self.fail(task, SchedulerLost("the executor was shut down before this task finished"))
        self.unfinished.clear()
        self.inbox.clear()
        if self.welcomed:
            try:
                self.send(protocol.encode(Kind.BYE, [ByeReason.DONE]))
            except zmq.ZMQError:
                pass
        else:
            self.sock.linger = 0
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close()
        self.ctx.term()
        self.release_thread_state()
