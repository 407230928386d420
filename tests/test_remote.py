"""Faults around the scheduler and worker daemons, with real daemons on loopback.

Every test starts a ``farpool scheduler`` and ``farpool worker`` daemons as child
processes (CURVE keys from the session's key directory, heartbeats of 0.2 s, so a
lost peer is noticed in about a second), does to them what a bad day would, and
checks what the user of ``farpool.Executor`` sees. Each test's docstring says what.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import msgpack
import pytest
import zmq

import farpool
from engine_clusters import _cluster_env, free_port
from farpool import protocol, serialize
from farpool.daemons import query_status
from farpool.errors import SchedulerLost, SecurityError, VersionMismatch
from farpool.protocol import Kind
from farpool.security import KeyPair, client_keys, configure_client, write_key_file
from remote_cluster import HEARTBEAT, Daemon, start_scheduler, start_worker, status, wait_for_workers

# -- tasks (imported by reference in the worker processes) ------------------------------------


def square(x):
    return x * x


def nap(seconds, pidfile=None):
    """Sleep; with ``pidfile``, first say (atomically) which process runs the task."""
    if pidfile is not None:
        tmp = f"{pidfile}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, pidfile)
    time.sleep(seconds)
    return os.getpid()


def nap_once(marker, pidfile):
    """The first run says where it runs and sleeps for a minute; a rerun returns."""
    if os.path.exists(marker):
        return "second try"
    open(marker, "w").close()
    return nap(60, pidfile)


def pid_and_square(x):
    return os.getpid(), x * x


def crash_exit(code):
    os._exit(code)


def log_and_exit(path, code):
    with open(path, "a") as f:
        f.write("ran\n")
    os._exit(code)


def crash_segfault():
    ctypes.string_at(0)


def sigkill_once(marker):
    """SIGKILL its own worker process the first time (no marker yet); succeed after."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return "second try"


def log_run(path, x, seconds):
    """Append ``x`` to ``path`` (one line per run), then sleep."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    time.sleep(seconds)
    return x


class CreatesFile:
    """A payload that creates ``path`` the moment it is unpickled: what an attacker
    would send. Nothing a refused peer sends may ever reach ``pickle.loads``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "a"))


# -- helpers ------------------------------------------------------------------------------------


class Cluster:
    """Daemons started by one test (or module), all stopped by ``stop()``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.schedulers: list[Daemon] = []
        self.workers: list[Daemon] = []
        self.address = ""

    def scheduler(self, **kwargs) -> Daemon:
        daemon, self.address = start_scheduler(self.log_dir, **kwargs)
        self.schedulers.append(daemon)
        return daemon

    def worker(self, name: str = "worker", nprocs: int = 2, extra: tuple[str, ...] = (),
               heartbeat: float = HEARTBEAT, new_session: bool = False) -> Daemon:
        daemon = start_worker(self.address, self.log_dir, nprocs=nprocs, name=name, extra=extra,
                              heartbeat=heartbeat, new_session=new_session)
        self.workers.append(daemon)
        return daemon

    def stop(self) -> None:
        """Stop every daemon (workers first, while the scheduler is there to take their
        goodbyes); ``Daemon.stop`` escalates to SIGKILL, so none outlives the test."""
        errors = []
        for daemon in [*self.workers, *self.schedulers]:
            try:
                daemon.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others, then report
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def cluster(key_dir, tmp_path):
    """A test's own daemons (it starts what it needs); all stopped afterwards."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def one_host_cluster(log_dir: Path, host: str):
    """A scheduler and one worker daemon (``--name host``) of 2 processes, running:
    for a module fixture to yield (stopped when the generator closes)."""
    c = Cluster(log_dir)
    try:
        c.scheduler()
        c.worker(name=host)
        wait_for_workers(c.address, 2)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def shared(key_dir, tmp_path_factory):
    """A scheduler and one worker daemon of 2 processes for the tests that leave them
    healthy (each checks they are before it starts)."""
    yield from one_host_cluster(tmp_path_factory.mktemp("shared"), "shared")


@pytest.fixture
def shared_address(shared):
    wait_for_workers(shared.address, 2)
    return shared.address


def executor(address: str, **options) -> farpool.Executor:
    options.setdefault("heartbeat", HEARTBEAT)
    return farpool.Executor(address, **options)


def close(ex: farpool.Executor) -> None:
    ex.shutdown(wait=True, cancel_futures=True)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def read_pid(path: Path, timeout: float = 30.0) -> int:
    wait_until(path.exists, timeout, f"a task writing {path.name}")
    return int(path.read_text())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def worker_pids(address: str) -> list[int]:
    return [w["pid"] for w in status(address)["workers"]]


def python(code: str, **kwargs) -> subprocess.Popen:
    """A client program in a process of its own (it finds the tests' task functions)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=_cluster_env(dict(os.environ)), **kwargs)


def dealer(address: str, keys=None) -> tuple[zmq.Context, zmq.Socket]:
    """A hand-driven DEALER to the scheduler; ``keys`` = (server_public, KeyPair)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if keys is not None:
        configure_client(sock, keys[1], keys[0])
    sock.connect(address)
    return ctx, sock


def recv(sock: zmq.Socket, timeout: float = 5.0) -> protocol.Message | None:
    if not sock.poll(int(timeout * 1000)):
        return None
    return protocol.decode(sock.recv_multipart())


def client_hello(**changes) -> list[bytes]:
    info = {"role": "client", "hello": 1, "pid": os.getpid(), **protocol.version_info(), **changes}
    return protocol.encode(Kind.HELLO, [info])


