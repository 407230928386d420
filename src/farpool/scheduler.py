"""The scheduler: a broker between client programs and worker processes.

It routes on msgpack headers alone and never unpickles a payload::

    clients (DEALER)      --HELLO, TASKS, CANCEL, HEARTBEAT, BYE-->
                          <--WELCOME, RESULTS, HEARTBEAT-----------   ROUTER  (CURVE + ZAP on tcp)
    worker processes      <--TASKS (function blob once per worker)--
      (DEALER)            --HELLO, RESULTS, BYE------------------->
    supervisors           --HELLO, HEARTBEAT, LOST, BYE----------->
      (`farpool worker`)  <--WELCOME, HEARTBEAT, BYE---------------

- Clients are served fairly: one queue per client, taken in turn (``Dispatcher``).
- Workers get tasks by credit (free slots plus a prefetch sized by measured task
  time), so a slow task never has others queued behind it while a worker is idle.
- Liveness: clients and supervisors send HEARTBEATs and are echoed; one silent for
  ``liveness`` intervals is lost. A client lost has its queued tasks dropped. A
  supervisor lost takes its workers with it: the task each was running fails with
  Status.LOST (or is retried, if the client asked), tasks they never began requeue.
  Worker processes send nothing while they run a long task, so their supervisor
  watches them and reports a death (LOST, with the state record saying which task).
- A peer this scheduler does not know (it restarted, or declared the peer lost) is
  told ``BYE reconnect``: it says HELLO again and resubmits.
- Malformed frames are counted, logged (rate-limited) and dropped.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections import defaultdict
from typing import Any

import zmq

from . import protocol
from .addresses import check_ipc_free
from .dispatch import Dispatcher, Task
from .fncache import ClientFunctions, SentFunctions
from .key_policy import KeyPolicy
from .log_limit import OncePerSecond
from .protocol import ByeReason, Kind, PeerRole, Status
from .rejoin import Reclaims, task_key
from .scheduler_peers import REJOIN, Peer, PeerUpkeep
from .scheduler_stops import TaskStops, options_of
from .security.auth import user_id
from .status_report import status_report, totals_report
from .task_control import TaskControl

log = logging.getLogger("farpool.scheduler")

DEFAULT_HEARTBEAT = 1.0
DEFAULT_LIVENESS = 5  # missed heartbeats before a peer is lost
RECONNECT = ByeReason.RECONNECT  # tells an unknown peer to say HELLO again
MAX_SLOTS = 1024
MAX_PEER_HEARTBEAT = 60.0  # seconds; a longer one claimed in a HELLO is ignored


class Scheduler(PeerUpkeep, TaskStops):
    """One scheduler on ``address``. ``run()`` serves until ``stop()`` is called (from
    any thread or a signal handler); ``close()`` frees the sockets.

    ``keys`` (a ``security.ClusterKeys``) makes the socket a CURVE server whose
    clients must hold an authorized key; without keys, ``address`` must be ``ipc://``
    or the caller has chosen ``--insecure``.
    """

    def __init__(self, address: str, *, keys: Any = None, heartbeat: float = DEFAULT_HEARTBEAT,
                 liveness: int = DEFAULT_LIVENESS,
                 max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.keys = keys
        self.session = secrets.token_hex(8)
        self.started = time.time()
        self.dispatcher = Dispatcher()
        self.control = TaskControl()  # time limits and stops (scheduler_stops)
        self.peers: dict[bytes, Peer] = {}
        self.worker_fns: dict[bytes, SentFunctions] = {}
        self.reclaims = Reclaims()  # what a restart (or a reconnection) keeps
        # Resubmissions from before a restart wait this long for the worker hosts to
        # rejoin (they say HELLO once a heartbeat), lest tasks they run start again.
        self.rejoin_until = time.monotonic() + 2 * heartbeat
        self.held_back: list[Task] = []
        self.counters: dict[str, int] = defaultdict(int)
        # RESULTS waiting to go out, per client: (entries, frames).
        self.out: dict[bytes, tuple[list[Any], list[Any]]] = {}
        self._stop = threading.Event()
        self._drain_seconds: float | None = None  # drain() asked for
        self.draining_until: float | None = None
        self.malformed_log = OncePerSecond()
        self._keys_loaded = time.monotonic()

        self.policy = KeyPolicy(None)
        self._key: bytes | None = None  # the key of the message being handled
        self.ctx = zmq.Context()
        self.auth = None
        self.router = _router(self.ctx, heartbeat, liveness, max_message_bytes)
        try:
            if keys is not None:
                from .security import Authenticator, configure_server

                self.policy = KeyPolicy.load(keys.key_dir)
                self.auth = Authenticator(self.ctx, keys.authorized).start()
                configure_server(self.router, keys)
            check_ipc_free(address)
            self.router.bind(address)
        except BaseException:
            self.close()
            raise
        self.address = str(self.router.get_string(zmq.LAST_ENDPOINT))
        if self.address.startswith("tcp://0.0.0.0:"):
            self.address = self.address.replace("0.0.0.0", socket.gethostname(), 1)
        self.handlers = {
            Kind.HELLO: self.on_hello,
            Kind.TASKS: self.on_tasks,
            Kind.RESULTS: self.on_results,
            Kind.CANCEL: self.on_cancel,
            Kind.HEARTBEAT: self.on_heartbeat,
            Kind.BYE: self.on_bye,
            Kind.LOST: self.on_lost,
            Kind.STATUS: self.on_status,
            Kind.STOP: self.on_stop,
        }

    # -- control -------------------------------------------------------------------
    def stop(self) -> None:
        """Exit now (safe from a signal handler or another thread)."""
        self._stop.set()

    def drain(self, seconds: float) -> None:
        """Exit once the tasks workers hold have reported, within ``seconds``; send out
        no more. Clients keep what did not run, and resubmit it to the next scheduler.
        Safe from a signal handler."""
        self._drain_seconds = seconds

    def close(self) -> None:
        if self.router is not None:
            self.router.close(0)
            self.router = None  # type: ignore[assignment]
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()

    def run(self) -> None:
        """Serve until ``stop()``."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        next_check = time.monotonic() + self.heartbeat
        control = self.control
        while not self._stop.is_set():
            wait_ms = 100
            due = control.next_due() if control else None
            if due is not None:
                wait_ms = min(wait_ms, int(max(0.0, due - time.monotonic()) * 1000) + 1)
            if poller.poll(wait_ms):
                self.receive()
                self.flush_results()
                self.dispatch()
            now = time.monotonic()
            if control:
                self.act_on_timers(now)
            if self._drain_seconds is not None and self.drained(now):
                return
            if now >= next_check:
                next_check = now + self.heartbeat
                self.check_liveness(now)
                self.reload_keys(now)
                self.flush_results()
                self.dispatch()

    def drained(self, now: float) -> bool:
        running = self.dispatcher.in_flight()
        if self.draining_until is None:
            self.draining_until = now + self._drain_seconds  # type: ignore[operator]
            log.info("draining: %d task(s) on workers may report for %g s; nothing more is "
                     "sent out", running, self._drain_seconds)
        if running and now < self.draining_until:
            return False
        self.flush_results()
        if running:
            log.warning("stopped with %d task(s) still running; their clients resubmit them "
                        "to the next scheduler", running)
        else:
            log.info("drained: every task sent out has reported; stopped")
        return True

    # -- input ---------------------------------------------------------------------
    def receive(self) -> None:
        router = self.router
        for _ in range(1000):  # then dispatch, so a flood of input cannot starve output
            if not protocol.readable(router):
                return
            frames = protocol.recv_frames(router)
            identity = frames[0].bytes
            try:
                msg = protocol.decode(frames[1:])
            except protocol.ProtocolError as exc:
                self.dropped(identity, str(exc))
                continue
            peer = self.peers.get(identity)
            if self.policy.enforced:
                self._key = user_id(frames[1])
                if peer is not None and peer.key != self._key:
                    self.dropped(identity, "a message with another key than the peer joined with")
                    continue
            if peer is not None:
                peer.last_seen = time.monotonic()
            elif msg.kind not in (Kind.HELLO, Kind.STATUS):
                self.counters["unknown"] += 1
                if msg.kind is Kind.RESULTS and self.policy.refusal(self._key, PeerRole.WORKER) is None:
                    # A worker of this scheduler before it restarted, its HELLO to come.
                    for entry, payload in protocol.with_frames(msg.body[0], msg.frames):
                        self.unclaimed(entry.task_id, entry.status, payload, entry.duration)
                if msg.kind not in (Kind.BYE, Kind.LOST):
                    self.send(identity, protocol.encode(Kind.BYE, [RECONNECT]))
                continue
            handler = self.handlers.get(msg.kind)
            if handler is None:
                self.dropped(identity, f"unexpected {msg.kind.name}")
                continue
            try:
                handler(identity, peer, msg)
            except protocol.ProtocolError as exc:
                self.dropped(identity, str(exc))
            except Exception as exc:  # noqa: BLE001 - one peer's message never stops the scheduler
                log.exception("a %s message from %s raised; dropping the peer", msg.kind.name,
                              self.who(identity))
                self.dropped(identity, f"{msg.kind.name} raised {type(exc).__name__}: {exc}")
                peer = self.peers.get(identity)
                if peer is not None:
                    self.forget(peer, f"its {msg.kind.name} message raised {type(exc).__name__}")

    def who(self, identity: bytes) -> str:
        peer = self.peers.get(identity)
        return f"{peer.role} {peer.name}" if peer is not None else f"peer {identity.hex()}"

    def dropped(self, identity: bytes, why: str) -> None:
        """Count and log (at most once a second) a message that was not understood.
        A worker that sends one is no longer trusted with tasks: it is dropped, and
        what it held is handled as for a lost worker."""
        peer = self.peers.get(identity)
        if peer is not None and peer.role == PeerRole.WORKER:
            self.forget(peer, f"sent a malformed message ({why})")
        self.counters["malformed"] += 1
        more = self.malformed_log.passes(time.monotonic())
        if more is not None:
            log.warning("dropped a malformed message from %s: %s%s", self.who(identity), why,
                        f" (and {more} more since)" if more else "")

    def on_hello(self, identity: bytes, peer: Peer | None, msg: protocol.Message) -> None:
        hello: protocol.Hello = msg.body[0]
        info = hello.info
        refusal = protocol.hello_refusal(hello) or self.policy.refusal(self._key, hello.role)
        if refusal is not None:
            self.refuse(identity, refusal)
            return
        role = PeerRole(hello.role)
        if peer is not None and peer.role == role and role != PeerRole.WORKER:
            # Said again (it took us for gone, or HELLOs queued while the connection was
            # down): the same peer, whose work goes on. It resubmits what it has no
            # answer for, and starts its function cache afresh.
            peer.info, peer.fns, peer.retries = info, ClientFunctions(), hello.retries
            self.welcome(identity, hello, kept=True)
            return
        if peer is not None:
            # A worker says HELLO again between tasks, after dropping what it held and had
            # not begun (see worker_loop.on_bye): that goes back to the queue.
            self.forget(peer, f"it said HELLO again as a {role}", orderly=peer.role == role)
        peer = Peer(identity, role, info, key=self._key)
        if hello.heartbeat is not None and hello.heartbeat <= MAX_PEER_HEARTBEAT:
            peer.heartbeat = hello.heartbeat
        self.peers[identity] = peer
        if role == PeerRole.WORKER:
            slots = hello.slots
            if slots > MAX_SLOTS:
                raise protocol.ProtocolError(f"bad slots {slots!r} in worker HELLO")
            peer.supervisor = hello.supervisor
            owner = self.peers.get(peer.supervisor)
            if owner is not None and owner.role == PeerRole.SUPERVISOR:
                owner.workers.add(identity)
                if owner.retiring:  # a late starter of a retiring host
                    peer.retiring = True
                    self.send(identity, protocol.encode(Kind.BYE, [ByeReason.RETIRING]))
            self.reclaims.joined(identity)
            slot = self.dispatcher.add_worker(identity, slots, info=info)
            slot.retiring = peer.retiring
            self.worker_fns[identity] = SentFunctions()
            log.info("worker process %s joined", peer.name)
            return
        if role == PeerRole.CLIENT:
            peer.retries = hello.retries
        if role == PeerRole.SUPERVISOR and hello.running and info.get("session") != self.session:
            self.rejoin_workers(identity, hello.running)
        if role == PeerRole.CLIENT and info.get("session") not in (None, self.session):
            peer.resumed = True  # from before a restart: see on_tasks
        log.info("%s %s joined", role, peer.name)
        self.welcome(identity, hello, kept=False)

    def welcome(self, identity: bytes, hello: protocol.Hello, *, kept: bool) -> None:
        """``kept``: we knew the peer already, and kept its state."""
        self.send(identity, protocol.encode(Kind.WELCOME, [{
            "session": self.session, "heartbeat": self.heartbeat, "liveness": self.liveness,
            "hello": hello.seq, "kept": kept, **protocol.version_info()}]))

    def rejoin_workers(self, supervisor: bytes, running: list[tuple[bytes, int | None]]) -> None:
        """A supervisor that served a scheduler before (this one, restarted) kept its
        worker processes: expect their results, and ask them to say HELLO."""
        for worker_id, task_id in running:
            if worker_id not in self.peers:
                self.reclaims.expect(worker_id, supervisor, task_id)
                self.send(worker_id, REJOIN)
        log.info("worker host %s rejoined with %d worker process(es), %d of them running a task",
                 self.peers[supervisor].name, len(running),
                 sum(task_id is not None for _, task_id in running))

    def refuse(self, identity: bytes, reason: str) -> None:
        self.counters["refused"] += 1
        log.warning("refused %s: %s", self.who(identity), reason)
        self.send(identity, protocol.encode(Kind.REFUSE, [reason]))

    def on_tasks(self, identity: bytes, peer: Peer | None, msg: protocol.Message) -> None:
        assert peer is not None
        if peer.role != PeerRole.CLIENT:
            raise protocol.ProtocolError(f"TASKS from a {peer.role}")
        rejected: list[tuple[int, str]] = []
        limits: dict[int, protocol.TaskLimits] = msg.body[1] if len(msg.body) > 1 else {}
        for entry, payload in protocol.with_frames(msg.body[0], msg.frames):
            resolved = peer.fns.resolve(entry, payload)
            if isinstance(resolved, str):
                rejected.append((entry.task_id, resolved))
                continue
            held = peer.tasks.get(entry.task_id)
            if held is not None:
                if held.fn_key != entry.fn_key:
                    rejected.append((entry.task_id, "task id already in use"))
                continue  # else resubmitted after a HELLO again: it is in flight already
            blob, args = resolved
            task = Task(task_key(peer.key, identity, entry.task_id), entry.fn_key, blob, args,
                        client=identity, context=(identity, peer.epoch, entry.task_id))
            if entry.task_id in limits:
                task.options = options_of(limits[entry.task_id])
            peer.tasks[entry.task_id] = task
            if peer.resumed and time.monotonic() < self.rejoin_until:
                # Just restarted: worker hosts that may run it still have yet to say so.
                self.held_back.append(task)
            else:
                self.submit(task)
        if rejected:
            self.counters["rejected"] += len(rejected)
            self.send(identity, protocol.encode(
                Kind.RESULTS, [[[tid, int(Status.REJECTED), 1, 0.0] for tid, _ in rejected]],
                [why.encode() for _, why in rejected]))

    def submit(self, task: Task) -> None:
        kept = self.reclaims.take_kept(task.task_id)
        if kept is not None:  # it finished while the client was away: not run again
            self.route(task, kept.status, kept.payload, kept.duration)
        elif not self.reclaims.park(task):  # unless a rejoined worker runs it still
            self.dispatcher.submit(task)

    def on_results(self, identity: bytes, peer: Peer | None, msg: protocol.Message) -> None:
        assert peer is not None
        if peer.role != PeerRole.WORKER:
            raise protocol.ProtocolError(f"RESULTS from a {peer.role}")
        finished = self.dispatcher.finished
        for entry, payload in protocol.with_frames(msg.body[0], msg.frames):
            task = finished(identity, entry.task_id, entry.duration)
            if task is None:  # of a task it ran before a restart, or we gave it up for lost
                self.unclaimed(entry.task_id, entry.status, payload, entry.duration)
                continue
            if self.control and self.stopped_result(task, entry):
                continue
            self.route(task, entry.status, payload, entry.duration)
        self.start_clocks(identity)  # what it runs next

    def unclaimed(self, task_id: int, status: int, payload: list[Any], duration: float) -> None:
        """A result for no task a client is waiting on now: the resubmission waiting for
        it gets it, else it is kept for one (see rejoin.py)."""
        waiting = self.reclaims.unclaimed(task_id, status, payload, duration)
        if waiting is not None:
            self.route(waiting, status, payload, duration)

    def route(self, task: Task, status: int, payload: list[Any], duration: float) -> None:
        """Add a task's outcome to the RESULTS batch for its client (if still there);
        ``flush_results`` sends the batches, once per pass over the input."""
        client_id, epoch, client_task = task.context
        client = self.peers.get(client_id)
        if client is None or client.role != PeerRole.CLIENT or client.epoch != epoch:
            # The client left or reconnected: kept for its resubmission.
            self.unclaimed(task.task_id, status, payload, duration)
            return
        if client.tasks.pop(client_task, None) is None:
            return
        entries, frames = self.out.setdefault(client_id, ([], []))
        entries.append([client_task, int(status), len(payload), duration])
        frames.extend(payload)

    def flush_results(self) -> None:
        out, self.out = self.out, {}
        for client_id, (entries, frames) in out.items():
            self.send(client_id, protocol.encode(Kind.RESULTS, [entries], frames))

    def on_cancel(self, identity: bytes, peer: Peer | None, msg: protocol.Message) -> None:
        assert peer is not None
        if peer.role != PeerRole.CLIENT:
            raise protocol.ProtocolError(f"CANCEL from a {peer.role}")
        wanted = {peer.tasks[t].task_id for t in msg.body[0] if t in peer.tasks}
        for task in self.dispatcher.cancel(identity, wanted):
            wanted.discard(task.task_id)
            self.route(task, Status.CANCELLED, [], 0.0)
        if wanted:
            # Tasks a worker holds: it drops those it has not begun (answering CANCELLED).
            holders = [(worker_id, [t for t in slot.held if t in wanted])
                       for worker_id, slot in self.dispatcher.workers.items()]
            for worker_id, ids in holders:
                if ids:
                    self.send(worker_id, protocol.encode(Kind.CANCEL, [ids]))

    def on_heartbeat(self, identity: bytes, peer: Peer | None, msg: protocol.Message) -> None:
        assert peer is not None
        if peer.role != PeerRole.WORKER:
            self.send(identity, protocol.encode(Kind.HEARTBEAT))

    def on_bye(self, identity: bytes, peer: Peer | None, msg: protocol.Message) -> None:
        assert peer is not None
        reason = msg.body[0]
        if peer.role == PeerRole.SUPERVISOR and reason == ByeReason.RETIRING:
            # Drain the host: its workers finish what they run, then hand the rest back.
            peer.retiring = True
            for worker_id in list(peer.workers):
                slot = self.dispatcher.workers.get(worker_id)
                if slot is not None:
                    slot.retiring = True
                    self.send(worker_id, protocol.encode(Kind.BYE, [ByeReason.RETIRING]))
            log.info("supervisor %s is retiring", peer.name)
            return
        self.forget(peer, f"it said goodbye ({reason})", orderly=True)

    def on_lost(self, identity: bytes, peer: Peer | None, msg: protocol.Message) -> None:
        assert peer is not None
        if peer.role != PeerRole.SUPERVISOR:
            raise protocol.ProtocolError(f"LOST from a {peer.role}")
        lost: protocol.Lost = msg.body[0]
        worker = self.peers.get(lost.worker)
        if worker is None and self.reclaims.rejoining.get(lost.worker) == identity:
            # It died before saying HELLO to this scheduler: what waited for it.
            self.apply_loss(self.reclaims.worker_lost(lost.worker), (lost.running, lost.done),
                            f"worker process on {peer.name} died with {lost.how}")
            return
        if worker is None or worker.role != PeerRole.WORKER or worker.supervisor != identity:
            return  # already gone (it said BYE), or not this supervisor's
        self.counters["workers_lost"] += 1
        self.lose_worker(worker, f"worker process {worker.info.get('pid')} on {peer.name} died "
                                 f"with {lost.how}", (lost.running, lost.done))

    def on_status(self, identity: bytes, peer: Peer | None, msg: protocol.Message) -> None:
        if self.policy.full_status(self._key):
            report = status_report(self)
        else:
            report = totals_report(self, self._key)
        self.send(identity, protocol.encode(Kind.STATUS_REPLY, [report]))

    # -- output --------------------------------------------------------------------
    def dispatch(self) -> None:
        if self.draining_until is not None:
            return
        for worker, batch in self.dispatcher.assign():
            needs = self.worker_fns[worker.worker_id].needs
            self.send(worker.worker_id, protocol.encode_tasks(batch, needs))
            self.start_clocks(worker.worker_id)

    def send(self, identity: bytes, msg: list[Any]) -> None:
        try:
            protocol.send_frames(self.router, [identity, *msg])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # The peer's connection is gone (ROUTER_MANDATORY tells us, rather than
            # dropping the message silently).
            peer = self.peers.get(identity)
            if peer is None:
                return
            if peer.role == PeerRole.WORKER and peer.supervisor in self.peers:
                # Its supervisor is about to report the death with the exit status and
                # the task it ran (LOST): give it no more work and wait for that, a
                # little (check_liveness), rather than fail its task with less to say.
                if not peer.unreachable:
                    peer.unreachable = time.monotonic()
                    slot = self.dispatcher.workers.get(identity)
                    if slot is not None:
                        slot.retiring = True
                return
            self.forget(peer, "disconnected")




def _router(ctx: zmq.Context, heartbeat: float, liveness: int, max_message_bytes: int) -> zmq.Socket:
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.router_mandatory = True  # a send to a vanished peer raises, never drops silently
    router.sndhwm = 0  # credit bounds what goes to workers; never drop a result
    router.rcvhwm = 0
    router.maxmsgsize = max_message_bytes
    ms = int(heartbeat * 1000)
    router.heartbeat_ivl = ms
    router.heartbeat_timeout = ms * liveness
    return router


def serve(address: str, *, keys: Any = None, heartbeat: float = DEFAULT_HEARTBEAT,
          ready: Any = None) -> None:
    """Run a scheduler in this thread until it is stopped; ``ready(scheduler)`` is
    called once it is bound (for the caller to learn the address and keep a handle)."""
    scheduler = Scheduler(address, keys=keys, heartbeat=heartbeat)
    try:
        if ready is not None:
            ready(scheduler)
        scheduler.run()
    finally:
        scheduler.close()


__all__ = ["Scheduler", "serve", "DEFAULT_HEARTBEAT"]
