"""The scheduler's peers, and what it means when one leaves or falls silent.

``Peer`` is what the scheduler knows of a client, a worker process or a worker host.
``PeerUpkeep`` is the part of ``Scheduler`` that forgets peers: a goodbye, a lost
worker (its tasks failed, retried or requeued, as ``dispatch.plan_loss`` decides), a
peer silent past its heartbeats, a key revoked since it joined; and, each heartbeat,
the resubmissions held back just after a restart (see rejoin.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import protocol
from .dispatch import Task, plan_loss
from .fncache import ClientFunctions
from .liveness import heartbeat_limit
from .protocol import ByeReason, Kind, PeerRole, Status
from .status_report import printable
from .task_control import retries_after_loss

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .key_policy import KeyPolicy
    from .rejoin import Reclaims
    from .task_control import TaskControl, Watch

log = logging.getLogger("farpool.scheduler")

# Seconds a worker whose connection is gone waits for its supervisor's LOST report.
UNREACHABLE_GRACE = 3.0
RELOAD_KEYS_SECONDS = 5.0
_PROBE = protocol.encode(Kind.HEARTBEAT)
REJOIN = protocol.encode(Kind.BYE, [ByeReason.RECONNECT])  # asks an unknown peer for HELLO


@dataclass(eq=False)
class Peer:
    identity: bytes
    role: PeerRole
    info: dict[str, Any]
    last_seen: float = field(default_factory=time.monotonic)
    heartbeat: float = 0.0  # seconds between the peer's heartbeats, as its HELLO said
    # clients
    epoch: int = 0
    retries: int = 0
    resumed: bool = False  # it was a client of this scheduler before a restart
    fns: ClientFunctions = field(default_factory=ClientFunctions)
    tasks: dict[int, Task] = field(default_factory=dict)  # client task id -> task
    # workers: their supervisor's identity; supervisors: their workers
    supervisor: bytes = b""
    workers: set[bytes] = field(default_factory=set)
    retiring: bool = False
    unreachable: float = 0.0  # workers: when a send found their connection gone
    key: bytes | None = None  # the CURVE key it joined with (see key_policy)

    @property
    def name(self) -> str:
        """For people: the name it gave, else a worker process's host and pid."""
        name, host = self.info.get("name"), self.info.get("host")
        if isinstance(name, str) and name:  # peer-supplied: no escape sequences in logs
            return printable(name)
        if isinstance(host, str) and host:
            return printable(f"{host} pid {self.info.get('pid')}")
        return self.identity.hex()