def attack_messages(path: Path) -> list[list[bytes]]:
    """A well-formed client HELLO, then TASKS whose function pickle creates ``path``."""
    blob = pickle.dumps(CreatesFile(path), protocol=5)
    args = serialize.dumps_args((), {})
    key = hashlib.blake2b(blob, digest_size=16).digest()  # as a real client names it
    tasks = protocol.encode(Kind.TASKS, [[[1, key, 1, len(args)]]], [blob, *args])
    return [client_hello(), [bytes(f) for f in tasks]]


def zmtp10(messages: list[list[bytes]]) -> list[bytes]:
    """ZMTP/1.0 bytes: an (empty) identity, then the messages; no handshake at all."""

    def frame(body: bytes, more: bool) -> bytes:
        n = len(body) + 1
        size = bytes([n]) if n < 255 else b"\xff" + struct.pack(">Q", n)
        return size + bytes([int(more)]) + body

    out = frame(b"", False)
    for msg in messages:
        out += b"".join(frame(body, i < len(msg) - 1) for i, body in enumerate(msg))
    return [out]


def zmtp30(messages: list[list[bytes]]) -> list[bytes]:
    """ZMTP/3.0 bytes: a greeting offering the NULL mechanism and READY as a DEALER
    (what a plain, unauthenticated ZeroMQ peer sends), then the messages."""
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    out = b""
    for msg in messages:
        for i, body in enumerate(msg):
            more = int(i < len(msg) - 1)
            if len(body) > 255:
                out += bytes([more | 2]) + struct.pack(">Q", len(body)) + body
            else:
                out += bytes([more, len(body)]) + body
    return [greeting + b"\x04" + bytes([len(ready)]) + ready, out]


def send_raw(address: str, chunks: list[bytes]) -> None:
    """Write ``chunks`` to the scheduler's port with a plain TCP socket, reading what
    comes back for a moment after each (libzmq takes the frames after a handshake
    only once it has sent its own part), as an attacker's script would."""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        for chunk in chunks:
            try:
                s.sendall(chunk)
                deadline = time.monotonic() + 0.3
                while (left := deadline - time.monotonic()) > 0:
                    s.settimeout(left)
                    if not s.recv(4096):
                        return  # the scheduler hung up: refused, the point
            except TimeoutError:
                continue
            except OSError:
                return


def send_as_dealer(address: str, messages: list[list[bytes]], keys=None) -> None:
    """Send ``messages`` from a zmq DEALER: plain, or with CURVE ``keys``
    (server_public, KeyPair); wait a moment for whatever answer comes."""
    ctx, sock = dealer(address, keys)
    try:
        for msg in messages:
            sock.send_multipart(msg)
        recv(sock, timeout=0.5)
    finally:
        sock.close(0)
        ctx.term()


# -- 1. fairness -------------------------------------------------------------------------------


def test_a_single_task_is_not_starved_by_another_clients_big_batch(shared_address):
    """Client A queues 2000 short tasks; client B, another program, submits one: B's
    result comes back in well under a second, while most of A's batch is still queued."""
    other = python(f"""
        import sys, time, farpool
        ex = farpool.Executor({shared_address!r}, heartbeat={HEARTBEAT})
        assert ex.submit(pow, 2, 3).result(timeout=30) == 8  # connected and warm
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.perf_counter()
        assert ex.submit(pow, 2, 10).result(timeout=30) == 1024
        print(time.perf_counter() - start, flush=True)
        ex.shutdown()
    """)
    ex = executor(shared_address)
    try:
        assert other.stdout.readline().strip() == "ready"
        batch = [ex.submit(nap, 0.005) for _ in range(2000)]
        wait_until(lambda: sum(f.done() for f in batch) >= 10, 30, "client A's batch running")
        other.stdin.write("go\n")
        other.stdin.flush()
        latency = float(other.stdout.readline())
        a_done = sum(f.done() for f in batch)
        # B waited for one task at most, not for A's queue (2000 x 5 ms on 2 workers).
        assert latency < 1.0, latency
        assert a_done < 1000, a_done
        assert other.wait(30) == 0
    finally:
        close(ex)
        if other.poll() is None:
            other.kill()
            other.wait(10)
        other.stdin.close()
        other.stdout.close()


# -- 2. a worker process dies under a task -----------------------------------------------------


def test_worker_process_sigkilled_mid_task(shared_address, tmp_path):
    """A worker process killed with SIGKILL mid-task: that future fails with WorkerLost
    naming the signal and the task; the other tasks complete; the worker daemon starts
    a new process, so status shows 2 workers again."""
    ex = executor(shared_address)
    try:
        victim = ex.submit(nap, 60, str(tmp_path / "victim.pid"))
        pid = read_pid(tmp_path / "victim.pid")
        others = [ex.submit(square, i) for i in range(20)]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(farpool.WorkerLost, match="SIGKILL") as info:
            victim.result(timeout=20)
        assert "nap" in str(info.value)
        assert [f.result(timeout=30) for f in others] == [i * i for i in range(20)]
        info = wait_for_workers(shared_address, 2)
        assert pid not in [w["pid"] for w in info["workers"]]
        assert ex.submit(square, 7).result(timeout=30) == 49
    finally:
        close(ex)


@pytest.mark.parametrize("crash, words", [
    ((crash_exit, 3), "exit code 3"),
    ((crash_segfault,), "SIGSEGV"),
])
def test_worker_process_crashing_in_a_task(shared_address, crash, words):
    """A task that ends its worker process (os._exit, a segfault) fails with WorkerLost
    saying how; tasks around it complete and the daemon replaces the process."""
    fn, *args = crash
    ex = executor(shared_address)
    try:
        before = [ex.submit(square, i) for i in range(10)]
        victim = ex.submit(fn, *args)
        after = [ex.submit(square, i) for i in range(10)]
        with pytest.raises(farpool.WorkerLost, match=words) as info:
            victim.result(timeout=30)
        assert fn.__name__ in str(info.value)
        assert [f.result(timeout=30) for f in before + after] == [i * i for i in range(10)] * 2
        wait_for_workers(shared_address, 2)
        assert ex.submit(square, 5).result(timeout=30) == 25
    finally:
        close(ex)


