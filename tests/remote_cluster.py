"""Real farpool scheduler and worker daemons for the tests, on loopback with CURVE.

``Daemon`` runs one ``python -m farpool ...`` command as a child of the test (the
test stops it; the leak check sees it gone). ``start_session_cluster`` runs a
scheduler and a worker daemon under a detached keeper (see engine_clusters), shared
by the contract tests of a whole session.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine_clusters import Keeper, _cluster_env
from farpool.daemons import query_status
from farpool.security import client_keys

HEARTBEAT = 0.2  # seconds: a lost peer is noticed after 5 of them


class Daemon:
    """``python -m farpool ARGS`` as a child process; stderr goes to ``log``."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, *,
                 new_session: bool = False) -> None:
        self.log = log
        self.args = args
        # Its temporary files (a worker daemon's state records) go under the test's
        # own directory: a daemon a test kills with SIGKILL cannot remove them.
        tmp = log.parent / "tmp"
        tmp.mkdir(exist_ok=True)
        env = {**_cluster_env(env or dict(os.environ)), "TMPDIR": str(tmp)}
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "farpool", *args],
                                         stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=new_session)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_line(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"`farpool {' '.join(self.args)}` printed nothing; its log:\n"
                               f"{self.log.read_text()[-3000:]}")
        return line.strip()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        if code is None:
            self.signal(signal.SIGKILL)
            code = self.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def start_scheduler(log_dir: Path, *, bind: str = "tcp://127.0.0.1:0", heartbeat: float = HEARTBEAT,
                    extra: tuple[str, ...] = ()) -> tuple[Daemon, str]:
    """A scheduler daemon and the address it serves."""
    daemon = Daemon(["scheduler", "--bind", bind, "--heartbeat", str(heartbeat), *extra],
                    log_dir / "scheduler.log")
    line = daemon.read_line()
    return daemon, line.split()[-1]


def start_worker(address: str, log_dir: Path, *, nprocs: int = 2, heartbeat: float = HEARTBEAT,
                 extra: tuple[str, ...] = (), name: str = "worker", new_session: bool = False) -> Daemon:
    """``new_session``: the daemon leads a process group of its own (as under systemd
    or Slurm), which a test may signal as a whole."""
    return Daemon(["worker", address, "--nprocs", str(nprocs), "--heartbeat", str(heartbeat),
                   "--name", name, *extra], log_dir / f"{name}.log", new_session=new_session)


def status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    curve = client_keys() if address.startswith("tcp://") else None
    return query_status(address, curve=curve, timeout=timeout)


def wait_for_workers(address: str, count: int, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until exactly ``count`` worker processes are attached; the last status."""
    deadline = time.monotonic() + timeout
    while True:
        info = status(address)
        if len(info["workers"]) == count:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(info['workers'])} workers attached, not {count}: {info}")
        time.sleep(0.1)


# The keeper of a session cluster: a scheduler and a worker daemon with 2 processes.
_FARPOOL_KEEPER = """
import os, subprocess, sys, time
from farpool.daemons import query_status
from farpool.security import client_keys
py = sys.executable
sched = subprocess.Popen([py, "-m", "farpool", "scheduler", "--bind", sys.argv[1],
                          "--heartbeat", "0.5"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
address = sched.stdout.readline().decode().split()[-1]
worker = subprocess.Popen([py, "-m", "farpool", "worker", address, "--nprocs", "2",
                           "--heartbeat", "0.5", "--name", "session"], stdin=subprocess.DEVNULL)
deadline = time.monotonic() + 60
curve = client_keys() if address.startswith("tcp://") else None
while len(query_status(address, curve=curve)["workers"]) < 2:
    if time.monotonic() > deadline:
        os.killpg(0, 9)
    time.sleep(0.1)
print(address, flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
sys.stdin.buffer.read()  # until pytest closes the lifeline
try:
    worker.terminate()
    worker.wait(30)
    sched.terminate()
    sched.wait(10)
finally:
    os.killpg(0, 9)
"""


def start_session_cluster(log: Path, bind: str = "tcp://127.0.0.1:0") -> Keeper:
    """Scheduler on ``bind`` + 2 worker processes, detached; ``keeper.line`` is the address."""
    return Keeper(_FARPOOL_KEEPER, [bind], _cluster_env(dict(os.environ)), log)
