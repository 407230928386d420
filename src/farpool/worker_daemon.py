"""The ``farpool worker`` daemon: keeps N worker processes attached to a scheduler.

The supervisor itself runs no tasks. Its worker processes (``python -m
farpool.worker_loop``, the same loop as the local backend's) connect to the scheduler
directly, so a task crosses no extra hop; the supervisor::

    scheduler  <--HELLO, HEARTBEAT, LOST, BYE--  supervisor (this module)
        ^                                            |  spawn, watch (pidfd: process
        +-------TASKS / RESULTS------  worker processes   exit = death), respawn

- tells the scheduler at once when a worker process dies (LOST, with which task it
  was running, read from the worker's state record), and starts another;
- sends heartbeats, so a vanished host is noticed: the scheduler fails or retries
  its tasks;
- says HELLO again when the scheduler restarts (or forgot it), restarting its worker
  processes so they join the new scheduler;
- on ``stop()`` (SIGTERM) drains: the scheduler stops feeding its workers, each
  finishes its running task and hands back what it had not started, then all exit.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import zmq

from . import protocol
from .liveness import silent_too_long
from .protocol import ByeReason, Kind, PeerRole
from .respawn import StartFailures, quick_death
from .scheduler import DEFAULT_HEARTBEAT, DEFAULT_LIVENESS, RECONNECT
from .spawn import WorkerProcess, describe_exit, free_rank, spawn_worker

log = logging.getLogger("farpool.worker")

DEFAULT_GRACE = 30.0  # seconds a draining worker may take to finish its task
_NO_INITIALIZER = cloudpickle.dumps((None, ()))


class RefusedError(Exception):
    """The scheduler refused this host: its key, its key's role, or versions differ."""