def test_retries_rerun_a_task_whose_worker_process_was_killed(shared_address, tmp_path):
    """With Executor(address, retries=1), a task whose worker process is SIGKILLed is
    run again, and its future gets the second run's result; one that kills its
    worker every time fails with WorkerLost after its second run."""
    ex = executor(shared_address, retries=1)
    try:
        marker = tmp_path / "killed-once"
        assert ex.submit(sigkill_once, str(marker)).result(timeout=30) == "second try"
        assert marker.exists()
        # A task that kills every worker it runs on is tried twice, then fails.
        runs = tmp_path / "runs"
        with pytest.raises(farpool.WorkerLost, match="exit code 5"):
            ex.submit(log_and_exit, str(runs), 5).result(timeout=30)
        assert runs.read_text() == "ran\nran\n"
    finally:
        close(ex)


# -- 3. a whole worker host dies ---------------------------------------------------------------


def test_worker_daemon_sigkilled(cluster, tmp_path):
    """The `farpool worker` supervisor is SIGKILLed: its worker processes exit by
    themselves (no orphans), the tasks they ran fail with WorkerLost within a few
    seconds (or, for a client that asked for retries, run again elsewhere), and the
    queued tasks are not lost: they run on the next worker daemon."""
    cluster.scheduler()
    host = cluster.worker(name="doomed")
    wait_for_workers(cluster.address, 2)
    ex = executor(cluster.address)
    patient = executor(cluster.address, retries=1)
    try:
        running = [ex.submit(nap, 60, str(tmp_path / "run.pid"))]
        running.append(patient.submit(nap_once, str(tmp_path / "once"), str(tmp_path / "once.pid")))
        pids = [read_pid(tmp_path / "run.pid"), read_pid(tmp_path / "once.pid")]
        queued = [ex.submit(square, i) for i in range(6)]
        wait_until(lambda: status(cluster.address)["queued"] == 6, 10, "6 tasks queued")
        start = time.monotonic()
        host.signal(signal.SIGKILL)
        host.wait(10)
        wait_until(lambda: not any(alive(p) for p in pids), 5, f"worker processes {pids} exit")
        with pytest.raises(farpool.WorkerLost, match="doomed"):
            running[0].result(timeout=15)
        assert time.monotonic() - start < 6
        assert not any(f.done() for f in queued)
        cluster.worker(name="rescuer")
        assert [f.result(timeout=30) for f in queued] == [i * i for i in range(6)]
        # The client that asked for retries gets its task rerun on the new host.
        assert running[1].result(timeout=30) == "second try"
    finally:
        close(ex)
        close(patient)


def test_worker_daemon_frozen_then_back(cluster, tmp_path):
    """A worker host that stops answering (its supervisor SIGSTOPped, as a hung host or
    a cut network looks): the task it ran fails with WorkerLost within a few seconds;
    when it answers again it rejoins with fresh worker processes and takes work."""
    cluster.scheduler()
    host = cluster.worker(name="frozen", nprocs=1)
    wait_for_workers(cluster.address, 1)
    ex = executor(cluster.address)
    try:
        victim = ex.submit(nap, 60, str(tmp_path / "victim.pid"))
        old = read_pid(tmp_path / "victim.pid")
        host.signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(farpool.WorkerLost, match="frozen"):
                victim.result(timeout=15)
            assert time.monotonic() - start < 5
            later = ex.submit(square, 6)
        finally:
            host.signal(signal.SIGCONT)
        assert later.result(timeout=30) == 36
        info = wait_for_workers(cluster.address, 1)
        assert info["workers"][0]["pid"] != old
        wait_until(lambda: not alive(old), 5, "the old worker process exit")
    finally:
        close(ex)


# -- 4. the scheduler dies ---------------------------------------------------------------------


def restartable(cluster, nprocs):
    """A scheduler on a fixed port (to start again there) and a worker host of
    ``nprocs`` processes: the address to bind, and the scheduler's daemon."""
    bind = f"tcp://127.0.0.1:{free_port()}"
    first = cluster.scheduler(bind=bind)
    cluster.worker(nprocs=nprocs)
    wait_for_workers(cluster.address, nprocs)
    return bind, first


def test_scheduler_killed_and_restarted_on_the_same_port(cluster):
    """The scheduler is SIGKILLed and started again on the same address: the client's
    pending futures are resubmitted and complete, and the worker daemon rejoins."""
    bind = f"tcp://127.0.0.1:{free_port()}"
    first = cluster.scheduler(bind=bind)
    cluster.worker()
    wait_for_workers(cluster.address, 2)
    ex = executor(cluster.address, reconnect_timeout=10)
    try:
        futures = [ex.submit(log_run, os.devnull, i, 0.2) for i in range(10)]
        wait_until(lambda: status(cluster.address)["running"] > 0, 10, "tasks running")
        first.signal(signal.SIGKILL)
        first.wait(10)
        assert not all(f.done() for f in futures)
        time.sleep(0.5)
        cluster.scheduler(bind=bind)
        assert [f.result(timeout=40) for f in futures] == list(range(10))
        wait_for_workers(cluster.address, 2)
        assert ex.submit(square, 4).result(timeout=30) == 16
    finally:
        close(ex)


