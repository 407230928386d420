"""Real Dask and Ray clusters for the test session, run as detached daemons.

Each cluster runs under a "keeper" process that is not a child of pytest (a short
launcher starts it in its own session and exits), so the per-test leak checks,
which look at pytest's own children, see only what a test itself left behind, even
for the test that happens to start the cluster. The keeper holds the read end of a
pipe whose write end only pytest has: when pytest closes it (or dies), the keeper
stops the cluster and then kills its whole process group, so nothing outlives the
session.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

START_TIMEOUT = 120
STOP_TIMEOUT = 60

# Runs in the launcher: start the keeper in a new session, print its pid, exit.
_LAUNCH = (
    "import subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
)

# The keeper of a Dask cluster: a LocalCluster (scheduler in the keeper, 2 worker
# processes with a nanny each, so a crashed worker is replaced). Workers import what
# the test modules import as they start, so a test's first task is not slowed by it.
_DASK_KEEPER = """
import os, sys
from distributed import LocalCluster
cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                       dashboard_address="127.0.0.1:0", host="127.0.0.1",
                       preload=["pytest", "farpool"])
print(cluster.scheduler_address, flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
sys.stdin.buffer.read()  # until pytest closes the lifeline
try:
    cluster.close(timeout=30)
finally:
    os.killpg(0, 9)
"""

# The keeper of a Ray cluster: `ray start --head --block` as its child.
_RAY_KEEPER = """
import os, socket, subprocess, sys, time
ray_bin, gcs_port, client_port = sys.argv[1:4]
head = subprocess.Popen(
    [ray_bin, "start", "--head", "--block", "--port", gcs_port,
     "--ray-client-server-port", client_port, "--num-cpus", "2", "--include-dashboard", "false",
     "--disable-usage-stats", "--object-store-memory", str(300 * 2**20)],
    stdin=subprocess.DEVNULL, stdout=sys.stderr)
deadline = time.monotonic() + 110
while True:  # the client server starts last: once it listens, the cluster is up
    try:
        socket.create_connection(("127.0.0.1", int(client_port)), 0.5).close()
        break
    except OSError:
        if head.poll() is not None or time.monotonic() > deadline:
            os.killpg(0, 9)
        time.sleep(0.2)
print(f"127.0.0.1:{gcs_port} ray://127.0.0.1:{client_port}", flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
sys.stdin.buffer.read()  # until pytest closes the lifeline
try:
    head.terminate()  # `ray start --block` stops the processes it started
    head.wait(30)
finally:
    os.killpg(0, 9)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int, int]]:
    """Live processes: pid -> (parent pid, process group, start time)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                found[int(entry)] = stat
    return found


def _stat(pid: int) -> tuple[int, int, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":  # a zombie awaiting its reaper has ended
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _alive(process: tuple[int, int]) -> bool:
    """True while ``(pid, start time)`` runs; a pid reused since is another process."""
    stat = _stat(process[0])
    return stat is not None and stat[2] == process[1]


def cluster_processes(root: int) -> set[tuple[int, int]]:
    """``(pid, start time)`` of ``root``, its live descendants, and the rest of its
    process group (Ray's workers start groups of their own; orphans of the group
    lose their parent link)."""
    table = _processes()
    pids = {pid for pid, (_, pgid, _) in table.items() if pgid == root}
    if root in table:
        pids.add(root)
    while True:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in pids} - pids
        if not more:
            return {(pid, table[pid][2]) for pid in pids}
        pids |= more


class Keeper:
    """A detached cluster daemon; ``line`` is what it printed once ready."""

    def __init__(self, script: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.env = env
        self.cleanup: list[Callable[[], object]] = []  # run once the cluster is gone
        lifeline_r, self._lifeline = os.pipe()
        out_r, out_w = os.pipe()
        try:
            with open(log, "ab") as log_file:
                subprocess.run(
                    [sys.executable, "-c", _LAUNCH, sys.executable, "-c", script, *args],
                    stdin=lifeline_r, stdout=out_w, stderr=log_file, env=env, check=True,
                    timeout=30)
        finally:
            os.close(lifeline_r)
            os.close(out_w)
        with os.fdopen(out_r) as out:
            self.pid = int(self._read_line(out, log))
            try:
                self.line = self._read_line(out, log)
            except BaseException:
                self.stop()
                raise

    def _read_line(self, out, log: Path) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([out], [], [], 1.0)
            if ready:
                line = out.readline()
                if not line:
                    break
                return line.strip()
        raise RuntimeError(f"the test cluster did not start; see {log}:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Close the lifeline, wait for the cluster's processes to end, kill the rest."""
        processes = cluster_processes(self.pid)
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            processes = {p for p in processes if _alive(p)} | cluster_processes(self.pid)
            if not processes:
                break
            time.sleep(0.1)
        else:
            self._kill(processes)
        for cleanup in self.cleanup:
            cleanup()

    @staticmethod
    def _kill(processes: set[tuple[int, int]]) -> None:
        for process in processes:
            if _alive(process):
                with contextlib.suppress(OSError):
                    os.kill(process[0], signal.SIGKILL)
        time.sleep(0.5)
        left = [pid for pid, start in processes if _alive((pid, start))]
        if left:
            raise RuntimeError(f"test cluster processes left running: {left}")


def _cluster_env(env: dict[str, str]) -> dict[str, str]:
    # Test functions travel by reference (module and name), as user code does: the
    # scheduler and workers import the test modules from this directory.
    here = str(Path(__file__).resolve().parent)
    paths = [here, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def start_dask(log: Path) -> Keeper:
    env = _cluster_env(dict(os.environ))
    # A task whose worker dies fails at once (Dask's default retries it on 3 more
    # workers, each restarted by its nanny): keeps the worker-loss tests short.
    env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "0"
    return Keeper(_DASK_KEEPER, [], env, log)


def start_ray(log: Path) -> Keeper:
    """A Ray cluster with token authentication; ``keeper.env`` is this environment
    plus the token, which a process needs to connect."""
    client_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # Ray's sessions and its "current cluster" file go to a directory of our own: the
    # file would send every later bare ray.init() on this machine to this cluster
    # (`ray start --block` stopped by a signal leaves it behind). A short path, as Ray
    # puts unix sockets under it.
    temp_dir = tempfile.mkdtemp(prefix="farpool-ray-")
    ray_bin = Path(sys.executable).with_name("ray")
    ray_bin = str(ray_bin) if ray_bin.exists() else (shutil.which("ray") or "ray")
    env = {**_cluster_env(client_env), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": temp_dir}
    try:
        keeper = Keeper(_RAY_KEEPER, [ray_bin, str(free_port()), str(free_port())], env, log)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    keeper.env = client_env
    keeper.cleanup.append(functools.partial(shutil.rmtree, temp_dir, ignore_errors=True))
    return keeper