class PeerUpkeep:
    """Mixed into ``Scheduler``: the names below are its own."""

    if TYPE_CHECKING:
        peers: dict[bytes, Peer]
        dispatcher: Dispatcher
        reclaims: Reclaims
        policy: KeyPolicy
        worker_fns: dict[bytes, Any]
        counters: dict[str, int]
        heartbeat: float
        liveness: int
        held_back: list[Task]
        rejoin_until: float
        auth: Any
        keys: Any
        _keys_loaded: float

        def send(self, identity: bytes, msg: list[Any]) -> None: ...
        def route(self, task: Task, status: int, payload: list[Any], duration: float) -> None: ...
        def refuse(self, identity: bytes, reason: str) -> None: ...
        def submit(self, task: Task) -> None: ...
        control: TaskControl

        def end_stopped(self, task: Task, error: BaseException, duration: float = 0.0
                        ) -> None: ...
        def stopped_loss(self, watches: dict[int, Watch], task: Task) -> BaseException | None: ...

    # -- peers leaving -------------------------------------------------------------
    def forget(self, peer: Peer, why: str, *, orderly: bool = False) -> None:
        """Drop a peer and everything that depends on it."""
        if self.peers.get(peer.identity) is not peer:
            return
        if peer.role == PeerRole.WORKER and not orderly:
            self.lose_worker(peer, f"worker process {peer.info.get('pid')} {why}", None)
            return
        del self.peers[peer.identity]
        if peer.role == PeerRole.CLIENT:
            self.dispatcher.drop_client(peer.identity)  # queued work nobody waits for
            self.reclaims.cancel_waiting(peer.identity)
            # Its running tasks go on: if it comes back, they answer its resubmissions.
            for worker_id, task_id in self.dispatcher.held_for(peer.identity):
                self.reclaims.expected[task_id] = worker_id
            peer.tasks.clear()
            peer.epoch += 1
        elif peer.role == PeerRole.WORKER:
            # A worker saying BYE answered all it ran: what it still held never started.
            self.dispatcher.requeue(self.dispatcher.remove_worker(peer.identity))
            self.control.lost(peer.identity)  # nor is any of it being timed or stopped
            self.worker_fns.pop(peer.identity, None)
            owner = self.peers.get(peer.supervisor)
            if owner is not None:
                owner.workers.discard(peer.identity)
        elif peer.role == PeerRole.SUPERVISOR:
            self.apply_loss(self.reclaims.supervisor_lost(peer.identity), None,
                            f"the worker host {peer.name} {why}")
            for worker_id in list(peer.workers):
                worker = self.peers.get(worker_id)
                if worker is not None:
                    self.lose_worker(worker, f"the worker host {peer.name} {why}", None)
        log.info("%s %s left: %s", peer.role, peer.name, why)

    def lose_worker(self, worker: Peer, how: str,
                    record: tuple[int | None, int | None] | None) -> None:
        """A worker is gone without a goodbye: fail or retry what it ran, requeue the rest.
        ``record``: the worker's (running, done) state record, None if none came."""
        self.peers.pop(worker.identity, None)
        self.worker_fns.pop(worker.identity, None)
        owner = self.peers.get(worker.supervisor)
        if owner is not None:
            owner.workers.discard(worker.identity)
        # Resubmissions waiting for a rejoined worker ran on it before what it holds now.
        held = self.reclaims.worker_lost(worker.identity)
        held += self.dispatcher.remove_worker(worker.identity)
        self.apply_loss(held, record, how, self.control.lost(worker.identity))

    def apply_loss(self, held: list[Task], record: tuple[int | None, int | None] | None,
                   how: str, watches: dict[int, Watch] | None = None) -> None:
        """Fail, retry or requeue what a lost worker held, as ``plan_loss`` decides.
        ``watches``: its tasks under a time limit or being stopped (scheduler_stops)."""
        watches = watches or {}

        plan = plan_loss(held, record,
                         lambda task: retries_after_loss(watches, task, self.retries_for(task)))
        for task in plan.failed_running:
            stopped = self.stopped_loss(watches, task) if watches else None
            if stopped is not None:
                self.end_stopped(task, stopped)
                continue
            self.route(task, Status.LOST, [f"{how} while running the task".encode()], 0.0)
        for task in plan.failed_unreported:
            self.route(task, Status.LOST, [f"{how} before it reported the result".encode()], 0.0)
        self.dispatcher.requeue(plan.requeue)
        failed = len(plan.failed_running) + len(plan.failed_unreported)
        log.warning("%s; %d task(s) failed, %d requeued", how, failed, len(plan.requeue))

    def retries_for(self, task: Task) -> int:
        """How often a task may run again after its worker died or its time ran out:
        its own options', else its client's choice (none if the client is gone: no
        one waits for it)."""
        client = self.peers.get(task.context[0])
        if client is None:
            return 0
        options = task.options
        if options is not None and options.retries is not None:
            return int(options.retries)
        return client.retries

    def check_liveness(self, now: float) -> None:
        if self.held_back and now >= self.rejoin_until:
            held, self.held_back = self.held_back, []
            for task in held:
                client = self.peers.get(task.context[0])
                if client is not None and client.epoch == task.context[1]:
                    self.submit(task)
        for worker_id in self.reclaims.rejoining:  # until they say HELLO (see rejoin_workers)
            self.send(worker_id, REJOIN)
        self.reclaims.expire(now)
        for peer in list(self.peers.values()):
            # A peer beating slower than we do is judged by its own interval.
            limit = heartbeat_limit(self.heartbeat, self.liveness, peer.heartbeat)
            if peer.role != PeerRole.WORKER and now - peer.last_seen > limit:
                self.counters[f"{peer.role}s_timed_out"] += 1
                self.forget(peer, f"stopped answering (no heartbeat for {limit:g} s)")
            elif peer.unreachable and now - peer.unreachable > UNREACHABLE_GRACE:
                self.forget(peer, "disconnected")
            elif (peer.role == PeerRole.WORKER and not peer.unreachable
                  and peer.supervisor not in self.peers):
                # No supervisor vouches for it (nor says LOST when it dies), and a worker
                # in a long task sends nothing: a send is how its gone connection shows
                # (ROUTER_MANDATORY), then the grace above, then its tasks are handled.
                self.send(peer.identity, _PROBE)

    def reload_keys(self, now: float) -> None:
        """Pick up keys added by `farpool keygen` (or removed) since start."""
        if self.auth is None or now - self._keys_loaded < RELOAD_KEYS_SECONDS:
            return
        self._keys_loaded = now
        from .security import load_key_roles

        try:
            roles = load_key_roles(self.keys.key_dir)
        except Exception as exc:  # noqa: BLE001 - keep the old list, say why
            log.error("could not reload authorized keys: %s", exc)
            return
        self.auth.allow(list(roles))
        self.policy.update(roles)
        # ZAP runs only at a handshake: connections made with a key revoked since (or
        # whose role changed) are cut here.
        for peer in list(self.peers.values()):
            why = self.policy.revoked(peer.key, peer.role)
            if why is not None:
                self.refuse(peer.identity, why)
                self.forget(peer, f"its {why}")