def test_a_scheduler_restart_keeps_the_work_that_was_done(cluster, tmp_path):
    """The scheduler is SIGKILLed while 2 tasks run and 2 more wait; the running ones
    finish during the 2 s outage. After the restart, every future gets its answer and
    no task ran twice (a marker file counts the runs): finished results are kept, the
    worker processes are not restarted, and what was still queued runs once."""
    bind, first = restartable(cluster, nprocs=2)
    pids = {w["pid"] for w in status(cluster.address)["workers"]}
    runs = tmp_path / "runs"
    ex = executor(cluster.address, reconnect_timeout=20)
    try:
        futures = [ex.submit(log_run, runs, i, 1.0) for i in range(4)]
        wait_until(lambda: len(runs.read_text().split()) == 2 if runs.exists() else False, 10,
                   "2 tasks running")
        first.signal(signal.SIGKILL)
        first.wait(10)
        time.sleep(2.0)  # the 2 running tasks finish while no scheduler is there
        assert len(runs.read_text().split()) == 2
        cluster.scheduler(bind=bind)
        assert [f.result(timeout=40) for f in futures] == list(range(4))
        assert sorted(int(x) for x in runs.read_text().split()) == list(range(4)), \
            "a task ran twice"
        info = wait_for_workers(cluster.address, 2)
        assert {w["pid"] for w in info["workers"]} == pids  # the same processes
        assert ex.submit(square, 4).result(timeout=30) == 16
    finally:
        close(ex)


def test_a_task_still_running_at_a_scheduler_restart_runs_once(cluster, tmp_path):
    """A task that runs through the outage and beyond: its resubmission waits for the
    worker that runs it instead of running it again elsewhere, though a worker idles."""
    bind, first = restartable(cluster, nprocs=2)
    runs = tmp_path / "runs"
    ex = executor(cluster.address, reconnect_timeout=20)
    try:
        long = ex.submit(log_run, runs, 7, 4.0)
        wait_until(lambda: runs.exists(), 10, "the task running")
        first.signal(signal.SIGKILL)
        first.wait(10)
        time.sleep(0.5)
        cluster.scheduler(bind=bind)
        assert long.result(timeout=40) == 7
        assert runs.read_text().split() == ["7"], "the task ran twice"
    finally:
        close(ex)


def test_a_scheduler_stopped_with_sigterm_drains_and_a_restart_runs_the_rest(cluster, tmp_path):
    """`systemctl restart` of the scheduler: SIGTERM lets the running task report (its
    future gets the value) and sends out nothing more; the scheduler exits 0 with a
    "drained" line. The task that was still queued runs, once, on the next scheduler."""
    bind, first = restartable(cluster, nprocs=1)
    runs = tmp_path / "runs"
    ex = executor(cluster.address, reconnect_timeout=20)
    try:
        running = ex.submit(log_run, runs, 1, 1.5)
        queued = ex.submit(log_run, runs, 2, 0.0)
        wait_until(runs.exists, 10, "the first task running")
        first.signal(signal.SIGTERM)
        assert running.result(timeout=10) == 1
        assert first.wait(10) == 0
        assert "drained: every task sent out has reported" in first.log.read_text()
        assert not queued.done() and runs.read_text().split() == ["1"]
        cluster.scheduler(bind=bind)
        assert queued.result(timeout=30) == 2
        assert runs.read_text().split() == ["1", "2"]
    finally:
        close(ex)


def test_a_second_sigterm_stops_a_draining_daemon_at_once(cluster, tmp_path):
    cluster.scheduler()
    host = cluster.worker(nprocs=1)
    wait_for_workers(cluster.address, 1)
    ex = executor(cluster.address)
    try:
        long = ex.submit(nap, 60, str(tmp_path / "pid"))
        read_pid(tmp_path / "pid")
        host.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert host.proc.poll() is None  # draining: its task may take 30 s
        started = time.monotonic()
        host.signal(signal.SIGTERM)
        assert host.wait(5) == 0
        assert time.monotonic() - started < 5
        with pytest.raises(farpool.WorkerLost):
            long.result(timeout=10)
        assert "1 task(s) cut short" in host.log.read_text()
    finally:
        close(ex)


def test_scheduler_killed_for_good(cluster):
    """The scheduler is SIGKILLed and never comes back: pending futures fail with
    SchedulerLost within heartbeat detection plus reconnect_timeout; nothing hangs,
    the executor refuses new work with the same error, and a new one says that no
    scheduler answers."""
    first = cluster.scheduler()
    cluster.worker()
    wait_for_workers(cluster.address, 2)
    ex = executor(cluster.address, reconnect_timeout=1)
    try:
        futures = [ex.submit(nap, 5) for _ in range(4)]
        wait_until(lambda: status(cluster.address)["running"] > 0, 10, "tasks running")
        start = time.monotonic()
        first.signal(signal.SIGKILL)
        first.wait(10)
        for future in futures:
            with pytest.raises(SchedulerLost, match="has not answered"):
                future.result(timeout=20)
        assert time.monotonic() - start < 6
        with pytest.raises(SchedulerLost):
            ex.submit(square, 1)
    finally:
        close(ex)
    # A new executor at that address says nobody answers, after its connect_timeout.
    start = time.monotonic()
    with pytest.raises(SchedulerLost, match="no farpool scheduler answered"):
        executor(cluster.address, connect_timeout=1)
    assert time.monotonic() - start < 3


def test_peers_with_a_slower_heartbeat_than_the_scheduler(cluster, tmp_path):
    """A scheduler started with --heartbeat 0.2 and a worker daemon and a client left at
    their default (1 s): neither is taken for lost while it is merely quiet, so a job
    of a few seconds runs every task exactly once and fails none."""
    cluster.scheduler()
    cluster.worker(heartbeat=1.0)
    wait_for_workers(cluster.address, 2)
    runs = tmp_path / "runs"
    with farpool.Executor(cluster.address) as ex:
        assert list(ex.map(log_run, [runs] * 16, range(16), [0.4] * 16)) == list(range(16))
    assert sorted(int(x) for x in runs.read_text().split()) == list(range(16))
    info = status(cluster.address)
    assert not info.get("clients_timed_out") and not info.get("supervisors_timed_out"), info


# -- 5. unauthenticated peers ------------------------------------------------------------------