class Node:
    """A supervisor of ``nprocs`` worker processes attached to the scheduler at
    ``address``. ``curve`` is ``(server_public, client KeyPair)`` or None (ipc://,
    or --insecure). ``run()`` returns an exit status when stopped or refused."""

    def __init__(self, address: str, *, nprocs: int, max_tasks: int | None = None,
                 name: str | None = None, heartbeat: float = DEFAULT_HEARTBEAT,
                 curve: tuple[bytes, Any] | None = None, grace: float = DEFAULT_GRACE) -> None:
        if nprocs < 1:
            raise ValueError(f"nprocs must be at least 1, not {nprocs}")
        self.address = address
        self.nprocs = nprocs
        self.max_tasks = max_tasks
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.heartbeat = heartbeat
        self.grace = grace
        self.identity = b"s" + secrets.token_hex(6).encode()
        self.procs: dict[bytes, WorkerProcess] = {}
        self.serial = 0
        self.session: str | None = None  # the scheduler session we are welcomed in
        self.welcomed = False
        self.last_heard = time.monotonic()
        self.stop_requested = threading.Event()
        self.stop_at_once = False
        self.drain_started = 0.0
        self.draining_until: float | None = None
        self.start_failures = StartFailures(give_up=False)
        self.respawn_at = 0.0
        self.runtime_dir = tempfile.mkdtemp(prefix="farpool-worker-")
        network: dict[str, Any] = {"heartbeat": heartbeat}
        if curve is not None:
            server_public, pair = curve
            network["curve"] = (server_public, pair.public, pair.secret)
        self.worker_config = {
            "network": network,
            # systemd, Slurm and a terminal's Ctrl-C signal the whole process group: the
            # supervisor drains, so its workers must not die (or raise) of it.
            "stop_signals": "supervisor",
            # A scheduler that restarts takes them back, running tasks and all.
            "rejoin": True,
            "hello": {"role": PeerRole.WORKER, "supervisor": self.identity, "host": self.name},
            "host": self.name,  # for worker_info()
        }

        self.ctx = zmq.Context()
        self.up = self.ctx.socket(zmq.DEALER)
        up = self.up
        up.linger = 1000
        up.identity = self.identity
        up.sndhwm = up.rcvhwm = 0
        up.maxmsgsize = 1024 * 1024  # a supervisor only gets small control messages
        ms = int(heartbeat * 1000)
        up.heartbeat_ivl = ms
        up.heartbeat_timeout = ms * DEFAULT_LIVENESS
        from .security import HandshakeVerdicts, configure_client, watch_handshakes

        if curve is not None:
            configure_client(up, curve[1], curve[0])
        self.monitor = watch_handshakes(up)
        self.handshakes = HandshakeVerdicts()
        up.connect(address)
        self.poller = zmq.Poller()
        self.poller.register(up, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

    def stop(self) -> None:
        """Drain and exit (safe from a signal handler or another thread)."""
        self.stop_requested.set()

    def stop_now(self) -> None:
        """Stop the worker processes and exit, drained or not (a second SIGTERM)."""
        self.stop_at_once = True
        self.stop_requested.set()

    # -- main loop -----------------------------------------------------------------
    def run(self) -> int:
        try:
            return self._run()
        except RefusedError as exc:
            log.error("the scheduler at %s refused this worker host: %s", self.address, exc)
            return 2
        finally:
            self.close()

    def _run(self) -> int:
        self.hello()
        next_beat = time.monotonic() + self.heartbeat
        waiting_logged = False
        while True:
            for what, _ in self.poller.poll(100):
                if what is self.up:
                    self.receive()
                elif what is self.monitor:
                    self.on_monitor()
                else:
                    self.on_death(what)
            now = time.monotonic()
            if self.stop_requested.is_set() and self.draining_until is None:
                self.start_draining(now)
            if self.stop_at_once and self.draining_until is not None:
                self.draining_until = now
            if self.draining_until is not None:
                if self.welcomed and silent_too_long(self.last_heard, now, self.heartbeat, DEFAULT_LIVENESS):
                    # The scheduler is gone: nobody would take back our tasks or results.
                    log.warning("the scheduler at %s stopped answering; stopping now", self.address)
                    self.welcomed = False
                    self.draining_until = now
                if not self.procs or now >= self.draining_until:
                    self.finish_draining()
                    return 0
                if self.welcomed and now >= next_beat:
                    # A silent host is a lost one: its running tasks would fail.
                    next_beat = now + self.heartbeat
                    self.send(Kind.HEARTBEAT)
                continue
            if self.welcomed and silent_too_long(self.last_heard, now, self.heartbeat, DEFAULT_LIVENESS):
                log.warning("the scheduler at %s stopped answering; waiting for it to come back",
                            self.address)
                self.welcomed = False
            if now >= next_beat:
                next_beat = now + self.heartbeat
                if self.welcomed:
                    self.send(Kind.HEARTBEAT)
                else:
                    if not waiting_logged and self.session is None:
                        log.warning("waiting for the scheduler at %s", self.address)
                        waiting_logged = True
                    self.hello()
            if self.welcomed and len(self.procs) < self.nprocs and now >= self.respawn_at:
                self.spawn()

    def hello(self) -> None:
        info = {"role": PeerRole.SUPERVISOR, "name": self.name, "nprocs": self.nprocs,
                "pid": os.getpid(), "heartbeat": self.heartbeat, **protocol.version_info()}
        if self.procs and self.session is not None:
            # They outlived a scheduler: a new one takes them back with their tasks.
            info["session"] = self.session
            info["running"] = [[worker_id, proc.running_and_done()[0]]
                               for worker_id, proc in self.procs.items()]
        self.send(Kind.HELLO, info)

    def send(self, kind: Kind, info: Any = None) -> None:
        """Never blocks, so a stop request is always seen: with no connection (after a
        failed handshake libzmq keeps no pipe) the message is dropped. HELLO and
        heartbeats repeat; LOST and BYE matter only to a scheduler we are joined to."""
        body = [] if info is None else [info]
        try:
            self.up.send_multipart(protocol.encode(kind, body), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("no connection to the scheduler at %s: %s not sent", self.address, kind.name)

    def on_monitor(self) -> None:
        from .security import handshake_failures

        for why in handshake_failures(self.monitor, self.handshakes):
            raise RefusedError(why)

    def receive(self) -> None:
        while True:
            try:
                frames = self.up.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = protocol.decode(frames)
            except protocol.ProtocolError as exc:
                log.warning("dropped a malformed message from the scheduler: %s", exc)
                continue
            self.last_heard = time.monotonic()
            handler = self.handlers.get(msg.kind)
            if handler is not None:
                handler(self, msg)

    def on_refuse(self, msg: protocol.Message) -> None:
        raise RefusedError(msg.body[0])

    def on_bye(self, msg: protocol.Message) -> None:
        if msg.body[0] == RECONNECT:
            # The scheduler does not know us (it restarted, or gave us up for lost).
            self.welcomed = False
            self.hello()

    def on_welcome(self, msg: protocol.Message) -> None:
        welcome: protocol.Welcome = msg.body[0]
        if self.welcomed:
            return  # a duplicate answer to a repeated HELLO
        session = welcome.session
        if welcome.info.get("kept"):
            pass  # it knew us still: nothing was lost
        elif self.session == session:
            # The scheduler gave us up for lost (we were silent too long) and has handled
            # our workers' tasks as lost: start afresh.
            log.warning("rejoined the scheduler at %s, which had given this host up for "
                        "lost; restarting worker processes", self.address)
            self.stop_all(report=False)
        elif self.session is not None:
            # It restarted. Our HELLO named our worker processes and their tasks: they
            # go on, and say HELLO themselves when it asks (see rejoin.py).
            log.warning("rejoined the scheduler at %s (restarted: session %s) with %d worker "
                        "process(es) kept", self.address, session, len(self.procs))
        else:
            log.info("joined the scheduler at %s with %d worker processes", self.address, self.nprocs)
        self.session = session
        self.welcomed = True

    def on_interrupt(self, msg: protocol.Message) -> None:
        """The scheduler stops a task (its time limit ran out, or its client asked):
        first the soft stop, then, if it still runs, the kill. The process's death is
        then reported (LOST) as any other, and the scheduler words the task's end."""
        worker_id, task_id, kill = msg.body
        proc = self.procs.get(worker_id)
        if proc is None:
            return  # it has exited: its LOST is on the way
        if kill and proc.running_and_done()[0] == task_id:
            log.info("killing worker process %s: task %s still runs after its grace",
                     proc.pid, task_id)
            proc.killed = True
            proc.signal(signal.SIGKILL)
        else:  # the soft stop (or a kill for a task not begun: it skips it at its start)
            proc.interrupt(task_id)

    handlers: dict[Kind, Callable[[Node, protocol.Message], None]] = {
        Kind.WELCOME: on_welcome,
        Kind.REFUSE: on_refuse,
        Kind.BYE: on_bye,
        Kind.INTERRUPT: on_interrupt,
    }

    # -- worker processes ------------------------------------------------------------
    def spawn(self) -> None:
        worker_id = b"%s.w%d" % (self.identity, self.serial)
        self.serial += 1
        proc = spawn_worker(worker_id, self.address, self.runtime_dir, max_tasks=self.max_tasks,
                            init_blob=_NO_INITIALIZER, extra=self.worker_config,
                            rank=free_rank(self.procs.values()))
        self.procs[worker_id] = proc
        self.poller.register(proc.fileno(), zmq.POLLIN)

    def on_death(self, control: Any) -> None:
        fd = control if isinstance(control, int) else control.fileno()
        proc = next((p for p in self.procs.values() if p.fileno() == fd), None)
        if proc is None:
            return
        self.poller.unregister(proc.fileno())
        del self.procs[proc.worker_id]
        code = proc.reap()
        running, done = proc.running_and_done()
        how = describe_exit(code)
        if code != 0:
            log.warning("worker process %d died with %s", proc.pid, how)
        if self.welcomed:
            # The scheduler ignores this for a worker that said goodbye first.
            self.send(Kind.LOST, protocol.Lost(proc.worker_id, how, running, done)._asdict())
        lived = time.monotonic() - proc.started
        proc.close()
        # A worker dying at once, again and again, is a broken environment: back off.
        now = time.monotonic()
        respawn = self.start_failures.died(failed_start=quick_death(lived, code) and not proc.killed,
                                           now=now)
        if respawn.at > now:
            log.error("worker processes keep dying at start; next try in %.1f s",
                      respawn.at - now)
            self.respawn_at = respawn.at

    def stop_all(self, *, report: bool) -> None:
        """End every worker process now (closing its control socket makes it exit)."""
        for proc in list(self.procs.values()):
            self.poller.unregister(proc.fileno())
            proc.control.close()
        deadline = time.monotonic() + 2.0
        for worker_id, proc in list(self.procs.items()):
            code = proc.reap(max(0.0, deadline - time.monotonic()))
            if code is None:
                proc.stop(time.monotonic() + 1.0)
                code = proc.reap(1.0)
            if report and self.welcomed:
                running, done = proc.running_and_done()
                self.send(Kind.LOST, protocol.Lost(worker_id, describe_exit(code), running,
                                                   done)._asdict())
            proc.close()
        self.procs.clear()

    # -- stopping --------------------------------------------------------------------
    def start_draining(self, now: float) -> None:
        self.drain_started = now
        if self.welcomed:
            log.info("draining: the running tasks finish, the rest go back to the scheduler")
            self.send(Kind.BYE, ByeReason.RETIRING)
            self.draining_until = now + self.grace
        else:
            self.draining_until = now  # no scheduler to hand work back to

    def finish_draining(self) -> None:
        busy = len(self.procs)
        if busy:
            log.warning("stopping %d worker process(es) still busy after %.1f s of draining",
                        busy, time.monotonic() - self.drain_started)
        self.stop_all(report=True)
        if self.welcomed:
            self.send(Kind.BYE, ByeReason.STOPPED)
        log.info("stopped%s", f" ({busy} task(s) cut short)" if busy else ": drained")

    def close(self) -> None:
        self.stop_all(report=False)
        self.up.disable_monitor()
        self.monitor.close(0)
        self.up.close()
        self.ctx.term()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
