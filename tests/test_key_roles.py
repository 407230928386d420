"""Keys that carry a role, written as the attacks they stop: a peer holding a valid
*client* key (a user's laptop key from `farpool keygen`) tries to act as a worker, to
forge results, to read who else is on the cluster, and to keep its connection after
the key is revoked. Real scheduler and worker daemons on loopback with CURVE.

Before roles, any allowed key could say HELLO as a worker: a fake worker got other
clients' tasks (arguments in the clear) and answered them with a pickle that ran code
in the victim's process.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
import zmq

import farpool
from farpool import protocol
from farpool.daemons import query_status
from farpool.errors import SchedulerLost
from farpool.key_policy import KeyPolicy
from farpool.protocol import Kind, PeerRole
from farpool.security import (
    KeyRole,
    client_keys,
    configure_client,
    load_key_roles,
)
from remote_cluster import HEARTBEAT, start_scheduler, start_worker, wait_for_workers

pytestmark = pytest.mark.timeout(120)


class CreatesFile:
    """Unpickling it creates ``path``: proof that someone unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class Peer:
    """A raw DEALER with a key, speaking the wire protocol as an attacker's script would."""

    def __init__(self, address: str, keys) -> None:
        self.ctx = zmq.Context()
        self.address, self.keys = address, keys
        self.connect()

    def connect(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        # A send waits for a connection: the scheduler admits a new key only at its next
        # reload, and libzmq does not retry a handshake ZAP refused (a new socket does).
        self.sock.sndtimeo = 1000
        server_public, pair = self.keys
        configure_client(self.sock, pair, server_public)
        self.sock.connect(self.address)

    def send(self, kind: Kind, body, frames=()) -> None:
        self.sock.send_multipart(protocol.encode(kind, body, list(frames)))

    def recv(self, timeout: float = 5.0):
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return protocol.decode(self.sock.recv_multipart())

    def hello(self, role: str, timeout: float = 15.0, **info):
        """HELLO until answered: the scheduler admits a new key at its next reload."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.send(Kind.HELLO, [{"role": role, "pid": os.getpid(), "slots": 8, "hello": 1,
                                        **protocol.version_info(), **info}])
            except zmq.Again:
                answer = None
            else:
                answer = self.recv(1.0)
            if answer is not None:
                return answer
            self.sock.close(0)
            self.connect()
        raise AssertionError(f"no answer to a {role} HELLO within {timeout} s")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_a_client_key_cannot_join_as_a_worker_nor_forge_results(daemons, tmp_path, issue):
    scheduler, address = start_scheduler(tmp_path, heartbeat=HEARTBEAT)
    daemons.append(scheduler)
    daemons.append(start_worker(address, tmp_path, nprocs=1))
    wait_for_workers(address, 1)
    _, laptop = issue("client")
    fake = Peer(address, laptop)
    try:
        refused = fake.hello("worker")
        assert refused.kind is Kind.REFUSE
        assert "is a client key: it may not join as a worker" in refused.body[0]
        assert fake.hello("supervisor", name="evil").kind is Kind.REFUSE
        # Another client's tasks never reach it: they run on the real worker.
        with farpool.Executor(address, heartbeat=HEARTBEAT) as ex:
            assert [f.result(timeout=30) for f in [ex.submit(pow, 2, i) for i in range(20)]] == [
                2 ** i for i in range(20)]
        assert fake.recv(0.5) is None or fake.recv(0.5).kind is not Kind.TASKS
        # Joined as a client, it forges RESULTS carrying a pickle that would run code:
        # dropped, never unpickled, and the scheduler serves on.
        assert fake.hello("client").kind is Kind.WELCOME
        evidence = tmp_path / "unpickled"
        payload = pickle.dumps(CreatesFile(evidence))
        fake.send(Kind.RESULTS, [[[1, 0, 1, 0.001]]], [payload])
        with farpool.Executor(address, heartbeat=HEARTBEAT) as ex:
            assert ex.submit(pow, 3, 3).result(timeout=30) == 27
        assert not evidence.exists()
        assert scheduler.proc.poll() is None
    finally:
        fake.close()


def test_a_revoked_key_stops_being_served_on_its_open_connection(daemons, tmp_path, issue, key_dir):
    scheduler, address = start_scheduler(tmp_path, heartbeat=HEARTBEAT)
    daemons.append(scheduler)
    daemons.append(start_worker(address, tmp_path, nprocs=1))
    wait_for_workers(address, 1)
    path, keys = issue("client")
    probe = Peer(address, keys)  # waits until the scheduler has loaded the new key
    assert probe.hello("client").kind is Kind.WELCOME
    probe.close()
    ex = farpool.Executor(address, key_file=str(path), heartbeat=HEARTBEAT)
    try:
        assert ex.submit(pow, 2, 4).result(timeout=30) == 16
        Path(key_dir, "authorized", path.name.replace(".cluster-key", ".key")).unlink()
        revoked = time.monotonic()
        while ex._backend.broken is None and time.monotonic() - revoked < 20:
            time.sleep(0.05)
        took = time.monotonic() - revoked
        assert ex._backend.broken is not None, "still served 20 s after the revocation"
        assert took < 12  # the reload interval (5 s) and a margin for a loaded machine
        with pytest.raises(SchedulerLost, match="refused this client: key not authorized"):
            ex.submit(pow, 2, 5)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def test_status_shows_a_client_key_totals_only(daemons, tmp_path, issue, key_dir):
    scheduler, address = start_scheduler(tmp_path, heartbeat=HEARTBEAT)
    daemons.append(scheduler)
    daemons.append(start_worker(address, tmp_path, nprocs=1, name="secret-host"))
    wait_for_workers(address, 1)
    _, (server_public, pair) = issue("client")
    probe = Peer(address, (server_public, pair))
    assert probe.hello("client").kind is Kind.WELCOME
    probe.close()
    mine = query_status(address, curve=(server_public, pair))
    assert mine["supervisors"] == [] and mine["slots"] == 1
    assert all(set(w) == {"slots", "held"} for w in mine["workers"])
    assert "secret-host" not in repr(mine)
    full = query_status(address, curve=client_keys())  # this host's own key: an operator's
    assert full["supervisors"][0]["name"] == "secret-host"


# -- the decisions, without sockets --------------------------------------------------------


def test_key_policy_decisions():
    roles = {b"c" * 40: KeyRole("client", "laptop", False), b"w" * 40: KeyRole("worker", "node1", False),
             b"o" * 40: KeyRole("operator", "local", False)}
    policy = KeyPolicy(roles)
    assert policy.refusal(b"c" * 40, "client") is None
    assert "client key" in policy.refusal(b"c" * 40, "worker")
    assert "worker key" in policy.refusal(b"w" * 40, PeerRole.CLIENT)
    assert policy.refusal(b"w" * 40, "supervisor") is None
    assert all(policy.refusal(b"o" * 40, r) is None for r in ("client", "worker", "supervisor"))
    assert "not authorized" in policy.refusal(b"x" * 40, "client")
    assert policy.refusal(None, "client") is not None
    assert not policy.full_status(b"c" * 40) and policy.full_status(b"w" * 40)
    policy.update({b"o" * 40: roles[b"o" * 40]})
    assert policy.revoked(b"c" * 40, PeerRole.CLIENT) is not None
    unenforced = KeyPolicy(None)
    assert unenforced.refusal(None, "worker") is None and unenforced.full_status(None)


def test_key_files_without_a_role_keep_working_as_operators(key_dir, tmp_path):
    # An upgrade: key files written before roles name none. They stay allowed, as
    # both roles, and are reported so the operator can split them.
    from farpool.security import KeyPair

    bare = KeyPair.generate().public
    path = Path(key_dir, "authorized", "old-laptop.key")
    path.write_text(bare.decode() + "\n")
    os.chmod(path, 0o600)
    try:
        roles = load_key_roles(key_dir)
        assert roles[bare] == KeyRole("operator", "old-laptop", True)
        assert "old-laptop" in KeyPolicy(roles).legacy_names()
        assert "local" not in KeyPolicy(roles).legacy_names()
    finally:
        path.unlink()


def test_a_worker_without_a_supervisor_that_vanishes_has_its_tasks_handled(daemons, tmp_path):
    """A worker process with no `farpool worker` behind it (a peer's own script) takes
    a task and disconnects. Before, the task stayed pending for as long as nothing else
    was sent to that worker (30 s and more): no supervisor reports it LOST. Now the
    scheduler probes such workers every heartbeat, notices within a few seconds, and
    handles the task as a lost worker's: it fails with WorkerLost (or reruns, with
    retries)."""
    scheduler, address = start_scheduler(tmp_path, heartbeat=HEARTBEAT)
    daemons.append(scheduler)
    fake = Peer(address, client_keys())  # this host's key: an operator may be a worker
    try:
        hello = {"role": "worker", "pid": 4242, "slots": 1, **protocol.version_info()}
        fake.send(Kind.HELLO, [hello])
        with farpool.Executor(address, heartbeat=HEARTBEAT, retries=1) as ex:
            held = ex.submit(pow, 2, 10)
            got = fake.recv(10)
            assert got is not None and got.kind is Kind.TASKS
            daemons.append(start_worker(address, tmp_path, nprocs=1))
            wait_for_workers(address, 2)
            fake.close()
            gone = time.monotonic()
            assert held.result(timeout=20) == 1024  # rerun on the real worker
            assert time.monotonic() - gone < 10
    finally:
        if not fake.sock.closed:
            fake.close()