def test_raw_attacks_work_against_an_insecure_scheduler(cluster, tmp_path):
    """Control for the next test: against a scheduler started with --insecure, each of
    the three attacks does create its file (so their payloads are real ones)."""
    cluster.scheduler(extra=("--insecure",))
    cluster.worker(nprocs=1, extra=("--insecure",))
    wait_until(lambda: query_status(cluster.address)["workers"], 30, "an insecure worker attached")
    messages = attack_messages(tmp_path / "zmtp10")
    send_raw(cluster.address, zmtp10(messages))
    wait_until((tmp_path / "zmtp10").exists, 10, "the ZMTP/1.0 payload unpickled")
    send_raw(cluster.address, zmtp30(attack_messages(tmp_path / "zmtp30")))
    wait_until((tmp_path / "zmtp30").exists, 10, "the ZMTP/3.0 payload unpickled")
    send_as_dealer(cluster.address, attack_messages(tmp_path / "dealer"))
    wait_until((tmp_path / "dealer").exists, 10, "the DEALER payload unpickled")


def test_unauthenticated_peers_never_get_a_pickle_loaded(shared_address, tmp_path, monkeypatch):
    """No key, a wrong key, raw ZMTP bytes and a plain zmq socket: construction fails
    with SecurityError saying what is wrong, and whatever those peers send is never
    unpickled: the file their payload would create never appears; the scheduler goes
    on serving a good client."""
    marker = tmp_path / "pwned"
    # (a) no keys on this "host": the client says so before it sends anything.
    empty = tmp_path / "empty-keys"
    empty.mkdir(mode=0o700)
    with monkeypatch.context() as m:
        m.setenv("FARPOOL_KEY_DIR", str(empty))
        with pytest.raises(SecurityError, match="no farpool keys"):
            executor(shared_address)
    with pytest.raises(SecurityError):
        executor(shared_address, key_file=str(tmp_path / "nowhere.key"))
    # (b) a key file made for another scheduler, or a client key never authorized.
    server_public, _ = client_keys()
    other = write_key_file(tmp_path / "other.key", KeyPair.generate().public, KeyPair.generate())
    stranger = write_key_file(tmp_path / "stranger.key", server_public, KeyPair.generate())
    with pytest.raises(SecurityError, match="server public key is probably wrong"):
        executor(shared_address, key_file=str(other), connect_timeout=2)
    with pytest.raises(SecurityError, match="refused this host's key"):
        executor(shared_address, key_file=str(stranger), connect_timeout=2)
    # The same keys driving a socket by hand, sending the payload regardless.
    payload = attack_messages(marker)
    send_as_dealer(shared_address, payload, keys=(server_public, KeyPair.generate()))
    send_as_dealer(shared_address, payload, keys=(KeyPair.generate().public, KeyPair.generate()))
    # (c) raw ZMTP bytes on a plain TCP socket, and a zmq socket without CURVE.
    send_raw(shared_address, zmtp10(payload))
    send_raw(shared_address, zmtp30(payload))
    send_as_dealer(shared_address, payload)
    time.sleep(1.0)  # a payload that got through would have reached a worker by now
    assert not marker.exists()
    ex = executor(shared_address)
    try:
        assert list(ex.map(square, range(10))) == [i * i for i in range(10)]
    finally:
        close(ex)
    assert not marker.exists()


# -- 6. garbage from an authenticated peer -----------------------------------------------------


def test_garbage_frames_are_counted_and_dropped(shared_address):
    """An authenticated peer throws random bytes, truncated msgpack, a header of
    protocol version 999, unknown kinds and TASKS whose frame counts lie: the
    scheduler counts each as malformed, drops it, and a real job still completes."""
    hello = client_hello()[0]
    key = b"k" * 16
    garbage = [
        [os.urandom(64)],
        [hello[:-5]],  # truncated msgpack
        [b""],
        [b"\xdd\xff\xff\xff\xff"],  # an array "of 4 billion items", then nothing
        [msgpack.packb({"not": "a list"})],
        [msgpack.packb([999, int(Kind.HELLO), [{}]])],  # a future protocol version
        [msgpack.packb([protocol.PROTOCOL_VERSION, 99, []])],  # unknown kind
        [msgpack.packb([protocol.PROTOCOL_VERSION, int(Kind.TASKS), "body"])],
        # TASKS whose header counts 1 + 3 frames, carrying 2
        [msgpack.packb([protocol.PROTOCOL_VERSION, int(Kind.TASKS), [[[1, key, 1, 3]]]]), b"fn", b"arg"],
        [msgpack.packb([protocol.PROTOCOL_VERSION, int(Kind.TASKS), [[[1, key, 0, 0]]]]), b"extra"],
        [msgpack.packb([protocol.PROTOCOL_VERSION, int(Kind.TASKS), [[["not", "an", "entry"]]]])],
        [msgpack.packb([protocol.PROTOCOL_VERSION, int(Kind.HEARTBEAT), []]), b"unexpected payload"],
    ]
    as_client = [  # once it is a known client: messages a client may not send
        [msgpack.packb([protocol.PROTOCOL_VERSION, int(Kind.RESULTS), [[[1, 0, 0, 0.0]]]])],
        [msgpack.packb([protocol.PROTOCOL_VERSION, int(Kind.LOST), [{"worker": b"x", "how": "?"}]])],
        [msgpack.packb([protocol.PROTOCOL_VERSION, int(Kind.TASKS), [[[1, key, 1, 1]]]]), b"fn"],  # lies too
    ]
    before = status(shared_address).get("malformed", 0)
    ctx, sock = dealer(shared_address, keys=client_keys())
    try:
        for msg in garbage:
            sock.send_multipart(msg)
        sock.send_multipart(client_hello())
        assert recv(sock).kind is Kind.WELCOME
        for msg in as_client:
            sock.send_multipart(msg)
        expected = before + len(garbage) + len(as_client)
        wait_until(lambda: status(shared_address).get("malformed", 0) >= expected, 10,
                   "the garbage counted")
        assert status(shared_address)["malformed"] == expected
    finally:
        sock.close(0)
        ctx.term()
    ex = executor(shared_address)
    try:
        assert list(ex.map(square, range(20))) == [i * i for i in range(20)]
    finally:
        close(ex)


def test_a_function_key_that_is_not_its_blobs_digest_is_rejected(shared_address):
    """Workers share function blobs between clients by key, so a client may not name a
    blob with another function's key: such a task comes back REJECTED, and it runs
    nothing."""
    import cloudpickle

    blob = cloudpickle.dumps(square)
    someone_elses_key = hashlib.blake2b(cloudpickle.dumps(pow), digest_size=16).digest()
    args = pickle.dumps(((3,), {}))
    ctx, sock = dealer(shared_address, keys=client_keys())
    try:
        sock.send_multipart(client_hello())
        assert recv(sock).kind is Kind.WELCOME
        sock.send_multipart(protocol.encode(Kind.TASKS, [[[1, someone_elses_key, 1, 1]]], [blob, args]))
        msg = recv(sock)
        assert msg is not None and msg.kind is Kind.RESULTS
        (entry,) = msg.body[0]
        assert entry.status == protocol.Status.REJECTED
        assert b"digest" in msg.frames[0]
        right_key = hashlib.blake2b(blob, digest_size=16).digest()
        sock.send_multipart(protocol.encode(Kind.TASKS, [[[2, right_key, 1, 1]]], [blob, args]))
        msg = recv(sock, timeout=30)
        assert msg.body[0][0].status == protocol.Status.OK and pickle.loads(msg.frames[0]) == 9
    finally:
        sock.close(0)
        ctx.term()


# -- 7. versions -------------------------------------------------------------------------------


def test_version_mismatch_is_refused_with_the_versions_named(shared_address, monkeypatch):
    """A client or worker whose HELLO claims another cloudpickle or Python version is
    refused, and the message names both versions; an Executor in that situation
    raises VersionMismatch at construction."""
    ctx, sock = dealer(shared_address, keys=client_keys())
    try:
        sock.send_multipart(client_hello(cloudpickle="0.1.0", python="2.7"))
        refused = recv(sock)
        assert refused is not None and refused.kind is Kind.REFUSE
        reason = refused.body[0]
        assert (f"cloudpickle 0.1.0 on the connecting side, {cloudpickle.__version__} on the scheduler"
                in reason)
        ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
        assert f"python 2.7 on the connecting side, {ours} on the scheduler" in reason
        sock.send_multipart(client_hello(role="worker", slots=1, farpool="99.0"))
        refused = recv(sock)
        assert refused is not None and refused.kind is Kind.REFUSE
        assert (f"farpool 99.0 on the connecting side, {farpool.__version__} on the scheduler"
                in refused.body[0])
    finally:
        sock.close(0)
        ctx.term()
    real = protocol.version_info
    monkeypatch.setattr(protocol, "version_info", lambda: {**real(), "cloudpickle": "9.9.9"})
    with pytest.raises(VersionMismatch, match=r"cloudpickle 9\.9\.9 on the connecting side"):
        executor(shared_address)


# -- 8. a worker daemon stopped with SIGTERM ---------------------------------------------------


def test_worker_daemon_sigterm_finishes_running_task_and_hands_back_the_rest(cluster, tmp_path):
    """`farpool worker` gets SIGTERM while a task runs: that task finishes with its
    result, the tasks it had been handed but not started go back to the scheduler and
    run on another worker daemon, and the daemon exits with code 0."""
    cluster.scheduler()
    first = cluster.worker(name="first", nprocs=1)
    wait_for_workers(cluster.address, 1)
    ex = executor(cluster.address)
    try:
        # Teach the scheduler that nap is short, so the worker is handed tasks ahead.
        list(ex.map(nap, [0] * 30))
        long = ex.submit(nap, 2.0, str(tmp_path / "long.pid"))
        rest = [ex.submit(nap, 0) for _ in range(30)]
        first_pid = read_pid(tmp_path / "long.pid")
        held = sum(w["held"] for w in status(cluster.address)["workers"])
        first.signal(signal.SIGTERM)
        cluster.worker(name="second", nprocs=1)
        assert long.result(timeout=30) == first_pid
        pids = [f.result(timeout=30) for f in rest]
        assert first.wait(20) == 0
        elsewhere = sum(p != first_pid for p in pids)
        assert held > 2 and elsewhere == len(rest), (held, collections.Counter(pids))
    finally:
        close(ex)


def test_cancel_reaches_tasks_a_worker_holds_but_has_not_begun(cluster, tmp_path):
    """shutdown(cancel_futures=True) cancels the tasks that have not started, even those
    the scheduler already handed ahead to a worker: the worker drops them, their futures
    are cancelled, and they never run; the running task finishes."""
    cluster.scheduler()
    cluster.worker(nprocs=1)
    wait_for_workers(cluster.address, 1)
    ran = tmp_path / "ran.txt"
    ex = executor(cluster.address)
    try:
        list(ex.map(log_run, [str(tmp_path / "warmup.txt")] * 30, range(30), [0] * 30))  # known short
        first = ex.submit(log_run, str(ran), "first", 1.0)
        rest = [ex.submit(log_run, str(ran), i, 0) for i in range(20)]
        wait_until(lambda: ran.exists(), 10, "the first task to start")
        held = sum(w["held"] for w in status(cluster.address)["workers"])
        ex.shutdown(wait=True, cancel_futures=True)
        assert first.result(timeout=1) == "first"
        cancelled = [f for f in rest if f.cancelled()]
        assert held > 2 and len(cancelled) >= held - 1, (held, len(cancelled))
        ran_ids = ran.read_text().split()
        assert all(str(i) not in ran_ids for i, f in enumerate(rest) if f.cancelled())
    finally:
        close(ex)


def test_worker_daemon_sigterm_after_its_scheduler_died(cluster):
    """The scheduler is killed, then its worker daemon gets SIGTERM before it has
    noticed: with nobody to hand work back to, it exits promptly (code 0), rather
    than waiting out its whole drain grace period."""
    scheduler = cluster.scheduler()
    worker = cluster.worker()
    wait_for_workers(cluster.address, 2)
    pids = worker_pids(cluster.address)
    scheduler.signal(signal.SIGKILL)
    scheduler.wait(10)
    worker.signal(signal.SIGTERM)
    start = time.monotonic()
    assert worker.wait(10) == 0
    assert time.monotonic() - start < 5
    wait_until(lambda: not any(alive(p) for p in pids), 5, f"worker processes {pids} exit")


# -- 9. max tasks per child --------------------------------------------------------------------


def test_worker_daemon_max_tasks_per_child(cluster):
    """`farpool worker --max-tasks-per-child 2`: every worker process runs exactly two
    tasks, then a fresh one takes over; all results are right."""
    cluster.scheduler()
    cluster.worker(nprocs=1, extra=("--max-tasks-per-child", "2"))
    wait_for_workers(cluster.address, 1)
    ex = executor(cluster.address)
    try:
        results = list(ex.map(pid_and_square, range(10)))
    finally:
        close(ex)
    assert [sq for _, sq in results] == [i * i for i in range(10)]
    counts = collections.Counter(pid for pid, _ in results)
    assert sorted(counts.values()) == [2] * 5, counts


# -- 10. farpool status ------------------------------------------------------------------------


def test_status_command(shared_address):
    """`farpool status ADDRESS` prints the workers, slots and task counts; at an
    address where nothing answers it exits non-zero and says so."""
    env = _cluster_env(dict(os.environ))
    cmd = [sys.executable, "-m", "farpool", "status"]
    out = subprocess.run([*cmd, shared_address], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^clients \d+\s+workers 2\s+slots 2$", out.stdout, re.M), out.stdout
    assert re.search(r"^tasks: queued \d+\s+running \d+\s+done \d+$", out.stdout, re.M), out.stdout
    assert "host shared: 2 worker processes" in out.stdout
    # Clients and worker processes are named for people; counters say what they count.
    with farpool.Executor(shared_address, name="nightly-report") as ex:
        held = ex.submit(nap, 3)
        out = subprocess.run([*cmd, shared_address], capture_output=True, text=True, env=env,
                             timeout=30)
        info = json.loads(subprocess.run([*cmd, shared_address, "--json"], capture_output=True,
                                         text=True, env=env, timeout=30).stdout)
        held.cancel()
    assert "client nightly-report: 1 unfinished task(s)" in out.stdout, out.stdout
    assert [c["name"] for c in info["client_list"]] == ["nightly-report"]
    assert all(re.fullmatch(r"shared pid \d+", w["name"]) for w in info["workers"]), info
    for line in out.stdout.splitlines():
        if line.startswith("  unknown ") or line.startswith("  refused "):
            assert ": " in line, line  # explained
    nobody = f"tcp://127.0.0.1:{free_port()}"
    out = subprocess.run([*cmd, nobody, "--timeout", "1"], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode != 0
    assert f"no answer from {nobody} within 1 s" in out.stderr
    assert out.stdout == ""


# -- 11. farpool cluster -----------------------------------------------------------------------


def test_cluster_command(key_dir, tmp_path):
    """`farpool cluster --workers 2 --bind ...` runs a scheduler and two workers in one
    command; a client runs a job through it; SIGTERM stops it, leaving no process."""
    bind = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(["cluster", "--workers", "2", "--bind", bind], tmp_path / "cluster.log")
    try:
        line = daemon.read_line()
        assert line.endswith(bind), line
        address = line.split()[-1]
        wait_for_workers(address, 2)
        pids = worker_pids(address)
        with farpool.Executor(address) as ex:
            assert list(ex.map(square, range(50))) == [i * i for i in range(50)]
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        wait_until(lambda: not any(alive(p) for p in pids), 5, f"worker processes {pids} exit")
    finally:
        daemon.stop()


# -- 12. a client dies -------------------------------------------------------------------------


def test_killed_client_has_its_queued_tasks_dropped(shared_address):
    """A client program SIGKILLed with tasks queued: the scheduler drops them within a
    few seconds (status shows 0 queued) and serves the next client at once."""
    doomed = python(f"""
        import time, farpool, test_remote
        ex = farpool.Executor({shared_address!r}, heartbeat={HEARTBEAT})
        futures = [ex.submit(test_remote.nap, 0.05) for _ in range(400)]
        print("submitted", flush=True)
        time.sleep(60)
    """)
    try:
        assert doomed.stdout.readline().strip() == "submitted"
        wait_until(lambda: status(shared_address)["queued"] > 100, 10, "the client's tasks queued")
        doomed.kill()
        doomed.wait(10)
        start = time.monotonic()
        wait_until(lambda: status(shared_address)["queued"] == 0, 5, "the queued tasks dropped")
        assert time.monotonic() - start < 4
    finally:
        doomed.kill()
        doomed.wait(10)
        doomed.stdin.close()
        doomed.stdout.close()
    ex = executor(shared_address)
    try:
        start = time.monotonic()
        assert ex.submit(square, 9).result(timeout=10) == 81
        assert time.monotonic() - start < 2
    finally:
        close(ex)


def test_interpreter_exit_finishes_pending_remote_work_without_shutdown(shared_address, tmp_path):
    """A script that submits to a scheduler and ends without shutdown() still gets its
    queued tasks run before it exits, as with the stdlib's pools (the exit hook the
    local pools use holds the remote client too)."""
    done = tmp_path / "done"
    code = f"""
        import farpool, pathlib, time
        def mark(path):
            time.sleep(0.5)
            pathlib.Path(path).write_text("ran")
        ex = farpool.Executor({shared_address!r}, heartbeat={HEARTBEAT!r})
        ex.submit(mark, {str(done)!r})
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert done.read_text() == "ran"


def test_a_hello_with_an_unknown_role_is_refused_and_the_scheduler_goes_on(shared_address):
    """A peer holding a valid key says HELLO as no role the scheduler knows (a word, a
    list): it is refused, naming the role, and the scheduler still serves a client."""
    ctx, sock = dealer(shared_address, keys=client_keys())
    try:
        for role in ("admin", ["worker"], None):
            sock.send_multipart(client_hello(role=role))
            refused = recv(sock)
            assert refused is not None and refused.kind is Kind.REFUSE
            assert "unknown role" in refused.body[0]
    finally:
        sock.close(0)
        ctx.term()
    with executor(shared_address) as ex:
        assert ex.submit(pow, 2, 5).result(timeout=30) == 32


@pytest.mark.parametrize("duration", [float("nan"), float("inf")])
def test_a_worker_reporting_a_nan_duration_is_dropped_and_the_scheduler_goes_on(cluster, duration):
    """A peer with a valid key poses as a worker and answers a task with a duration of
    NaN or infinity. Before, that stopped `farpool scheduler` (the run-time average
    became NaN, and int() of it raised). Now the scheduler drops that worker (its task
    fails with WorkerLost, as for any lost worker) and serves on."""
    scheduler = cluster.scheduler()
    address = cluster.address
    ctx, fake = dealer(address, keys=client_keys())
    try:
        hello = {"role": "worker", "pid": 4242, "slots": 1, **protocol.version_info()}
        fake.send_multipart(protocol.encode(Kind.HELLO, [hello]))
        with executor(address) as ex:
            victim = ex.submit(pow, 2, 3)
            got = recv(fake, timeout=10)
            assert got is not None and got.kind is Kind.TASKS
            [entry] = got.body[0]
            result = serialize.dumps(8)
            fake.send_multipart(protocol.encode(Kind.RESULTS, [[[entry.task_id, 0, len(result), duration]]],
                                                result))
            with pytest.raises(farpool.WorkerLost, match="malformed"):
                victim.result(timeout=15)
            cluster.worker(name="real")
            assert ex.submit(pow, 2, 5).result(timeout=30) == 32
        assert scheduler.proc.poll() is None  # the scheduler is still up
    finally:
        fake.close(0)
        ctx.term()


def test_peer_supplied_names_cannot_reach_the_operators_terminal_raw(cluster):
    """A peer with a valid key says HELLO as a worker host named with a terminal escape
    sequence. `farpool status` shows the escape as text, `--json` works, and a name
    that is not text at all is refused without harm."""
    scheduler = cluster.scheduler()
    address = cluster.address
    ctx, fake = dealer(address, keys=client_keys())
    try:
        hello = {"role": "supervisor", "pid": 4242, "name": "evil\x1b[2J\x07host",
                 "hello": 1, **protocol.version_info()}
        fake.send_multipart(protocol.encode(Kind.HELLO, [hello]))
        assert recv(fake, timeout=10).kind is Kind.WELCOME
        env = _cluster_env(dict(os.environ))
        cmd = [sys.executable, "-m", "farpool", "status", address]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout
        assert r"host evil\x1b[2J\x07host: 0 worker processes" in out.stdout
        out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        # Peer-supplied names reach reports and logs with control characters escaped.
        assert json.loads(out.stdout)["supervisors"][0]["name"] == r"evil\x1b[2J\x07host"
        ctx2, other = dealer(address, keys=client_keys())
        try:
            other.send_multipart(protocol.encode(Kind.HELLO, [{**hello, "name": b"\xff\xfe"}]))
            assert recv(other, timeout=1) is None  # dropped as malformed
        finally:
            other.close(0)
            ctx2.term()
        out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        assert scheduler.proc.poll() is None
    finally:
        fake.close(0)
        ctx.term()


def interrupted_nap(seconds, pidfile):
    """nap, but saying how it ended: a KeyboardInterrupt here would have reached the
    client program as the task's exception (and ended it with 130)."""
    try:
        return nap(seconds, pidfile)
    except KeyboardInterrupt:
        return "interrupted"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signalling_a_worker_hosts_whole_process_group_drains_it(cluster, tmp_path, sig):
    """systemd (KillMode=control-group), scancel and a terminal's Ctrl-C signal every
    process of the worker host's group, worker processes included. Before, those died
    of SIGTERM (their tasks failed with WorkerLost) or raised KeyboardInterrupt into
    the task. Now the running task finishes with its result and the daemon drains and
    exits 0; a task that starts a program can still stop it with SIGTERM."""
    cluster.scheduler()
    host = cluster.worker(name="host", nprocs=1, new_session=True)
    wait_for_workers(cluster.address, 1)
    ex = executor(cluster.address)
    try:
        running = ex.submit(interrupted_nap, 1.5, str(tmp_path / "running.pid"))
        worker_pid = read_pid(tmp_path / "running.pid")
        os.killpg(host.pid, sig)
        assert running.result(timeout=30) == worker_pid
        assert host.wait(30) == 0
        assert not alive(worker_pid)
    finally:
        close(ex)


def start_and_terminate_a_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.terminate()
    return child.wait(10)


def test_a_task_can_still_terminate_the_programs_it_starts(shared_address):
    with executor(shared_address) as ex:
        assert ex.submit(start_and_terminate_a_child).result(timeout=60) == -signal.SIGTERM
